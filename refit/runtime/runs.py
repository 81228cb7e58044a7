"""Run folders and checkpoints.

A run folder holds ``config.json`` (what was asked for), ``metrics.jsonl``
(one JSON object per line: per epoch or iteration, per evaluation),
checkpoints (``last.pt`` to resume, ``best.pt`` the selected model) and
``summary.json`` (and fine-tuning's ``plot.png``). Files are written
atomically (a temporary file renamed over the old one, with the mode an
ordinary ``open()`` gives): a crash never leaves a half-written file behind;
``metrics.jsonl`` grows a line at a time, and a torn last line (the process
died while writing it) is dropped when the log is read. A run holds its
folder through a lock file, ``.lock`` (pid and host of the process), from
start to end: a second run in the same folder is refused, and a new run in
a folder that holds a run needs ``overwrite`` (``--overwrite``) or
``resume`` (``--resume``). Checkpoints are read without running code:
only tensors, NumPy arrays of numbers and plain containers are unpickled.

The layout of a checkpoint (a ``torch.save`` dict of plain values)::

    format       "refit-checkpoint"                  (every checkpoint)
    version      1
    kind         "pretrain" | "finetune" | "import" | "model"
    recommender  what rebuilds the model (RowRecommender.state() / SeqRecommender.state()):
        model        {"name": "diffrec" | "cfdiff" | "dreamrec" | "external" | "external-latent",
                      "config": {...}, "state_dict": {name: tensor}}; the two outside kinds hold
                      a module refit cannot rebuild (refit.policy.ScheduleDenoiser and
                      refit.latent_adapter.LatentScheduleDenoiser; refit.policy.policy_state
                      writes this entry for a policy of one's own): refit.policy.outside_state_dict
                      gives the module's weights, --policy MODULE:FUNCTION rebuilds it
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

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import socket
import tempfile
import time
import warnings
import zipfile
import zlib
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from . import distributed as dist

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "refit-checkpoint"
CHECKPOINT_VERSION = 1


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, and set it back at once
    os.umask(mask)
    return mask


def atomic_write(path: str, write) -> None:
    """Writes a file through ``write(fileobj)`` into a temporary file, then renames it over ``path``.

    The file gets the mode an ordinary ``open()`` would give it (0o666 less the umask).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        # mkstemp creates the file readable by its owner only; the file gets what open() would give.
        os.fchmod(fd, 0o666 & ~_umask())
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


