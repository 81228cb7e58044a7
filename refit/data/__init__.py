"""Interaction data: loaders, the train / valid / test split, and user batches.

``load_dataset(name_or_path, **options)`` reads one of

* a folder of DiffRec splits: ``train_list.npy``, ``valid_list.npy``,
  ``test_list.npy``, each an (n, 2) integer array of (user, item) pairs
  whose ids are already dense indices (kept as they are; without declared
  sizes an id space more than twice the number of distinct ids, and above
  2**20, is refused as a broken file: see ``DENSE_ID_FACTOR``). The arrays
  are read with ``allow_pickle=False``: nothing is ever unpickled;
* a RecBole atomic ``.inter`` file (tab-separated, a ``name:type`` header with
  ``user_id`` and ``item_id``, optionally ``rating`` and ``timestamp``);
* raw MovieLens ratings: ``ratings.dat`` (``user::item::rating::timestamp``,
  ML-1M / ML-10M) or the tab-separated ``u.data`` of ML-100K (whose
  ``u.info``, when present beside it, declares the id ranges);
* ``"movielens-100k"``: the ML-100K copy shipped inside the ``recbole``
  package (read from the package's folder; RecBole is never imported);
* ``"synthetic"``: a seeded generator with taste clusters and popularity skew;

and returns an :class:`InteractionData`. Raw ratings become implicit feedback
(rating >= ``min_rating``, 4 by default) and each user's interactions are split
chronologically 7:1:2 into train / valid / test (``split_mode="random"`` for a
seeded random split). Users and items are re-indexed densely; the original ids
are kept in ``user_ids`` / ``item_ids``. What was filtered is logged (logger
``refit.data``) and kept in ``InteractionData.summary``.

Text files are UTF-8 (a leading byte order mark is accepted); blank and
whitespace-only lines are skipped. Malformed files raise
:class:`DataFormatError` naming the file and line (the row, for ``.npy``).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

import refit_kernels as rk

# The shared pieces of every loader, importable from here as before.
from .formats import (DENSE_ID_FACTOR, DENSE_ID_FLOOR, MAX_DATA_BYTES, MAX_FILE_BYTES,  # noqa: F401
                      DataFormatError, DataOptionsError, _bytes, _decode, _refuse_unknown, _regular_file, binary_csr)


if TYPE_CHECKING:  # for annotations only: refit.data.sequences imports this module
    from .sequences import SequenceData

log = logging.getLogger(__name__)

DEFAULT_SPLIT = (0.7, 0.1, 0.2)
DEFAULT_MIN_RATING = 4.0
BUILTIN = ("movielens-100k", "synthetic")

RECBOLE_HINT = (
    "'movielens-100k' is read from the copy of MovieLens-100K shipped inside the recbole package, "
    "which is not installed here. Install it without its dependencies (only its data files are read; "
    "RecBole itself is never imported): pip install --no-deps recbole==1.2.1 -- or pass the path of a "
    "MovieLens-100K u.data or ml-100k.inter file."
)


# --- the data set --------------------------------------------------------------------

@dataclass
class InteractionData:
    """Implicit-feedback interactions of ``n_users`` users with ``n_items`` items.

    Attributes:
        name: where the data came from.
        n_users, n_items: sizes of the dense id spaces.
        train, valid, test: (n_users, n_items) ``scipy.sparse.csr_matrix``,
            float32 ones, sorted unique column indices, disjoint.
        user_ids, item_ids: original id of each dense user / item index.
        summary: counts of what was read, filtered and kept.
        train_ratings: the logged rating of every training interaction, a
            float32 CSR with ``train``'s sparsity pattern, for sources that
            carry ratings (``ratings.dat``, ``u.data``, a ``.inter`` with a
            rating column); None otherwise. Offline reward-weighted
            fine-tuning takes them as rewards.
        valid_ratings, test_ratings: the same for the held-out splits
            (``valid``'s and ``test``'s patterns), so that an evaluation can
            count only the held-out items a user rated highly; None where
            ``train_ratings`` is None.
    """

    name: str
    n_users: int
    n_items: int
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    summary: Dict[str, int] = field(default_factory=dict)
    train_ratings: Optional[sp.csr_matrix] = None
    valid_ratings: Optional[sp.csr_matrix] = None
    test_ratings: Optional[sp.csr_matrix] = None

    def user_index(self, original_ids: Any) -> np.ndarray:
        """Dense indices of original user ids (KeyError for an unknown id)."""
        return _lookup(self.user_ids, original_ids, "user")

    def item_index(self, original_ids: Any) -> np.ndarray:
        """Dense indices of original item ids (KeyError for an unknown id)."""
        return _lookup(self.item_ids, original_ids, "item")

    def batches(self, batch_size: int, split: str = "train", **options) -> "UserBatches":
        """A :class:`UserBatches` over one split's rows (options as there)."""
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        return UserBatches(getattr(self, split), batch_size, **options)

    def __repr__(self) -> str:
        return (f"InteractionData({self.name!r}: {self.n_users} users, {self.n_items} items; "
                f"train {self.train.nnz}, valid {self.valid.nnz}, test {self.test.nnz})")


def _lookup(ids: np.ndarray, query: Any, what: str) -> np.ndarray:
    q = np.atleast_1d(np.asarray(query))
    if len(ids) == 0:
        raise KeyError(f"unknown {what} ids: {q[:5].tolist()}")
    pos = np.minimum(np.searchsorted(ids, q), len(ids) - 1)
    found = ids[pos] == q
    if not np.all(found):
        raise KeyError(f"unknown {what} ids: {q[~found][:5].tolist()}")
    return pos


# --- batches ------------------------------------------------------------------------------

