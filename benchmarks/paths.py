"""Where the benchmarks find the repository and the data, and the environment of the processes they start."""

import os
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_root() -> str:
    """``$REFIT_DATA``, or ``../shared/data`` beside the repository."""
    return os.environ.get("REFIT_DATA") or os.path.join(ROOT, "..", "shared", "data")


def shared_data(name: str = "ml-1m_clean", marker: Optional[str] = None) -> Optional[str]:
    """Path of the data set ``name`` under :func:`data_root`, or None when it is not there.

    marker: a file the folder must hold (``test_list.npy`` for a DiffRec split).
    """
    path = os.path.join(data_root(), name)
    if not os.path.isdir(path) or (marker and not os.path.exists(os.path.join(path, marker))):
        return None
    return path


def child_env(threads: Optional[str] = "1", **extra: str) -> Dict[str, str]:
    """``os.environ`` for a child process: this checkout first on PYTHONPATH, ``OMP_NUM_THREADS=threads``
    (None: left out, so torch picks), plus ``extra``."""
    env = dict(os.environ, **extra)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env