def _is_outside_model(state: Dict[str, Any]) -> bool:
    """Whether ``state`` is a bare outside policy's state (its ``model`` entry only)."""
    model = state.get("model")
    return isinstance(model, dict) and model.get("name") in ("external", "external-latent") and "kind" not in state


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Saves a checkpoint dict (tagged with the format and version) atomically.

    ``state`` is a checkpoint dict with a ``recommender`` entry (see the
    module docstring), or a bare recommender state (``rec.state()``), which
    is saved as a ``kind: "model"`` checkpoint. Anything else raises
    ValueError naming what is missing.
    """
    if not isinstance(state, dict):
        raise ValueError(f"a checkpoint is a dict, got {type(state).__name__}")
    if "recommender" not in state and (all(k in state for k in RECOMMENDER_KEYS) or _is_outside_model(state)):
        state = {"kind": "model", "recommender": state}
    rec = state.get("recommender")
    if not isinstance(rec, dict):
        raise ValueError("a refit checkpoint needs a 'recommender' entry (a recommender's state(): "
                         f"{', '.join(RECOMMENDER_KEYS)}); got the keys {sorted(state)}")
    # An outside policy's entry (refit.policy.policy_state) needs only its model: refit rebuilds
    # nothing else of it.
    outside = isinstance(rec.get("model"), dict) and rec["model"].get("name") in ("external", "external-latent")
    missing = [k for k in (("model",) if outside else RECOMMENDER_KEYS) if k not in rec]
    if missing:
        raise ValueError(f"the checkpoint's 'recommender' entry lacks {', '.join(missing)} (see refit.runtime.runs)")
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


# What a checkpoint may hold besides tensors and plain containers: NumPy arrays and scalars of numbers
# (NumPy's random state, pretraining's loss history). Nothing else is unpickled, so a checkpoint cannot
# run code. NumPy 2 moved these functions from numpy.core to numpy._core: files of both are read.
_np_reconstruct = np.zeros(1).__reduce__()[0]
_np_scalar = np.float64(0).__reduce__()[0]
# A dtype is rebuilt through its class (BUILD), so these classes decide which arrays load: numbers and
# booleans, never object, string or structured arrays. In NumPy 1.20-1.24 these classes are named
# numpy.dtype[int64] and so on, but no pickle names them (a dtype is pickled as numpy.dtype(code) with a
# BUILD state), so the classes themselves are what the list needs, under either NumPy.
_NUMPY_DTYPES = [type(np.dtype(t)) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128)]


def _dtype_problem(dt: Any) -> Optional[str]:
    """Why ``dt`` is not a plain NumPy dtype of numbers exactly as NumPy makes it (None when it is one).

    A dtype's BUILD state can set any flags: those that mark int64 data as
    object pointers make NumPy read the array's bytes as Python objects (or
    fail when it is freed), so the flags and size must be NumPy's own.
    """
    if not isinstance(dt, np.dtype):
        return f"its dtype is a {type(dt).__name__}, not a NumPy dtype"
    if dt.names is not None or dt.subdtype is not None:
        return f"dtype {dt} is structured"
    if dt.kind not in "biufc":
        return f"dtype {dt} (kind {dt.kind!r}) does not hold numbers"
    if dt.hasobject:
        return f"dtype {dt} is marked as holding Python objects (flags {dt.flags})"
    try:
        own = np.dtype(dt.str)
    except (TypeError, ValueError):
        return f"dtype {dt} is not one NumPy makes"
    if dt.flags != own.flags or dt.itemsize != own.itemsize or dt.metadata is not None:
        return f"dtype {dt} carries flags, a size or metadata that NumPy never gives it (flags {dt.flags})"
    return None


class _LoadedArray(np.ndarray):
    """An array as a checkpoint is read: NumPy pickles an array as ``_reconstruct(ndarray, (0,), b'b')``
    plus a BUILD state (shape, dtype, bytes), and this class checks the dtype before the state is applied.

    An array whose dtype is refused keeps no data (the state is not applied): built with it, freeing the
    array could already fail. :func:`_checked_state` names it with its key path after loading and turns
    the accepted ones back into plain ndarrays.
    """

    def __new__(cls, *args, **kwargs):
        # Reached only when a pickle calls numpy.ndarray(...) itself, which NumPy never writes.
        raise pickle.UnpicklingError("the pickle calls numpy.ndarray(...) directly, which NumPy never writes")

    def __setstate__(self, state):
        dtype = state[2] if isinstance(state, tuple) and len(state) == 5 else \
            state[1] if isinstance(state, tuple) and len(state) == 4 else None
        problem = "an array state other than NumPy's" if dtype is None else _dtype_problem(dtype)
        if problem is not None:
            self.refused = problem
            return
        super().__setstate__(state)


def _checked_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` for checkpoints: the empty array NumPy's pickles start from, as a _LoadedArray."""
    if subtype is not _LoadedArray or tuple(shape) != (0,) or dtype not in (b"b", "b"):
        raise pickle.UnpicklingError("an array is rebuilt with arguments NumPy never writes")
    return _np_reconstruct(_LoadedArray, (0,), b"b")


# numpy.ndarray resolves to _LoadedArray, so that every array goes through its checked BUILD and a direct
# call numpy.ndarray(shape, dtype) is refused.
_NUMPY_GLOBALS = [(_LoadedArray, "numpy.ndarray"), np.dtype, *_NUMPY_DTYPES,
                  (_checked_reconstruct, "numpy.core.multiarray._reconstruct"),
                  (_checked_reconstruct, "numpy._core.multiarray._reconstruct"),
                  (_np_scalar, "numpy.core.multiarray.scalar"),
                  (_np_scalar, "numpy._core.multiarray.scalar")]
_NUMPY_NAMES = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
_ZIP_MAGIC = b"PK\x03\x04"
#: How deep a checkpoint's containers may nest (refit's own nest about 6 deep).
_MAX_DEPTH = 100


