"""Run folders and checkpoints.

A run folder holds ``config.json`` (what was asked for), ``metrics.jsonl``
(one JSON object per line: per epoch or iteration, per evaluation),
checkpoints (``last.pt`` to resume, ``best.pt`` the selected model) and
``summary.json``. Files are written atomically: a crash never leaves a
half-written checkpoint behind. Checkpoints are read without running code:
only tensors, NumPy arrays of numbers and plain containers are unpickled.

The layout of a checkpoint (a ``torch.save`` dict of plain values)::

    format       "refit-checkpoint"                  (every checkpoint)
    version      1
    kind         "pretrain" | "finetune" | "import" | "model"
    recommender  what rebuilds the model (Recommender.state() / SeqRecommender.state()):
        model        {"name": "diffrec" | "cfdiff" | "dreamrec" | "external", "config": {...},
                      "state_dict": {name: tensor}}
        diffusion    DiffusionConfig fields (steps, schedule, mean type, ...)
        inference    sampling settings (DiffRec: sampling_steps, sampling_noise; DreamRec: w,
                     eval_steps) and precision
    data         {"source", "options", "fingerprint", "n_users", "n_items"}: the data it was
                 trained on (a checkpoint without a source needs --data)
    config       the run's settings (pretrain / finetune), for --resume
    epoch | iteration, best     where the run stood and its best validation result
    last.pt only: optimizer, rng (torch, numpy, generator), trainer (ReFiT: optimiser, baseline),
                 loss_history / loss_count (DiffRec's importance sampler), elapsed

``save_checkpoint(path, rec.state())`` writes a ``kind: "model"``
checkpoint of a bare recommender state.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import time
import zipfile
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


RECOMMENDER_KEYS = ("model", "diffusion", "inference")


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Saves a checkpoint dict (tagged with the format and version) atomically.

    ``state`` is a checkpoint dict with a ``recommender`` entry (see the
    module docstring), or a bare recommender state (``rec.state()``), which
    is saved as a ``kind: "model"`` checkpoint. Anything else raises
    ValueError naming what is missing.
    """
    if not isinstance(state, dict):
        raise ValueError(f"a checkpoint is a dict, got {type(state).__name__}")
    if "recommender" not in state and all(k in state for k in RECOMMENDER_KEYS):
        state = {"kind": "model", "recommender": state}
    rec = state.get("recommender")
    if not isinstance(rec, dict):
        raise ValueError("a refit checkpoint needs a 'recommender' entry (a recommender's state(): "
                         f"{', '.join(RECOMMENDER_KEYS)}); got the keys {sorted(state)}")
    missing = [k for k in RECOMMENDER_KEYS if k not in rec]
    if missing:
        raise ValueError(f"the checkpoint's 'recommender' entry lacks {', '.join(missing)} (see refit.runs)")
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


# What a checkpoint may hold besides tensors and plain containers: NumPy arrays and scalars of numbers
# (NumPy's random state, pretraining's loss history). Nothing else is unpickled, so a checkpoint cannot
# run code. NumPy 2 moved these functions from numpy.core to numpy._core: files of both are read.
_np_reconstruct = np.zeros(1).__reduce__()[0]
_np_scalar = np.float64(0).__reduce__()[0]
# A dtype is rebuilt through its class (BUILD), so these classes decide which arrays load: numbers and
# booleans, never object, string or structured arrays.
_NUMPY_DTYPES = [type(np.dtype(t)) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128)]
_NUMPY_GLOBALS = [np.ndarray, np.dtype, *_NUMPY_DTYPES,
                  (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
                  (_np_reconstruct, "numpy._core.multiarray._reconstruct"),
                  (_np_scalar, "numpy.core.multiarray.scalar"),
                  (_np_scalar, "numpy._core.multiarray.scalar")]
_NUMPY_NAMES = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
_ZIP_MAGIC = b"PK\x03\x04"


def _check_archive(path: str) -> bool:
    """Refuses an empty, truncated or corrupt checkpoint before torch reads it; True for a zip archive.

    torch.save writes a zip archive with a CRC-32 per member: a cut-off file
    has no central directory, a damaged one fails a checksum. Files in
    torch's older format (a bare pickle stream) are left to torch.load.
    """
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes): the file is truncated")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        if head[:1] == b"\x80":  # a pickle stream (protocol 2 or later): torch's older format
            return False
        raise ValueError(f"checkpoint {path!r} could not be read: it is not a file written by torch.save (neither "
                         f"a zip archive nor a pickle; it starts with {head!r}), or it is truncated or corrupt")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue  # written without checksums: nothing to compare against
                with archive.open(info) as member:  # raises BadZipFile on a wrong CRC-32 at its end
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path!r} is truncated or corrupt ({type(exc).__name__}: {exc}); it cannot "
                         "be loaded (was it copied or written completely?)") from None
    return True


