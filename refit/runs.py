"""``refit.runs`` is :mod:`refit.runtime.runs` (run folders, checkpoints, resume); the name stays for the
code that imports it so (``from refit.runs import load_checkpoint``)."""

from .runtime.runs import *  # noqa: F401,F403