def _key_path(parent: str, key: Any, index: bool = False) -> str:
    if index or not isinstance(key, str):
        return f"{parent}[{key!r}]" if not index else f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _checked_state(path: str, obj: Any, where: str = "", depth: int = 0, seen: Optional[Dict[int, Any]] = None):
    """``obj`` with every NumPy array, dtype and scalar checked to hold numbers (ValueError naming the
    checkpoint and the key path otherwise), and the arrays as plain ndarrays."""
    seen = {} if seen is None else seen
    if id(obj) in seen:  # shared (or cyclic) containers are walked once
        return seen[id(obj)]
    at = where or "the top level"
    if depth > _MAX_DEPTH:
        raise ValueError(f"checkpoint {path!r} nests containers more than {_MAX_DEPTH} levels deep (at {at}); "
                         "refit's checkpoints never do (it is not loaded)")
    problem = None
    if isinstance(obj, _LoadedArray):
        problem = getattr(obj, "refused", None) or _dtype_problem(obj.dtype)
        out = obj.view(np.ndarray)
    elif isinstance(obj, np.ndarray):
        problem, out = _dtype_problem(obj.dtype), obj
    elif isinstance(obj, np.dtype):
        problem, out = _dtype_problem(obj), obj
    elif isinstance(obj, np.generic):
        problem, out = _dtype_problem(obj.dtype), obj
    elif isinstance(obj, dict):
        seen[id(obj)] = out = obj
        for key in list(obj):
            _checked_state(path, key, _key_path(where, key), depth + 1, seen)
            value = obj[key]
            new = _checked_state(path, value, _key_path(where, key), depth + 1, seen)
            if new is not value:
                obj[key] = new
        return out
    elif isinstance(obj, list):
        seen[id(obj)] = out = obj
        for i, value in enumerate(obj):
            new = _checked_state(path, value, _key_path(where, i, index=True), depth + 1, seen)
            if new is not value:
                obj[i] = new
        return out
    elif isinstance(obj, (tuple, set, frozenset)):
        seen[id(obj)] = obj
        items = [_checked_state(path, v, _key_path(where, i, index=True), depth + 1, seen) for i, v in enumerate(obj)]
        changed = any(a is not b for a, b in zip(items, obj)) and type(obj) is tuple
        out = tuple(items) if changed else obj
    else:
        out = obj
    if problem is not None:
        raise ValueError(f"checkpoint {path!r} holds a NumPy value at {at} that is not numbers: {problem}. It is "
                         "not loaded; refit's checkpoints hold NumPy arrays of numbers only")
    seen[id(obj)] = out
    return out