class UserBatches:
    """Batches ``(user_ids, dense_rows)`` of a user x item matrix, built by ``gather_rows``.

    Each iteration is one epoch; with ``shuffle`` the users come in an order
    drawn from ``(seed, epoch)``, so every epoch differs and every run repeats.
    The epoch counter starts at 0 and advances at each ``iter()``;
    :meth:`set_epoch` sets it.

    Args:
        matrix: (n_users, n_items) CSR matrix (scipy, ``torch.sparse_csr_tensor``
            or ``(indptr, indices[, values])`` with ``n_cols``).
        batch_size: users per batch.
        users: the users to iterate over (default: every row).
        shuffle, seed: per-epoch shuffling.
        drop_last: skip a last, smaller batch.
        dtype: dtype of the dense rows (float32, float16, bfloat16).
        reuse_out: write every batch into one preallocated buffer (no
            allocation per batch). The yielded rows are then overwritten by
            the next batch: copy what must outlive it.
        device: where the rows are built (the matrix is moved there once).
        backend: forces a ``gather_rows`` backend.
        shard: ``(rank, world_size)``: yield only this rank's contiguous share
            of every batch (see :func:`refit.runtime.distributed.shard_range`); the
            batches themselves, and their order, are those of a single
            process. :attr:`current_slice` then holds ``(offset, size)`` of the
            share last yielded within its global batch.

    Yields:
        user_ids: (b,) int64 tensor on ``device``; dense_rows: (b, n_items).
    """

    def __init__(self, matrix: Any, batch_size: int, *, users: Any = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, dtype: torch.dtype = torch.float32, reuse_out: bool = False,
                 device: Any = None, backend: Optional[str] = None, n_cols: Optional[int] = None,
                 shard: Optional[Tuple[int, int]] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        csr = rk.as_csr(matrix, "matrix", n_cols=n_cols, values_dtype=torch.float32, index_dtype=None)
        if csr.n_cols is None:
            raise ValueError("matrix: pass n_cols= with an (indptr, indices[, values]) tuple")
        device = torch.device(device) if device is not None else csr.device
        values = csr.values
        if values is not None and bool((values == 1).all()):
            values = None  # implicit feedback: let the kernel skip reading the ones
        self._matrix = tuple(t.to(device) for t in (csr.indptr, csr.indices)) + (
            () if values is None else (values.to(device),))
        self.n_rows, self.n_cols = csr.n_rows, int(csr.n_cols)
        if users is None:
            self.users = np.arange(self.n_rows, dtype=np.int64)
        else:
            self.users = np.asarray(users, dtype=np.int64).reshape(-1)
            bad = (self.users < 0) | (self.users >= self.n_rows)
            if bad.any():
                raise IndexError(f"users: id {int(self.users[bad][0])} is out of range for {self.n_rows} rows")
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.dtype, self.device, self.backend = dtype, device, backend
        self._out = torch.empty((batch_size, self.n_cols), dtype=dtype, device=device) if reuse_out else None
        self.epoch = 0
        if shard is not None:
            r, w = (int(v) for v in shard)
            if w < 1 or not 0 <= r < w:
                raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
            shard = (r, w)
        self.shard = shard
        self.current_slice: Optional[Tuple[int, int]] = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.users)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The users in the order of ``epoch``."""
        if not self.shuffle:
            return self.users
        return np.random.default_rng([self.seed, epoch]).permutation(self.users)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(self.epoch)
        self.epoch += 1
        for b in range(len(self)):
            ids = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.shard is not None:
                from ..runtime.distributed import shard_range

                lo, hi = shard_range(len(ids), *self.shard)
                self.current_slice = (lo, len(ids))
                ids = ids[lo:hi]
            ids = torch.from_numpy(ids).to(self.device)
            out = None if self._out is None else self._out[: ids.shape[0]]
            rows = rk.gather_rows(self._matrix, ids, dtype=self.dtype, out=out, backend=self.backend,
                                  n_cols=self.n_cols)
            yield ids, rows


# --- loading --------------------------------------------------------------------------------

def load_dataset(name_or_path: Any, **options) -> "InteractionData | SequenceData":
    """Loads interactions and splits them (see the module docstring for the sources).

    Sequence data -- ml-1m_seq's ``dataset.pkl`` (the file, any ``.pkl`` file,
    or a folder holding ``dataset.pkl``), a DreamRec folder of ``.df`` splits
    (or one of its ``.df`` files) and the name ``"synthetic-seq"`` -- is read
    by :func:`refit.data.sequences.load_sequences` and comes back as a
    :class:`refit.data.sequences.SequenceData` (options as there).

    Options (each source takes those that apply to it; others raise DataOptionsError, a TypeError):
        min_rating: keep ratings >= this (default 4; None keeps all). Sources
            with ratings only.
        split: (train, valid, test) fractions (default (0.7, 0.1, 0.2)).
        split_mode: ``"time"`` (each user's interactions in time order, ties
            in file order; default) or ``"random"`` (a seeded shuffle per user).
        seed: seed of the random split and of the synthetic generator.
        n_users, n_items: for a DiffRec folder, the declared sizes (ids must
            be below them; default: the largest id + 1, which may be at most
            max(2 x the distinct ids, 2**20)). For ``"synthetic"``, the sizes
            to generate.
        Other ``"synthetic"`` options: see :func:`synthetic_interactions`.

    Raises:
        DataFormatError (a ValueError) naming the file and line of malformed
        input; FileNotFoundError for an unknown name or a missing path.

    The returned data carry ``source`` (``name_or_path``) and ``source_options`` (``options``).
    """
    data = _load_dataset(name_or_path, **options)
    if isinstance(name_or_path, (str, os.PathLike)):
        # What a checkpoint records of its data when a run is given the data object itself
        # (finetune(policy=..., data=...)): commands reload the data from it.
        # A path is recorded absolute, so the checkpoint finds its data from any working directory.
        source = os.fspath(name_or_path)
        data.source = os.path.abspath(source) if os.path.exists(source) else source
        data.source_options = dict(options)
    return data


def _load_dataset(name_or_path: Any, **options) -> "InteractionData | SequenceData":
    from .sequences import is_sequence_source, load_sequences  # only for the sources that need it

    if is_sequence_source(name_or_path):
        return load_sequences(name_or_path, **options)
    if isinstance(name_or_path, str) and name_or_path.lower() in ("synthetic",):
        return _load_synthetic(**options)
    if isinstance(name_or_path, str) and name_or_path.lower() in ("movielens-100k", "ml-100k"):
        return _load_file(_recbole_ml100k(), "recbole", options, name="movielens-100k")
    path = os.fspath(name_or_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data set {path!r}: not a path, and not one of the built-in names "
                                f"{', '.join(BUILTIN + ('synthetic-seq',))}")
    if os.path.isdir(path):
        kind, file = _detect_folder(path)
        if kind == "diffrec":
            return _load_diffrec(path, **options)
        return _load_file(file, kind, options)
    return _load_file(path, _detect_file(path), options)


def _detect_folder(path: str) -> Tuple[str, Optional[str]]:
    names = set(os.listdir(path))
    if {"train_list.npy", "valid_list.npy", "test_list.npy"} <= names:
        return "diffrec", None
    if "ratings.dat" in names:
        return "movielens-dat", os.path.join(path, "ratings.dat")
    if "u.data" in names:
        return "movielens-100k", os.path.join(path, "u.data")
    inter = sorted(n for n in names if n.endswith(".inter"))
    own = os.path.basename(os.path.normpath(path)) + ".inter"
    if own in inter:
        return "recbole", os.path.join(path, own)
    if len(inter) == 1:
        return "recbole", os.path.join(path, inter[0])
    raise FileNotFoundError(
        f"{path}: no data set found (expected train_list.npy/valid_list.npy/test_list.npy, ratings.dat, "
        f"u.data or one .inter file{'; found several .inter files: ' + ', '.join(inter) if inter else ''})")


def _detect_file(path: str) -> str:
    base = os.path.basename(path)
    if base.endswith(".inter"):
        return "recbole"
    if base.endswith(".npy"):
        raise ValueError(f"{path}: a DiffRec split is a folder with train_list.npy, valid_list.npy and "
                         "test_list.npy; pass the folder")
    _regular_file(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"::" in head:
        return "movielens-dat"
    return "movielens-100k"


def _recbole_ml100k() -> str:
    spec = importlib.util.find_spec("recbole")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(RECBOLE_HINT)
    for root in spec.submodule_search_locations:
        candidate = os.path.join(root, "dataset_example", "ml-100k", "ml-100k.inter")
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"recbole is installed at {list(spec.submodule_search_locations)} but has no "
                            f"dataset_example/ml-100k/ml-100k.inter. {RECBOLE_HINT}")


# --- reading text tables ----------------------------------------------------------------------

@dataclass
class _Records:
    """Interactions in file order: original ids, optional ratings and times, source lines.

    The readers store each column in the narrowest dtype that holds its values
    exactly (int32 ids where they fit, float32 or int32 ratings and times
    where nothing is lost), so that a file of tens of millions of lines fits
    in a few hundred megabytes; ``_build`` gives the same result for any of them.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: Optional[np.ndarray]
    times: Optional[np.ndarray]
    lines: "np.ndarray | _LineRuns"  # 1-based line of each record in its file: lines[i]


