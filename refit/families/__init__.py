"""The model families refit pretrains, loads, evaluates and fine-tunes, by name.

A family is everything that differs between backbones: its pretraining
configuration (whose :func:`refit.settings.setting` fields are ``refit
pretrain``'s flags), its pretraining run, how a checkpoint of it is loaded as a
policy (:mod:`refit.policy`'s protocol), the kind of data it ranks, and
optionally a wrapper that runs its sampling loops in CUDA graphs. The command
line, :func:`refit.posttrain.run.load_policy` and :func:`graphed` read this registry;
none of them names a family.

Built in: ``diffrec`` and ``cfdiff`` (rows of interactions, :mod:`refit.families.diffrec`),
``dreamrec`` and ``preferdiff`` (sequences, :mod:`refit.families.dreamrec`). Another
family registers itself once, before the command line or a loader needs it::

    from refit.families import Family, register

    register(Family(name="mine", config=MyConfig, pretrain=my_pretrain, load=my_load,
                    data_kind="interactions"))

and ``refit pretrain --model mine``, ``refit evaluate`` and ``refit finetune`` of its
checkpoints work (``python -m refit`` imports nothing of yours: call :func:`refit.cli.main`
from a script that registers the family first).
"""

from .registry import (DATA_KINDS, METRICS, Family, get, graphed, names, of_checkpoint, of_policy, register,  # noqa: F401
                       unregister)
# The built-in families register themselves.
from . import diffrec, dreamrec  # noqa: E402,F401

__all__ = ["Family", "DATA_KINDS", "METRICS", "register", "unregister", "names", "get", "of_checkpoint", "of_policy",
           "graphed"]