def _check_archive(path: str, what: str = "checkpoint") -> bool:
    """Refuses an empty, truncated or corrupt file written by torch.save before torch reads it; True for a
    zip archive. ``what`` names the kind of file in the messages ("checkpoint", "DiffRec paper checkpoint").

    torch.save writes a zip archive with a CRC-32 per member: a cut-off file
    has no central directory, a damaged one fails a checksum (torch itself
    compares none of them, so flipped bytes would load as other numbers).
    Files in torch's older format (a bare pickle stream) are left to the reader.
    """
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes): the file is truncated")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        if head[:1] == b"\x80":  # a pickle stream (protocol 2 or later): torch's older format
            return False
        raise ValueError(f"{what} {path!r} could not be read: it is not a file written by torch.save (neither "
                         f"a zip archive nor a pickle; it starts with {head!r}), or it is truncated or corrupt")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue  # written without checksums: nothing to compare against
                with archive.open(info) as member:  # raises BadZipFile on a wrong CRC-32 at its end
                    while member.read(1 << 24):
                        pass
    # Damaged headers fail in more ways: an unknown compression method (NotImplementedError), a set
    # encryption bit (RuntimeError), a broken deflate stream (zlib.error).
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError, zlib.error) as exc:
        raise ValueError(f"{what} {path!r} is truncated or corrupt ({type(exc).__name__}: {exc}); it cannot "
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
    Every NumPy array, dtype and scalar is checked to hold numbers with the
    flags NumPy gives them (a pickled dtype's state can mark it as holding
    Python objects). Raises ValueError naming the file for an empty,
    truncated or corrupt file, one that holds other objects (with their key
    path), or one that is not a refit checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    is_zip = _check_archive(path)
    try:
        # torch warns about files it then refuses (e.g. a pickle of protocol 5): the refusal below says it
        # in refit's words, naming the file, so its warnings would only add lines.
        with torch.serialization.safe_globals(_NUMPY_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
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
    return _checked_state(path, state)


def data_fingerprint(data) -> str:
    """A short hash of a data set, to check a checkpoint meets its data: the interactions of all three
    splits, or, for sequence data, the items, the sequence boundaries and the targets of every split."""
    if hasattr(data, "targets"):  # refit.data.sequences.SequenceData
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


def check_finite_weights(state_dict: Any, what: str) -> None:
    """ValueError naming ``what`` (the checkpoint) and the first tensor of ``state_dict`` with a NaN or an
    infinite entry: such a model scores NaN, which the first evaluation would report without naming it."""
    if not isinstance(state_dict, dict):
        return  # load_state_dict names what is wrong with it
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{what} holds non-finite weights: tensor {name!r} has {bad} NaN or infinite "
                                 f"value(s) among {t.numel()}; the model cannot be used (did its training "
                                 "diverge, or is the file damaged?)")


def checkpoint_data(path: str, state: Dict[str, Any], data=None, *, allow_other_data: bool = False):
    """The data a checkpoint was trained on: loaded from the checkpoint's own source when ``data`` is
    None, else ``data``, which must have the fingerprint the checkpoint recorded.

    ValueError naming the checkpoint when the checkpoint names no source (and no data is given), when
    the fingerprints differ, or when data is given and the checkpoint records no fingerprint (nothing
    shows they are its data: a data set with as many items would be scored as if it were).
    ``allow_other_data`` (``--allow-other-data``) takes the data anyway, with a warning naming both
    fingerprints.
    """
    from ..data import load_dataset

    meta = state.get("data")
    meta = meta if isinstance(meta, dict) else {}
    recorded = meta.get("fingerprint")
    own = data is None
    if own:
        if not meta.get("source"):
            raise ValueError(f"checkpoint {path!r} does not say which data it was trained on: pass the data "
                             "(--data)")
        data = load_dataset(meta["source"], **meta.get("options", {}))
    fp = data_fingerprint(data)
    if recorded == fp or (own and recorded is None):  # its own source: nothing else to compare with
        return data
    if allow_other_data:
        log.warning("checkpoint %r is used on data other than it records (--allow-other-data): fingerprint %s "
                    "recorded, %s for these data", path, recorded or "none", fp)
        return data
    if recorded is None:
        raise ValueError(f"checkpoint {path!r} records no data fingerprint, so these data (fingerprint {fp}) "
                         "cannot be checked to be the ones it was trained on: pass --allow-other-data "
                         "(allow_other_data=True) to use them anyway")
    raise ValueError(f"checkpoint {path!r} was trained on other data (fingerprint {recorded}, these data {fp}): "
                     "pass the data it was trained on, or --allow-other-data (allow_other_data=True) to use "
                     "these anyway")


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


#: The files a run writes into its folder; any of them means the folder holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "best.pt", "last.pt", "summary.json", "plot.png")
LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The settings a run may be resumed with changed, for every kind of run: where it stops and how it
#: reports. Every other setting must be the one the run started with (see :meth:`RunDir.resume_state`).
RESUME_MAY_CHANGE = frozenset({"epochs", "iterations", "time_budget", "patience", "progress", "out", "plot",
                               "eval_batch_size", "allow_other_data"})

_MISSING = object()


def _field_defaults(config: Any) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


class RunDir:
    """A run folder: config, metrics log, checkpoints, summary."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def run_files(self) -> List[str]:
        """The files of a run (:data:`RUN_FILES`) that this folder holds."""
        return [name for name in RUN_FILES if os.path.exists(self.file(name))]

    @contextlib.contextmanager
    def claim(self, *, resume: bool = False, overwrite: bool = False, inputs: Iterable[Optional[str]] = ()):
        """Holds the folder for one run, from the ``with`` to its end (also when the run fails or is stopped).

        Takes the lock (:meth:`lock`), then: a folder that holds a run
        (:meth:`run_files`) is refused unless ``resume`` (the run goes on; when
        there is no ``last.pt`` to go on from, its files are replaced) or
        ``overwrite`` (its files are removed now; the folder's other files
        stay). ``inputs``: files the run reads (the checkpoint it starts from),
        which are never removed. Nothing in the folder is changed before a
        refusal. Under torch.distributed rank 0 alone does this (it alone
        writes the folder) and every rank raises its ValueError.
        """
        if resume and overwrite:
            raise ValueError("--resume continues the run in the folder and --overwrite replaces it: pass one of them")
        error, held = None, False
        if dist.is_main():
            try:
                self.lock()
                held = True
                self._prepare(resume, overwrite, inputs)
            except (ValueError, OSError) as exc:
                error = str(exc) if isinstance(exc, ValueError) else f"cannot use the run folder {self.path}: {exc}"
        # The other ranks wait for rank 0's answer, so that all of them stop on a refusal.
        error = dist.broadcast_object(error)
        if error is not None:
            if held:
                self.unlock()
            raise ValueError(error)
        try:
            yield self
        finally:
            if held:
                self.unlock()

    def _prepare(self, resume: bool, overwrite: bool, inputs: Iterable[Optional[str]]) -> None:
        present = self.run_files()
        if not present:
            return
        if not resume and not overwrite:
            raise ValueError(f"the run folder {self.path} already holds a run ({', '.join(present)}): pass --resume "
                             "to continue it or --overwrite to replace it (or choose another --out)")
        if resume and "last.pt" in present:
            return
        kept = {os.path.realpath(p) for p in inputs if p}
        for name in present:
            if os.path.realpath(self.file(name)) in kept:
                raise ValueError(f"replacing the run in {self.path} would delete {self.file(name)}, which this run "
                                 "starts from: copy it elsewhere first, or choose another --out")
        if resume:
            log.warning("no last.pt in %s to resume from: starting the run again, replacing %s", self.path,
                        ", ".join(present))
        for name in present:
            os.unlink(self.file(name))

    def lock(self) -> None:
        """Creates the lock file ``.lock`` (pid and host), or raises ValueError naming the process that holds it.

        A lock left by a process of this host that no longer exists (killed)
        is taken over, with a warning naming its pid; so is one left by an
        earlier attempt of the same torchrun job (``--max-restarts``: rank 0
        may have run on another node).
        """
        path = self.file(LOCK_FILE)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        job = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if job and job != "none":  # torchrun's default id is "none": shared by unrelated jobs
            me.update(job=job, attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))
        for _ in range(5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                pass
            else:
                self._lock_text = json.dumps(me)
                with os.fdopen(fd, "w") as f:
                    f.write(self._lock_text)
                return
            try:
                with open(path) as f:
                    text = f.read()
            except FileNotFoundError:  # released in between: try again
                continue
            try:
                holder = json.loads(text)
                pid, host = int(holder["pid"]), str(holder["host"])
                # torchrun restarts a job only after all of its workers have stopped.
                earlier_attempt = "job" in me and holder.get("job") == me["job"] and \
                    int(holder.get("attempt", 0)) < me["attempt"]
            except (ValueError, TypeError, KeyError, AttributeError):
                raise ValueError(f"the run folder {self.path} is locked by {path}, which names no process (it "
                                 "is being created, or its run was killed while creating it): remove it if no "
                                 "run uses the folder") from None
            if not earlier_attempt and (host != me["host"] or _pid_alive(pid)):
                where = f" on host {host}" if host != me["host"] else ""
                raise ValueError(f"the run folder {self.path} is in use by another run (pid {pid}{where}): wait "
                                 f"for it to end, or choose another --out (if pid {pid} is no refit run, {path} "
                                 "was left by a killed one: remove it)")
            # The holder is gone. The stale lock is moved aside (one process wins the rename) and compared
            # with what was read, so that a live lock taken in between is put back, not broken.
            aside = f"{path}.stale-{os.getpid()}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            with open(aside) as f:
                moved = f.read()
            if moved != text:
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                continue
            os.unlink(aside)
            log.warning("run folder %s: taking over the lock of pid %d, which no longer runs (%s)", self.path, pid,
                        "an earlier attempt of this torchrun job" if earlier_attempt else "it was killed")
        raise ValueError(f"could not lock the run folder {self.path}: other runs keep taking it")

    def unlock(self) -> None:
        """Removes the lock file this process created (not one another run took since)."""
        path = self.file(LOCK_FILE)
        try:
            with open(path) as f:
                mine = f.read() == getattr(self, "_lock_text", None)
            if mine:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n"
        atomic_write(self.file(name), lambda f: f.write(text.encode()))

    def read_json(self, name: str) -> Any:
        with open(self.file(name)) as f:
            return json.load(f)

    def log(self, record: Dict[str, Any]) -> None:
        """Appends one JSON line to metrics.jsonl (with a wall-clock time stamp)."""
        record = {"time": round(time.time(), 3), **record}
        line = (json.dumps(record, default=_jsonable) + "\n").encode()
        # One write call per line: a kill can cut only the last line short, which records() drops.
        fd = os.open(self.file("metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def records(self) -> List[Dict[str, Any]]:
        """The lines of metrics.jsonl, parsed (empty when there are none).

        A last line that does not parse and lacks its newline was cut short
        by a process that died while writing it: it is dropped with a
        warning. Any other line that is not a JSON object raises ValueError
        naming the file and the line.
        """
        path = self.file("metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, newline="", errors="replace") as f:  # a damaged byte fails its line's parse
            text = f.read()
        lines = text.split("\n")
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines):  # the split's last piece: a line without its newline
                    log.warning("%s: dropping its last line, cut short (the run was killed while writing it)", path)
                    continue
                raise ValueError(f"{path}, line {number}: not a JSON record ({exc.msg} at column {exc.colno}); "
                                 "the log is damaged") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: not a JSON object; the log is damaged")
            out.append(record)
        return out

    def start_log(self) -> None:
        """Empties metrics.jsonl for a new run in this folder, so that a run started again in the
        same folder (not resumed) does not append to the lines of the one before."""
        if os.path.exists(self.file("metrics.jsonl")):
            atomic_write(self.file("metrics.jsonl"), lambda f: None)  # nothing of the old lines is read

    def resume_state(self, config: Any, fingerprint: str, *, resume: bool, position: str,
                     data_name: Any = None) -> Optional[Dict[str, Any]]:
        """``last.pt``'s state when ``resume`` and the folder holds one, checked against ``config``; else
        None, a new run. Every kind of run resumes by this one rule:

        - each setting of ``config`` (a dataclass with ``to_dict()``) outside
          :data:`RESUME_MAY_CHANGE` must equal the checkpoint's; a setting the
          checkpoint does not record (saved before it existed) counts as its
          default;
        - the data's fingerprint must be the checkpoint's;
        - the weights must be finite.

        On the main process, metrics.jsonl keeps the records up to the
        checkpoint's ``position`` (``"epoch"`` or ``"iteration"``) when
        resuming, and is emptied for a new run.
        """
        path = self.file("last.pt")
        main = dist.is_main()
        if not (resume and os.path.exists(path)):
            if resume:
                log.info("no last.pt in %s: starting a new run", self.path)
            if main:
                self.start_log()
            return None
        state = load_checkpoint(path)
        saved, mine, defaults = dict(state.get("config") or {}), config.to_dict(), _field_defaults(config)
        diff = sorted(k for k in set(saved) | set(mine) if k not in RESUME_MAY_CHANGE
                      and saved.get(k, defaults.get(k, _MISSING)) != mine.get(k, _MISSING))
        if diff:
            raise ValueError(f"cannot resume {path}: the run was started with other settings ({', '.join(diff)}); "
                             "start a new run folder or use the original settings")
        if (state.get("data") or {}).get("fingerprint") != fingerprint:
            raise ValueError(f"cannot resume {path}: it was trained on other data"
                             + (f" than {data_name!r}" if data_name is not None else ""))
        check_finite_weights(state["recommender"]["model"]["state_dict"], f"checkpoint {path!r}")
        done = state[position]
        if main:
            self.truncate_log(lambda r: r.get(position, 0) <= done)
        log.info("resuming %s after %s %d", self.path, position, done)
        return state

    def truncate_log(self, keep) -> None:
        """Keeps only the records for which ``keep(record)`` is true (used when resuming)."""
        kept = [r for r in self.records() if keep(r)]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.file("metrics.jsonl"), lambda f: f.write(text.encode()))