class _LineRuns:
    """The line of each data row, stored as runs of consecutive lines (a new run after a skipped line).

    ``runs[i]`` is the 1-based line of row ``i``. A file with no blank line is
    one run per parsed piece, so this costs nothing per row.
    """

    def __init__(self, row_starts: np.ndarray, line_starts: np.ndarray, n_rows: int):
        self.row_starts, self.line_starts, self.n_rows = row_starts, line_starts, n_rows

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, row: int) -> int:
        row = int(row)
        if not 0 <= row < self.n_rows:
            raise IndexError(row)
        r = int(np.searchsorted(self.row_starts, row, side="right")) - 1
        return int(self.line_starts[r]) + row - int(self.row_starts[r])

    def tolist(self) -> List[int]:
        """Every row's line (n_rows ints: for tests and small files)."""
        run = np.repeat(np.arange(len(self.row_starts)), np.diff(np.append(self.row_starts, self.n_rows)))
        return (self.line_starts[run] + np.arange(self.n_rows) - self.row_starts[run]).tolist()


# ASCII digits only: ``\d`` would also accept digits of other scripts, which NumPy does not parse.
_INT_FIELD = re.compile(r"^[+-]?[0-9]+$")
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _check_int(path: str, no: int, name: str, tok: str) -> int:
    if not _INT_FIELD.match(tok):
        raise DataFormatError(path, no, f"{name} must be an integer, got {tok[:40]!r}")
    value = int(tok)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise DataFormatError(path, no, f"{name} {tok[:40]} is out of range (ids must fit in a 64-bit integer)")
    return value


def _check_float(path: str, no: int, name: str, tok: str) -> float:
    try:
        if not tok.isascii() or "_" in tok:  # float() takes "1_0" and other scripts' digits, NumPy does not
            raise ValueError(tok)
        value = float(tok)
    except ValueError:
        raise DataFormatError(path, no, f"{name} must be a number, got {tok[:40]!r}") from None
    if not math.isfinite(value):
        raise DataFormatError(path, no, f"{name} must be finite, got {tok[:40]!r}")
    return value


def _scan_for_error(path: str, rows: Sequence[str], line_no: np.ndarray, sep: str,
                    fields: Sequence[Tuple[str, str]]) -> None:
    """Finds the first malformed row and raises DataFormatError for it (the slow path)."""
    shown = "tab" if sep == "\t" else repr(sep)
    for no, line in zip(line_no.tolist(), rows):
        line = line.rstrip("\r")
        parts = line.split(sep)
        if len(parts) != len(fields):
            raise DataFormatError(path, no, f"expected {len(fields)} fields ({', '.join(n for n, _ in fields)}) "
                                            f"separated by {shown}, got {len(parts)}: {line[:80]!r}")
        for (name, kind), tok in zip(fields, parts):
            tok = tok.strip()
            if kind == "int":
                _check_int(path, no, name, tok)
            else:
                _check_float(path, no, name, tok)