def _unsafe_globals(path: str) -> list:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to make the message more precise
        return []
    return sorted(set(found) - _NUMPY_NAMES)


def _refusal(message: str) -> str:
    """The line of torch's weights-only error that says what was refused."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[-1] if lines else "refused by torch.load(weights_only=True)"


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint`, with clear errors for anything else.

    Only tensors, plain containers (dict, list, tuple, str, numbers...) and
    NumPy arrays and scalars of numbers are unpickled
    (``torch.load(weights_only=True)`` with exactly NumPy's array globals
    and numeric dtypes allowed), so a checkpoint cannot run code when read.
    Raises ValueError naming the file for an empty, truncated or corrupt
    file, one that holds other objects, or one that is not a refit checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    is_zip = _check_archive(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _unsafe_globals(path) if is_zip else []
        what = f": {', '.join(found)}" if found else f" ({_refusal(str(exc))})"
        if not is_zip:  # a bare pickle stream: refused content, or not torch's format at all
            what += ", or it is not a file written by torch.save"
        raise ValueError(f"checkpoint {path!r} holds something other than tensors, NumPy arrays of numbers and "
                         f"plain containers{what}. It is not loaded, since unpickling it could run code; refit "
                         "reads the checkpoints that refit writes") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise ValueError(f"checkpoint {path!r} could not be read: not a file written by torch.save, or a "
                         f"truncated or corrupt one ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a refit checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path!r} has format version {state.get('version')}, "
                         f"this refit reads version {CHECKPOINT_VERSION}")
    return state


def data_fingerprint(data) -> str:
    """A short hash of a data set, to check a checkpoint meets its data: the interactions of all three
    splits, or, for sequence data, the items, the sequence boundaries and the targets of every split."""
    if hasattr(data, "targets"):  # refit.seqdata.SequenceData
        h = hashlib.sha256(f"{data.n_items}".encode())
        parts = [data.items, data.offsets]
        for name in ("train", "valid", "test"):
            parts += [data.targets[name].seq, data.targets[name].pos]
        for t in parts:
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    h = hashlib.sha256()
    h.update(f"{data.n_users}x{data.n_items}".encode())
    for m in (data.train, data.valid, data.test):
        h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(m.indices, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def checkpoint_data(path: str, state: Dict[str, Any], data=None):
    """The data a checkpoint was trained on: ``data`` when given (checked against the checkpoint's
    fingerprint), else loaded from the checkpoint's own source. ValueError when they differ or when
    the checkpoint names no source."""
    from .data import load_dataset

    meta = state.get("data", {})
    if data is None:
        if not meta.get("source"):
            raise ValueError(f"checkpoint {path!r} does not say which data it was trained on: pass the data "
                             "(--data)")
        data = load_dataset(meta["source"], **meta.get("options", {}))
    fp = data_fingerprint(data)
    if meta.get("fingerprint") not in (None, fp):
        raise ValueError(f"checkpoint {path!r} was trained on other data (fingerprint {meta.get('fingerprint')}, "
                         f"these data {fp}): pass the data it was trained on")
    return data


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

    def start_log(self) -> None:
        """Empties metrics.jsonl for a new run in this folder, so that a run started again in the
        same folder (not resumed) does not append to the lines of the one before."""
        if os.path.exists(self.file("metrics.jsonl")):
            atomic_write(self.file("metrics.jsonl"), lambda f: None)  # nothing of the old lines is read

    def truncate_log(self, keep) -> None:
        """Keeps only the records for which ``keep(record)`` is true (used when resuming)."""
        kept = [r for r in self.records() if keep(r)]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.file("metrics.jsonl"), lambda f: f.write(text.encode()))
