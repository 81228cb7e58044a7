"""Run folders and checkpoints.

A run folder holds ``config.json`` (what was asked for), ``metrics.jsonl``
(one JSON object per line: per epoch or iteration, per evaluation),
checkpoints (``last.pt`` to resume, ``best.pt`` the selected model) and
``summary.json``. Files are written atomically: a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np
import torch

CHECKPOINT_FORMAT = "refit-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_write(path: str, write) -> None:
    """Writes a file through ``write(fileobj)`` into a temporary file, then renames it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Saves a checkpoint dict (tagged with the format and version) atomically."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint`, with clear errors for anything else."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise ValueError(f"checkpoint {path!r} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a refit checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path!r} has format version {state.get('version')}, "
                         f"this refit reads version {CHECKPOINT_VERSION}")
    return state


def data_fingerprint(data) -> str:
    """A short hash of the interactions (all three splits), to check a checkpoint meets its data."""
    h = hashlib.sha256()
    h.update(f"{data.n_users}x{data.n_items}".encode())
    for m in (data.train, data.valid, data.test):
        h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(m.indices, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """The random states a resumed run must restore."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class RunDir:
    """A run folder: config, metrics log, checkpoints, summary."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n"
        atomic_write(self.file(name), lambda f: f.write(text.encode()))

    def read_json(self, name: str) -> Any:
        with open(self.file(name)) as f:
            return json.load(f)

    def log(self, record: Dict[str, Any]) -> None:
        """Appends one JSON line to metrics.jsonl (with a wall-clock time stamp)."""
        record = {"time": round(time.time(), 3), **record}
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def records(self):
        """The lines of metrics.jsonl, parsed (empty when there are none)."""
        path = self.file("metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_log(self, keep) -> None:
        """Keeps only the records for which ``keep(record)`` is true (used when resuming)."""
        kept = [r for r in self.records() if keep(r)]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.file("metrics.jsonl"), lambda f: f.write(text.encode()))