def _loadtxt(rows: Sequence[str], sep: str, dtype: np.dtype) -> np.ndarray:
    data = "\n".join(rows)
    if len(sep) > 1:  # loadtxt takes one-character separators
        data = data.replace(sep, "\x1f")
        sep = "\x1f"
    return np.loadtxt(io.StringIO(data), delimiter=sep, dtype=dtype, comments=None, ndmin=1)


def _first_rejected(rows: Sequence[str], sep: str, dtype: np.dtype) -> Optional[Tuple[int, str]]:
    """(index, NumPy's message) of the first row that NumPy cannot parse, found by bisection.

    Reached only when the per-field checks accept every row yet NumPy refuses
    the table: NumPy's own verdict then names the line.
    """
    def refused(a: int, b: int) -> Optional[str]:
        try:
            _loadtxt(rows[a:b], sep, dtype)
        except ValueError as exc:
            return str(exc)
        return None

    lo, hi = 0, len(rows)
    if refused(lo, hi) is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if refused(lo, mid) is not None:
            hi = mid
        else:
            lo = mid
    message = refused(lo, hi)
    return None if message is None else (lo, message)


# Bytes of the file parsed at a time. A chunk's rows as Python strings take several times its size, so
# the reader's peak memory is its output arrays plus a bounded overhead, whatever the file's length.
_CHUNK_BYTES = 1 << 24


def _text_chunks(path: str, chunk_bytes: int) -> Iterator[Tuple[int, str]]:
    """(1-based line of its first line, text) of successive pieces of the file, each ending at a newline.

    UTF-8 never uses the byte 0x0A inside a multi-byte character, so a cut after
    a newline never splits one. A decoding error is reported with its line in the
    whole file.
    """
    first_line, pending, head = 1, [], True
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if block and b"\n" not in block:
                # one line longer than a chunk: keep reading, joined once it ends (no re-join per read)
                pending.append(block)
                continue
            data = b"".join(pending) + block
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if block else len(data)
            piece, pending = data[:cut], [data[cut:]]
            yield first_line, _decode(path, piece, first_line, strip_bom=head)
            head = False
            first_line += piece.count(b"\n")
            if not block:
                return


def _parse_rows(path: str, rows: List[str], line_no: np.ndarray, sep: str, fields: Sequence[Tuple[str, str]],
                dtype: np.dtype) -> np.ndarray:
    """The structured array of ``rows``; DataFormatError with the line of the first malformed one."""
    try:
        table = _loadtxt(rows, sep, dtype)
        if table.shape[0] != len(rows):
            raise ValueError("row count")
        for name, kind in fields:
            if kind == "float" and not np.isfinite(table[name]).all():
                raise ValueError("not finite")
    except ValueError:
        _scan_for_error(path, rows, line_no, sep, fields)
        found = _first_rejected(rows, sep, dtype)
        if found is not None:
            msg = re.sub(r"\s*at row \d+, column (\d+)\.?$", r" (field \1)", found[1])
            raise DataFormatError(path, int(line_no[found[0]]), f"could not be parsed: {msg}") from None
        raise DataFormatError(path, None, "could not be parsed (no single malformed line was found)") from None
    return table


def _narrow(column: np.ndarray) -> np.ndarray:
    """``column`` (int64 or float64) in the narrowest of int32 / float32 that holds every value exactly."""
    if column.size == 0:
        return column
    if column.dtype.kind == "i":
        if np.iinfo(np.int32).min <= column.min() and column.max() <= np.iinfo(np.int32).max:
            return column.astype(np.int32)
        return column
    # times like 978300760 are whole numbers that float32 would round: int32 holds them exactly
    as_int = column.astype(np.int32) if (np.abs(column) < 2 ** 31).all() else None
    if as_int is not None and np.array_equal(as_int, column):
        return as_int
    as_f32 = column.astype(np.float32)
    return as_f32 if np.array_equal(as_f32, column) else column


def _read_table(path: str, sep: str, fields: Sequence[Tuple[str, str]], header_lines: int = 0):
    """Reads a delimited text table into one array per field, plus each row's line number.

    fields: (name, "int" | "float") per column. Returns ({name: array}, lines):
    ints in int32 where every value fits (int64 otherwise), floats in int32 or
    float32 where that loses nothing (float64 otherwise), and a
    :class:`_LineRuns`. Blank (or whitespace-only) lines are skipped. Any
    malformed line raises DataFormatError with its line number. The file is
    parsed in pieces of about ``_CHUNK_BYTES``, so memory beyond the result
    stays bounded.
    """
    dtype = np.dtype([(name, np.int64 if kind == "int" else np.float64) for name, kind in fields])
    columns: Dict[str, list] = {name: [] for name, _ in fields}
    row_starts, line_starts, n_rows = [], [], 0
    for first_line, text in _text_chunks(path, _CHUNK_BYTES):
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()  # the empty string after the piece's last newline is not a line
        skip = max(0, header_lines - (first_line - 1))
        kept = np.asarray([i for i in range(skip, len(lines)) if lines[i].strip()], dtype=np.int64)
        if not len(kept):
            continue
        rows = [lines[i] for i in kept.tolist()]
        del lines
        line_no = kept + first_line
        table = _parse_rows(path, rows, line_no, sep, fields, dtype)
        del rows
        for name, _ in fields:
            columns[name].append(_narrow(table[name]))
        del table
        # a run of consecutive lines starts at the piece's first row and after every skipped line
        breaks = np.concatenate([[0], np.flatnonzero(np.diff(line_no) != 1) + 1])
        row_starts.append(breaks + n_rows)
        line_starts.append(line_no[breaks])
        n_rows += len(line_no)
    if not n_rows:
        raise DataFormatError(path, None, "the file has no data rows" + (" (only a header)" if header_lines else
                                                                          " (it is empty)"))
    out = {}
    for name in list(columns):
        pieces = columns.pop(name)  # one column at a time, so only one is ever held twice
        out[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        del pieces
    return out, _LineRuns(np.concatenate(row_starts), np.concatenate(line_starts), n_rows)


_RECBOLE_KINDS = {"user_id": "int", "item_id": "int", "rating": "float", "timestamp": "float"}


def _read_recbole(path: str) -> _Records:
    with open(path, "rb") as f:
        first = f.readline()
    header = _decode(path, first).rstrip("\r\n")
    if not header.strip():
        raise DataFormatError(path, 1, "the file is empty" if os.path.getsize(path) == 0 else
                              "expected a header of name:type fields")
    cols = header.split("\t")
    names: list = []
    for j, c in enumerate(cols, start=1):
        if ":" not in c:
            raise DataFormatError(path, 1, f"header field {c!r} is not name:type (RecBole atomic file)")
        name = c.split(":", 1)[0].strip()
        if name in names:
            raise DataFormatError(path, 1, f"the header names the column {name!r} twice (fields "
                                           f"{names.index(name) + 1} and {j})")
        names.append(name)
    for need in ("user_id", "item_id"):
        if need not in names:
            raise DataFormatError(path, 1, f"the header has no {need} field (got {', '.join(names)})")
    extra = [n for n in names if n not in _RECBOLE_KINDS]
    if extra:  # columns of other types (tokens, sequences): read line by line
        return _read_recbole_general(path, names, extra)
    table, lines = _read_table(path, "\t", [(n, _RECBOLE_KINDS[n]) for n in names], header_lines=1)
    return _Records(table["user_id"], table["item_id"],
                    table["rating"] if "rating" in names else None,
                    table["timestamp"] if "timestamp" in names else None, lines)


def _read_recbole_general(path: str, names: Sequence[str], extra: Sequence[str]) -> _Records:
    """A .inter file with columns beyond user, item, rating and time: those are checked for count only."""
    kinds = _RECBOLE_KINDS
    users, items, ratings, times, lines = [], [], [], [], []
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    for no, line in enumerate(text.split("\n")[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(names):
            raise DataFormatError(path, no, f"expected {len(names)} tab-separated fields, got {len(parts)}")
        rec = {}
        for name, tok in zip(names, parts):
            kind = kinds.get(name)
            if kind == "int":
                rec[name] = _check_int(path, no, name, tok.strip())
            elif kind == "float":
                rec[name] = _check_float(path, no, name, tok)
        users.append(rec["user_id"])
        items.append(rec["item_id"])
        ratings.append(rec.get("rating", np.nan))
        times.append(rec.get("timestamp", np.nan))
        lines.append(no)
    if not users:
        raise DataFormatError(path, None, "the file has no data rows (only a header)")
    log.info("%s: ignoring the columns %s", path, ", ".join(extra))
    return _Records(np.asarray(users, np.int64), np.asarray(items, np.int64),
                    np.asarray(ratings) if "rating" in names else None,
                    np.asarray(times) if "timestamp" in names else None, np.asarray(lines))


_RATING_FIELDS = [("user id", "int"), ("item id", "int"), ("rating", "float"), ("timestamp", "float")]


def _read_movielens(path: str, kind: str) -> Tuple[_Records, Optional[Dict[str, int]]]:
    sep = "::" if kind == "movielens-dat" else "\t"
    table, lines = _read_table(path, sep, _RATING_FIELDS)
    declared = _read_u_info(os.path.join(os.path.dirname(path), "u.info")) if kind == "movielens-100k" else None
    return _Records(table["user id"], table["item id"], table["rating"], table["timestamp"], lines), declared


def _read_u_info(path: str) -> Optional[Dict[str, int]]:
    """ML-100K's u.info: "943 users", "1682 items", "100000 ratings"."""
    if not os.path.exists(path):
        return None
    _regular_file(path)
    declared = {}
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    for no, line in enumerate(text.split("\n"), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not re.fullmatch(r"[0-9]+", parts[0]):
            raise DataFormatError(path, no, f"expected '<count> users|items|ratings', got {line.strip()[:80]!r}")
        declared[parts[1]] = int(parts[0])
    return declared


def _check_declared(path: str, rec: _Records, declared: Optional[Dict[str, int]], source: str) -> None:
    """Ids of a 1-based MovieLens file must lie in 1..n as declared."""
    if not declared:
        return
    for what, ids in (("users", rec.users), ("items", rec.items)):
        n = declared.get(what)
        if n is None:
            continue
        bad = np.flatnonzero((ids < 1) | (ids > n))
        if len(bad):
            i = bad[0]
            raise DataFormatError(path, int(rec.lines[i]), f"{what[:-1]} id {int(ids[i])} is outside the declared "
                                                           f"range 1..{n} ({source})")


# --- from records to the split ----------------------------------------------------------------

def _fractions(split: Sequence[float]) -> Tuple[float, float, float]:
    if len(split) != 3 or any((not isinstance(f, (int, float))) or f < 0 for f in split) or sum(split) <= 0:
        raise ValueError(f"split must be three non-negative fractions (train, valid, test), got {split!r}")
    total = float(sum(split))
    return tuple(float(f) / total for f in split)  # type: ignore[return-value]


def _dense_codes(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted distinct ids as int64, each id's index among them as int32): ``np.unique`` with its inverse.

    Ids within a range of a few times their count (every real id space) are
    coded through a lookup table in linear time, without sorting N values.
    """
    if ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    low, high = int(ids.min()), int(ids.max())
    if high - low < max(4 * ids.size, 1 << 20):
        shifted = ids - low
        present = np.zeros(high - low + 1, dtype=bool)
        present[shifted] = True
        codes = (np.cumsum(present, dtype=np.int32) - 1)[shifted]
        return np.flatnonzero(present).astype(np.int64) + low, codes
    distinct, codes = np.unique(ids, return_inverse=True)
    return distinct.astype(np.int64), codes.reshape(-1).astype(np.int32)


def _recode(codes: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Codes into ``used``'s True positions renumbered 0.. in order (for codes that are all used)."""
    return (np.cumsum(used, dtype=np.int32) - 1)[codes]


def _latest_per_pair(u: np.ndarray, i: np.ndarray, n_items: int, order_key: Optional[np.ndarray]
                     ) -> Optional[np.ndarray]:
    """Mask of the latest record (by time, then file order) of each (user, item) pair; None if all are distinct."""
    pair = u.astype(np.int64) * n_items + i
    pair.sort()  # sorted in place: only its equal neighbours matter here
    if not (pair[1:] == pair[:-1]).any():
        return None
    del pair
    pair = u.astype(np.int64) * n_items + i
    n = len(pair)
    chrono = np.arange(n) if order_key is None else np.argsort(order_key, kind="stable")
    latest = chrono[::-1]
    _, first = np.unique(pair[latest], return_index=True)
    keep = np.zeros(n, dtype=bool)
    keep[latest[first]] = True
    return keep


def _split_csr(u: np.ndarray, i: np.ndarray, values: Optional[np.ndarray], key: np.ndarray, fractions,
               n_users: int, n_items: int):
    """Train / valid / test matrices of distinct (u, i) pairs, each user's split by its order of ``key``.

    A user with n interactions gets round(f_train * n) train ones and
    round((f_train + f_valid) * n) train + valid ones (halves round up): the
    earliest to train, the latest to test; equal keys keep the array order.
    Returns ([binary CSR] * 3, [CSR of ``values``] * 3 or Nones).
    """
    order = np.lexsort((key, u))  # by user, then key, then array order
    i_sorted = i[order]
    v_sorted = None if values is None else values[order].astype(np.float32, copy=False)
    del order
    counts = np.bincount(u, minlength=n_users)
    cut1 = np.floor(fractions[0] * counts + 0.5 + 1e-9).astype(np.int64)
    cut2 = np.floor((fractions[0] + fractions[1]) * counts + 0.5 + 1e-9).astype(np.int64)
    per_part = np.stack([cut1, cut2 - cut1, counts - cut2], axis=1)  # (n_users, 3)
    # each user's records, in key order, are its train ones, then its valid ones, then its test ones
    part = np.repeat(np.tile(np.arange(3, dtype=np.int8), n_users), per_part.reshape(-1))
    mats, rated = [], []
    for p in range(3):
        chosen = part == p
        indptr = np.concatenate([[0], np.cumsum(per_part[:, p])])
        indices = i_sorted[chosen]
        data = np.ones(len(indices), np.float32) if v_sorted is None else v_sorted[chosen]
        m = sp.csr_matrix((data, indices, indptr), shape=(n_users, n_items))
        m.sort_indices()  # each row's items in order (data travels with them)
        if v_sorted is not None:
            rated.append(m)
            m = sp.csr_matrix((np.ones(m.nnz, np.float32), m.indices.copy(), m.indptr.copy()),
                              shape=(n_users, n_items))
            m.has_sorted_indices = True
        mats.append(m)
    return mats, (rated if v_sorted is not None else [None, None, None])


def _build(rec: _Records, name: str, path: str, *, min_rating: Optional[float] = DEFAULT_MIN_RATING,
           split: Sequence[float] = DEFAULT_SPLIT, split_mode: str = "time", seed: int = 0,
           consume: bool = False) -> InteractionData:
    """The dataset of ``rec``: dense ids, the latest record of each (user, item) pair, ratings filtered, split.

    consume: drop ``rec``'s columns as soon as they are used (the loader's
    own records), so that they are not held beside the matrices they become.
    """
    fractions = _fractions(split)
    if split_mode not in ("time", "random"):
        raise ValueError(f"split_mode must be 'time' or 'random', got {split_mode!r}")
    n_read = len(rec.users)
    users_all, u = _dense_codes(rec.users)
    items_all, i = _dense_codes(rec.items)
    ratings, times = rec.ratings, rec.times
    if consume:
        rec.users = rec.items = rec.ratings = rec.times = None
    # Duplicates of a (user, item) pair: the latest record (by time, then file order) wins.
    keep = _latest_per_pair(u, i, len(items_all), times)
    n_dup = 0 if keep is None else n_read - int(keep.sum())
    n_low = 0
    if ratings is not None and min_rating is not None:
        low = ratings < min_rating
        if keep is not None:
            low &= keep
        n_low = int(low.sum())
        if n_low:
            keep = ~low if keep is None else keep & ~low
        del low
    if keep is not None and not keep.any():
        raise ValueError(f"{path}: no interaction is left after filtering (read {n_read}, duplicates {n_dup}, "
                         f"ratings below {min_rating}: {n_low})")
    if keep is None:
        user_ids, item_ids = users_all, items_all
    else:
        u, i = u[keep], i[keep]
        used_u = np.zeros(len(users_all), dtype=bool)
        used_u[u] = True
        used_i = np.zeros(len(items_all), dtype=bool)
        used_i[i] = True
        user_ids, item_ids = users_all[used_u], items_all[used_i]
        u, i = _recode(u, used_u), _recode(i, used_i)
        if ratings is not None:
            ratings = ratings[keep]
        if times is not None:
            times = times[keep]
    n_users, n_items = len(user_ids), len(item_ids)
    n_kept = len(u)
    if ratings is not None:
        # One record per (user, item) is left, so each CSR has exactly its split's pattern.
        ratings = ratings.astype(np.float32, copy=False)
        if not np.isfinite(ratings).all():
            raise ValueError(f"{path}: a kept rating is not a finite number")
    if split_mode == "time":
        if times is None:
            log.warning("%s: no timestamps; the file order is taken as time order for the split", path)
        # Ties in time keep the file order (lexsort is stable and records are in file order).
        key = times if times is not None else np.arange(n_kept)
    else:
        key = np.random.default_rng(seed).permutation(n_kept)
    mats, rated = _split_csr(u, i, ratings, key, fractions, n_users, n_items)
    summary = {
        "read": n_read,
        "duplicates": n_dup,
        "below_min_rating": n_low,
        "users_dropped": len(users_all) - n_users,
        "items_dropped": len(items_all) - n_items,
        "kept": n_kept,
        "train": mats[0].nnz,
        "valid": mats[1].nnz,
        "test": mats[2].nnz,
    }
    _log_summary(name, summary, min_rating if ratings is not None else None)
    return InteractionData(name, n_users, n_items, *mats, user_ids, item_ids, summary, *rated)


def _log_summary(name: str, s: Dict[str, int], min_rating: Optional[float]) -> None:
    parts = [f"read {s['read']} interactions"]
    parts.append(f"dropped {s['duplicates']} duplicate (user, item) pairs (the latest kept)")
    if min_rating is not None:
        parts.append(f"{s['below_min_rating']} ratings below {min_rating:g}")
    if s["users_dropped"] or s["items_dropped"]:
        parts.append(f"{s['users_dropped']} users and {s['items_dropped']} items with nothing left")
    parts.append(f"kept {s['kept']}: train {s['train']}, valid {s['valid']}, test {s['test']}")
    log.info("%s: %s", name, "; ".join(parts))


def _load_file(path: str, kind: str, options: Dict[str, Any], name: Optional[str] = None) -> InteractionData:
    _refuse_unknown(f"{path} ({kind} file)", options, ("min_rating", "split", "split_mode", "seed"))
    _regular_file(path)
    if kind == "recbole":
        rec = _read_recbole(path)
        declared = None
    else:
        rec, declared = _read_movielens(path, kind)
        _check_declared(path, rec, declared, "u.info")
    return _build(rec, name or path, path, consume=True, **options)


# --- DiffRec splits ----------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_COLUMNS = ("user", "item")


def _not_npy(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return ("not a NumPy .npy array: it is a zip archive, as np.savez writes (.npz); save each split "
                "with np.save")
    if head[:1] == b"\x80":
        return "not a NumPy .npy array: it is a Python pickle, which is never unpickled (that could run code)"
    return f"not a NumPy .npy array (it starts with {head!r})"


def _read_npy_header(f, version) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    if version == (1, 0):
        return fmt.read_array_header_1_0(f)
    if version == (2, 0):
        return fmt.read_array_header_2_0(f)
    return fmt._read_array_header(f, version)  # 3.0 (a UTF-8 header) has no public reader


def _read_pairs(path: str) -> np.ndarray:
    """An (n, 2) int64 array of non-negative (user, item) ids.

    The .npy header is checked first (shape, dtype, and that the file holds
    the data it announces), so that nothing is allocated for a damaged file
    and nothing is ever unpickled.
    """
    size = _regular_file(path)
    if size == 0:
        raise DataFormatError(path, None, "the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            raise DataFormatError(path, None, _not_npy(head))
        f.seek(0)
        try:
            shape, _, dtype = _read_npy_header(f, np.lib.format.read_magic(f))
        except (ValueError, OSError, EOFError, SyntaxError, UnicodeError) as exc:
            raise DataFormatError(path, None, f"not a NumPy .npy array: its header is truncated or damaged "
                                              f"({exc})") from None
        data_start = f.tell()
    if dtype.hasobject:
        raise DataFormatError(path, None, f"holds Python objects (dtype {dtype}), not integer ids; it is not "
                                          "unpickled (that could run code)")
    if len(shape) != 2 or shape[1] != 2:
        raise DataFormatError(path, None, f"expected an (n, 2) array of (user, item) pairs, got shape {shape}")
    if dtype.kind not in "iu":
        raise DataFormatError(path, None, f"expected integer ids, got dtype {dtype}")
    if shape[0] == 0:
        raise DataFormatError(path, None, "the array has no pairs")
    need = shape[0] * 2 * dtype.itemsize
    if size - data_start < need:
        raise DataFormatError(path, None, f"the file is truncated: its header announces {shape[0]} pairs of "
                                          f"{dtype} ({need} bytes), it holds {size - data_start} bytes of data")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataFormatError(path, None, f"not a readable NumPy .npy array ({exc})") from None
    if a.dtype.kind == "i":
        neg = np.flatnonzero((a < 0).any(axis=1))
        if len(neg):
            raise DataFormatError(path, int(neg[0]), f"negative id in pair {a[neg[0]].tolist()}", what="row")
    big = np.flatnonzero((a > np.iinfo(np.int64).max).any(axis=1)) if a.dtype == np.uint64 else []
    if len(big):
        row = a[big[0]]
        col = int(np.argmax(row > np.iinfo(np.int64).max))
        raise DataFormatError(path, int(big[0]), f"{_COLUMNS[col]} id {int(row[col])} is out of range (ids must "
                                                 "fit in a 64-bit signed integer)", what="row")
    return a.astype(np.int64, copy=False)


def _check_id_space(parts: Dict[str, Tuple[str, np.ndarray]], col: int) -> int:
    """The id space of one column (largest id + 1), refused when it is far larger than the ids in use."""
    what = _COLUMNS[col]
    largest = max(int(a[:, col].max()) for _, a in parts.values())
    if largest + 1 <= DENSE_ID_FLOOR:
        return largest + 1
    distinct = len(np.unique(np.concatenate([a[:, col] for _, a in parts.values()])))
    limit = max(DENSE_ID_FACTOR * distinct, DENSE_ID_FLOOR)
    if largest + 1 <= limit:
        return largest + 1
    for path, a in parts.values():
        bad = np.flatnonzero(a[:, col] >= limit)
        if len(bad):
            raise DataFormatError(
                path, int(bad[0]), f"{what} id {int(a[bad[0], col])} is far above the {distinct} distinct {what} "
                f"ids of the three files: DiffRec's ids are dense indices 0..n-1, so without a declared size "
                f"ids below max({DENSE_ID_FACTOR} x distinct ids, {DENSE_ID_FLOOR}) = {limit} are accepted. "
                f"Pass n_{what}s= to declare a larger id space", what="row")
    raise AssertionError("unreachable: the largest id lies in one of the files")


def _load_diffrec(folder: str, *, n_users: Optional[int] = None, n_items: Optional[int] = None,
                  **options) -> InteractionData:
    _refuse_unknown(f"{folder} (a DiffRec folder: already split, without ratings)", options, ("n_users", "n_items"))
    parts = {}
    for split in ("train", "valid", "test"):
        path = os.path.join(folder, f"{split}_list.npy")
        parts[split] = (path, _read_pairs(path))
    for what, col, declared in (("user", 0, n_users), ("item", 1, n_items)):
        if declared is None:
            continue
        if isinstance(declared, bool) or not isinstance(declared, (int, np.integer)) or declared < 1:
            raise ValueError(f"{folder}: n_{what}s must be a positive int, got {declared!r}")
        # Each split's CSR holds n_users + 1 row offsets and the data set n_users + n_items original ids,
        # all int64: refused here rather than by a MemoryError inside scipy.
        need = (4 * (int(declared) + 1) if col == 0 else int(declared) + 1) * 8
        if need > MAX_DATA_BYTES:
            raise ValueError(f"{folder}: n_{what}s={declared} would take {_bytes(need)} for the {what} id space "
                             f"alone, more than {_bytes(MAX_DATA_BYTES)} (refit.data.formats.MAX_DATA_BYTES)")
        for path, a in parts.values():
            bad = np.flatnonzero(a[:, col] >= declared)
            if len(bad):
                raise DataFormatError(path, int(bad[0]), f"{what} id {int(a[bad[0], col])} is outside the declared "
                                                         f"range 0..{declared - 1}", what="row")
    nu = n_users if n_users is not None else _check_id_space(parts, 0)
    ni = n_items if n_items is not None else _check_id_space(parts, 1)
    mats, dups = {}, 0
    for split, (path, a) in parts.items():
        mats[split] = binary_csr(a[:, 0], a[:, 1], nu, ni)
        dups += a.shape[0] - mats[split].nnz
    overlap = int(mats["train"].multiply(mats["test"]).nnz + mats["train"].multiply(mats["valid"]).nnz)
    if overlap:
        log.warning("%s: %d (user, item) pairs appear in train and in valid or test", folder, overlap)
    summary = {"read": sum(a.shape[0] for _, a in parts.values()), "duplicates": dups, "below_min_rating": 0,
               "users_dropped": 0, "items_dropped": 0, "kept": sum(m.nnz for m in mats.values()),
               "train": mats["train"].nnz, "valid": mats["valid"].nnz, "test": mats["test"].nnz}
    _log_summary(folder, summary, None)
    return InteractionData(folder, nu, ni, mats["train"], mats["valid"], mats["test"],
                           np.arange(nu, dtype=np.int64), np.arange(ni, dtype=np.int64), summary)


# --- synthetic data ----------------------------------------------------------------------------

def synthetic_interactions(n_users: int = 600, n_items: int = 400, *, n_clusters: int = 6,
                           mean_interactions: float = 30.0, popularity_exponent: float = 0.8,
                           taste_strength: float = 3.0, seed: int = 0) -> _Records:
    """Interactions with learnable structure, as records (all positive, with times).

    Every item has a popularity (Zipf-like, ``rank ** -popularity_exponent``)
    and belongs to one of ``n_clusters`` tastes; every user has one taste. A
    user picks items without replacement with probability proportional to
    popularity times ``exp(taste_strength)`` for items of the user's taste
    (1 otherwise). Activity is skewed too: the number of interactions per
    user is log-normal around ``mean_interactions``. Times are random, so the
    time split is a random one.
    """
    if n_users < 1 or n_items < 2 or n_clusters < 1:
        raise ValueError(f"synthetic: need n_users >= 1, n_items >= 2, n_clusters >= 1, got "
                         f"{n_users}, {n_items}, {n_clusters}")
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(np.arange(1, n_items + 1, dtype=np.float64) ** -popularity_exponent)
    item_taste = rng.integers(0, n_clusters, size=n_items)
    user_taste = rng.integers(0, n_clusters, size=n_users)
    counts = np.clip(np.round(rng.lognormal(math.log(mean_interactions), 0.5, size=n_users)), 3, n_items // 2)
    users, items = [], []
    for u in range(n_users):
        w = popularity * np.where(item_taste == user_taste[u], math.exp(taste_strength), 1.0)
        chosen = rng.choice(n_items, size=int(counts[u]), replace=False, p=w / w.sum())
        users.append(np.full(len(chosen), u, dtype=np.int64))
        items.append(chosen.astype(np.int64))
    users_a, items_a = np.concatenate(users), np.concatenate(items)
    times = rng.random(len(users_a))
    return _Records(users_a, items_a, None, times, np.arange(1, len(users_a) + 1))


def _load_synthetic(*, split: Sequence[float] = DEFAULT_SPLIT, split_mode: str = "time", seed: int = 0,
                    **generator) -> InteractionData:
    takes = [n for n in inspect.signature(synthetic_interactions).parameters if n != "seed"]
    _refuse_unknown("synthetic", generator, ["split", "split_mode", "seed"] + takes)
    rec = synthetic_interactions(seed=seed, **generator)
    return _build(rec, "synthetic", "synthetic", min_rating=None, split=split, split_mode=split_mode, seed=seed)
