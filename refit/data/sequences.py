"""Sequential recommendation data: time-ordered item sequences and leave-one-out targets.

INTERFACE (implemented by this module; other modules program against it):

Every data set becomes a set of *sequences* (a user's history, or a session),
each a list of item ids in time order, concatenated into one flat array, and
a split saying which positions of which sequences are prediction targets of
the training, validation and test splits. A target at position p of
sequence s is predicted from the items at positions < p of s (its history);
models see the last ``max_len`` of them (a window).

* ``ml-1m_seq/dataset.pkl`` (DiffuRec / ICLRec / DuoRec format): sequence u is
  ``train[u] + val[u] + test[u]``; training targets are positions
  1 .. len(train[u]) - 1, the validation target position len(train[u]), the
  test target the last position. One sequence per user.
* DreamRec ``.df`` folders (``train_data.df``, ``val_data.df``,
  ``test_data.df``, ``data_statis.df``): every row is one prediction (a
  window ``seq`` of the last ``seq_size`` items right-padded with the id
  ``item_num``, its length ``seq_len`` / ``len_seq``, the target ``tgt`` /
  ``next``); the rows of one session are consecutive, a session starting at
  a row whose window is all padding. Sessions are rebuilt from the rows;
  every target of a training-file session is a training target, and so on.
  A row whose window does not continue the previous row starts a new
  sequence, so any file loads.
* PreferDiff ``.txt`` folders (``train_data.txt``, ``valid_data.txt``,
  ``test_data.txt``): one user per line, item ids separated by whitespace,
  oldest first, each user in one file (split by user, not leave-one-out).
  The target of a line is its last id; by default every id after the first
  of a training-file line is a training target, as leave-one-out data
  trains (``train_targets="last"``: its last id only, as PreferDiff trains);
  validation and test targets are the last id of each line of their file.

Item ids are re-indexed to 0 .. n_items - 1 (``item_ids`` maps back);
``n_items`` is the padding id of history windows.

Details of the loaders (:func:`load_sequences`):

* ``dataset.pkl``: the items are those of ``smap`` (when present) and of the
  sequences, re-indexed in increasing id order; ``sequence_ids`` holds each
  sequence's user id. ``val[u]`` and ``test[u]`` must hold one item each and
  ``train[u]`` at least one.
* DreamRec folders keep DreamRec's ids: ``n_items`` is ``item_num`` of
  ``data_statis.df`` (items that never occur stay, as DreamRec ranks them)
  and ``item_ids`` is ``arange(item_num)``. The sequences of the training
  file come first, then those of the validation and the test file; the
  targets of each split are in the order of the file's rows (target i of
  ``"valid"`` is row i of ``val_data.df``). DreamRec stores ``seq_len`` 1 for
  an all-padding window; :meth:`SequenceData.windows` says 0 there. Two
  training sessions of DreamRec's Zhihu repeat an item, so its ``repeats`` is
  True and evaluation keeps the history in the ranking by default.
* PreferDiff folders keep PreferDiff's id space: ids are 1-based (0 pads in
  its code), item i is the id i + 1, ``n_items`` is the largest id (its
  ``item_num``) and ids that never occur stay; a file that holds the id 0 is
  read as 0-based. See :func:`load_sequences` for what is refused.
* ``"synthetic-seq"``: :func:`synthetic_sequences` with a leave-one-out split.

Pickles are never read with plain ``pickle``: ``dataset.pkl`` goes through
an unpickler that admits no class or function but ``builtins`` ``dict``,
``list`` and ``int``, and ``.df`` files through one that admits an exact
list of pandas and NumPy (module, name) pairs, checks the arguments of every
call and the state of every object it builds, and accepts Python objects
inside arrays only as strings (column names) and lists of numbers (the
``seq`` cells). Anything else raises :class:`refit.data.DataFormatError`
naming the file, before any of it runs.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import re
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from refit_kernels.sparse import CSR

from .formats import (DENSE_ID_FACTOR, DENSE_ID_FLOOR, MAX_DATA_BYTES, DataFormatError, _bytes, _decode,
                      _refuse_unknown, binary_csr)
from .safe_pickle import _ID_TYPES, _kind, _read_bytes, read_dataframe, read_plain_pickle  # noqa: F401  (importable here)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SYNTHETIC = "synthetic-seq"
PKL_NAME = "dataset.pkl"
DREAMREC_FILES = {"train": "train_data.df", "valid": "val_data.df", "test": "test_data.df"}
DREAMREC_STATS = "data_statis.df"
PREFERDIFF_FILES = {"train": "train_data.txt", "valid": "valid_data.txt", "test": "test_data.txt"}
#: What a PreferDiff folder's training split holds as targets: ``"last"`` (PreferDiff's: the last id of each
#: line, predicted from the ids before it) or ``"all"`` (every id after the first of each line).
PREFERDIFF_TRAIN_TARGETS = ("last", "all")
#: PreferDiff reports Recall and NDCG at 5 and 10 (``topk: [5,10]`` of its ``default.yaml``).
PREFERDIFF_KS = (5, 10)
#: The ks of the "full" and "dreamrec" protocols when none are given.
DEFAULT_KS = (10, 20, 50)
PROTOCOLS = ("full", "dreamrec", "preferdiff")
DEFAULT_MAX_LEN = 10
#: DreamRec ranks the top 100 items of every row (``prediction.topk(100)``) and scores batches of 100 rows.
DREAMREC_TOPK = 100
DREAMREC_BATCH = 100



def check_window(max_len: int, rows: int, where: str = "", option: str = "max_len") -> None:
    """Refuses a window length whose history windows, ``rows`` of them (rows x max_len int64), would
    take more than ``refit.data.formats.MAX_DATA_BYTES``: a ValueError naming the option, its value and the
    bytes, instead of an allocation failure later. ``where`` (a file or data set) prefixes the message."""
    need = int(rows) * int(max_len) * 8
    if need > MAX_DATA_BYTES:
        raise ValueError(f"{where + ': ' if where else ''}{option}={max_len} would take {_bytes(need)} for the "
                         f"history windows ({rows} windows x {max_len} items x 8 bytes), more than "
                         f"{_bytes(MAX_DATA_BYTES)} (refit.data.formats.MAX_DATA_BYTES)")


@dataclass
class Targets:
    """The prediction targets of one split: for each, its sequence and position.

    Attributes:
        seq: (n,) int64 sequence id of each target.
        pos: (n,) int64 position of the target item in its sequence (>= 0;
            position 0 has an empty history).
    """

    seq: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return int(self.seq.numel())

    def __getitem__(self, index) -> "Targets":
        """The targets at ``index`` (a slice, or an index tensor / array), as a :class:`Targets`."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.int64)
        return Targets(self.seq[index], self.pos[index])


@dataclass
class SequenceData:
    """Sequences of items in time order and the train / valid / test targets.

    Attributes:
        n_items: number of items; ids 0 .. n_items - 1; ``n_items`` pads windows.
        items: (N,) int64 every sequence's items, concatenated in sequence order.
        offsets: (n_sequences + 1,) int64; sequence s is ``items[offsets[s]:offsets[s + 1]]``.
        targets: {"train", "valid", "test"} -> :class:`Targets`.
        max_len: default window length (DreamRec: 10).
        train: (n_sequences, n_items) scipy CSR float32, binary, sorted unique
            indices: the items of each sequence that precede its first
            validation or test target and are training targets or their
            history (what a model may train on): the input of similar users
            and of the CF baselines.
        item_ids: (n_items,) original item id of each item (as in the file).
        name: a short name of the source (folder or file name).
        repeats: whether an item can occur twice in one sequence (it does not
            in ml-1m_seq); evaluation excludes the history by default only when
            it cannot.
        summary: counts of what was read (sequences, targets per split, items,
            sequence lengths, ...).
        sequence_ids: (n_sequences,) int64 where each sequence came from: the
            user id of ``dataset.pkl``, the row of its first prediction in its
            ``.df`` file, the sequence number of synthetic data.
    """

    n_items: int
    items: torch.Tensor
    offsets: torch.Tensor
    targets: Dict[str, Targets]
    max_len: int = 10
    train: Optional[sp.csr_matrix] = None
    item_ids: Optional[np.ndarray] = None
    name: str = ""
    repeats: bool = False
    summary: Dict[str, object] = field(default_factory=dict)
    sequence_ids: Optional[np.ndarray] = None

    @property
    def n_sequences(self) -> int:
        return int(self.offsets.numel()) - 1

    # n_users: the rows of ``train`` (sequences), for code written for InteractionData.
    @property
    def n_users(self) -> int:
        return self.n_sequences

    @property
    def lengths(self) -> torch.Tensor:
        """(n_sequences,) int64 the length of each sequence."""
        return self.offsets[1:] - self.offsets[:-1]

    def __repr__(self) -> str:
        counts = ", ".join(f"{s} {len(self.targets[s])}" for s in SPLITS if s in self.targets)
        return (f"SequenceData({self.name!r}: {self.n_sequences} sequences, {self.n_items} items, "
                f"{int(self.items.numel())} interactions; targets {counts}; repeats={self.repeats})")

    # --- indexing -------------------------------------------------------------------------------------

    def _targets_args(self, seq, pos, *, allow_end: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """seq, pos as (B,) int64 tensors on the items' device, checked against the sequences."""
        dev = self.items.device
        seq = torch.as_tensor(seq).to(device=dev, dtype=torch.int64).reshape(-1)
        pos = torch.as_tensor(pos).to(device=dev, dtype=torch.int64).reshape(-1)
        if seq.shape != pos.shape:
            raise ValueError(f"seq and pos must have the same length, got {seq.numel()} and {pos.numel()}")
        if seq.numel() == 0:
            return seq, pos
        S = self.n_sequences
        if int(seq.min()) < 0 or int(seq.max()) >= S:
            bad = int(torch.nonzero((seq < 0) | (seq >= S))[0])
            raise IndexError(f"seq[{bad}] = {int(seq[bad])} is out of range for {S} sequences")
        length = self.offsets[seq + 1] - self.offsets[seq]
        too_far = (pos < 0) | ((pos > length) if allow_end else (pos >= length))
        if bool(too_far.any()):
            bad = int(torch.nonzero(too_far)[0])
            limit = "0 .. length" if allow_end else "0 .. length - 1"
            raise IndexError(f"pos[{bad}] = {int(pos[bad])} is out of range for sequence {int(seq[bad])} of length "
                             f"{int(length[bad])} (positions {limit})")
        return seq, pos

    def windows(self, seq: torch.Tensor, pos: torch.Tensor, max_len: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """History windows of targets, without a Python loop over rows.

        Args:
            seq, pos: (B,) int64 targets (sequence id, position). ``pos`` may
                also be the length of the sequence (the window after its last item).
            max_len: window length L (default ``self.max_len``).

        Returns:
            (history (B, L) int64, lengths (B,) int64): the last
            ``min(pos, L)`` items before each target, oldest first, left-aligned
            and right-padded with ``n_items`` (DreamRec's layout).
        """
        L = self.max_len if max_len is None else int(max_len)
        if L < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        seq, pos = self._targets_args(seq, pos, allow_end=True)
        check_window(L, seq.numel(), self.name)
        n = pos.clamp(max=L)
        first = self.offsets[seq] + pos - n  # flat index of the oldest item in the window
        slots = torch.arange(L, device=seq.device)
        real = slots[None, :] < n[:, None]
        flat = (first[:, None] + slots[None, :]).clamp(max=max(int(self.items.numel()) - 1, 0))
        history = torch.where(real, self.items[flat], torch.full_like(flat, self.n_items))
        return history, n

    def target_items(self, t: Targets) -> torch.Tensor:
        """(n,) int64 the item at each target."""
        seq, pos = self._targets_args(t.seq, t.pos, allow_end=False)
        return self.items[self.offsets[seq] + pos]

    def history_csr(self, t: Targets):
        """Every item before each target in its sequence (not only the window), as a
        ``refit_kernels.CSR`` with one row per target: what evaluation excludes.

        Returns:
            a :class:`refit_kernels.CSR` with ``len(t)`` rows and ``n_items``
            columns: int64 ``indptr`` / ``indices``, column ids sorted and
            unique within a row (an item repeated in the history counts once),
            no values (all ones). Its size is the sum of the targets'
            positions: build it per batch for long sequences.
        """
        seq, pos = self._targets_args(t.seq, t.pos, allow_end=True)
        B = int(seq.numel())
        dev = seq.device
        total = int(pos.sum()) if B else 0
        row = torch.repeat_interleave(torch.arange(B, device=dev), pos)
        row_start = torch.cumsum(pos, 0) - pos
        within = torch.arange(total, device=dev) - torch.repeat_interleave(row_start, pos)
        cols = self.items[torch.repeat_interleave(self.offsets[seq], pos) + within]
        key = torch.unique(row * self.n_items + cols)  # sorted: by row, then item
        counts = torch.bincount(key // self.n_items, minlength=B) if B else torch.zeros(0, dtype=torch.int64)
        indptr = torch.zeros(B + 1, dtype=torch.int64, device=dev)
        torch.cumsum(counts, 0, out=indptr[1:])
        return CSR(indptr, key % self.n_items, None, self.n_items)

    def batches(self, split: str = "train", batch_size: int = 256, *, shuffle: bool = True, seed: int = 0,
                max_len: Optional[int] = None, drop_last: bool = False) -> "SequenceBatches":
        """Iterates over (history (B, L), lengths (B,), targets (B,), seq (B,)) batches of a split's
        targets; with ``shuffle``, each iteration (epoch) in its own order drawn from (seed, epoch);
        ``set_epoch(e)`` on the returned object sets the epoch.

        See :class:`SequenceBatches`. ``drop_last`` skips a last, smaller batch (kept by default).
        """
        return SequenceBatches(self, split, batch_size, shuffle=shuffle, seed=seed, max_len=max_len,
                               drop_last=drop_last)


class SequenceBatches:
    """Batches of one split's targets with their history windows.

    Each iteration is one epoch; with ``shuffle`` the targets come in an order
    drawn from ``(seed, epoch)`` (NumPy's ``default_rng([seed, epoch])``), so
    every epoch differs and every run repeats. The epoch counter starts at 0
    and advances at each ``iter()``; :meth:`set_epoch` sets it. Without
    ``shuffle`` the targets come in split order. Every target appears once
    per epoch; the last batch may be smaller unless ``drop_last``.

    Yields:
        history: (B, L) int64 windows (:meth:`SequenceData.windows`);
        lengths: (B,) int64 items in each window;
        targets: (B,) int64 the item to predict;
        seq: (B,) int64 the sequence of each target.
    """

    def __init__(self, data: SequenceData, split: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 max_len: Optional[int] = None, drop_last: bool = False):
        if split not in data.targets:
            raise ValueError(f"split must be one of {', '.join(data.targets)}, got {split!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data, self.split, self.batch_size = data, split, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.max_len = data.max_len if max_len is None else int(max_len)
        self.targets = data.targets[split]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """(n,) int64 indices into the split's targets, in the order of ``epoch``."""
        n = len(self.targets)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.from_numpy(self.order(self.epoch))
        self.epoch += 1
        d, t = self.data, self.targets
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            seq, pos = t.seq[idx], t.pos[idx]
            history, lengths = d.windows(seq, pos, self.max_len)
            yield history, lengths, d.items[d.offsets[seq] + pos], seq


# --- building a SequenceData ------------------------------------------------------------------------------

def _within(offsets: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sequence of each flat position, position within its sequence), both (N,) int64."""
    lengths = np.diff(offsets)
    seq_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    return seq_of, np.arange(offsets[-1], dtype=np.int64) - offsets[:-1][seq_of]


def _assemble(name: str, items: np.ndarray, offsets: np.ndarray, targets: Dict[str, Tuple[np.ndarray, np.ndarray]],
              n_items: int, item_ids: np.ndarray, max_len: int, sequence_ids: np.ndarray,
              extra: Optional[Dict[str, object]] = None) -> SequenceData:
    """A SequenceData from dense item ids (N,), offsets (S + 1,) and per-split (seq, pos) targets."""
    # Every target's window is what the models and SASRec's training windows build: the default
    # window length is checked against the targets read, for any source and wherever max_len came from.
    check_window(max_len, sum(len(targets[s][0]) for s in SPLITS), name)
    S = len(offsets) - 1
    lengths = np.diff(offsets)
    seq_of, within = _within(offsets)
    # The training part of a sequence: up to its last training target, and before its first
    # validation or test target.
    cut = np.zeros(S, dtype=np.int64)
    np.maximum.at(cut, targets["train"][0], targets["train"][1] + 1)
    for split in ("valid", "test"):
        seq, pos = targets[split]
        np.minimum.at(cut, seq, pos)
    keep = within < cut[seq_of]
    train = binary_csr(seq_of[keep], items[keep], S, n_items)
    key = np.sort(seq_of * n_items + items)
    dup = key[1:] == key[:-1]
    with_repeats = len(np.unique(key[1:][dup] // n_items)) if dup.any() else 0
    summary: Dict[str, object] = {
        "sequences": S,
        "items": n_items,
        "items_occurring": int(len(np.unique(items))),
        "interactions": int(offsets[-1]),
        "train_interactions": int(train.nnz),
        "targets_train": int(len(targets["train"][0])),
        "targets_valid": int(len(targets["valid"][0])),
        "targets_test": int(len(targets["test"][0])),
        "length_min": int(lengths.min()) if S else 0,
        "length_median": float(np.median(lengths)) if S else 0.0,
        "length_mean": float(lengths.mean()) if S else 0.0,
        "length_max": int(lengths.max()) if S else 0,
        "repeats": bool(with_repeats),
        "sequences_with_repeats": int(with_repeats),
    }
    summary.update(extra or {})
    data = SequenceData(
        n_items=int(n_items),
        items=torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64)),
        offsets=torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.int64)),
        targets={s: Targets(torch.from_numpy(np.ascontiguousarray(targets[s][0], dtype=np.int64)),
                            torch.from_numpy(np.ascontiguousarray(targets[s][1], dtype=np.int64))) for s in SPLITS},
        max_len=int(max_len), train=train, item_ids=np.asarray(item_ids, dtype=np.int64), name=name,
        repeats=bool(with_repeats), summary=summary, sequence_ids=np.asarray(sequence_ids, dtype=np.int64))
    log.info("%s: %d sequences (lengths %d..%d, median %g), %d items; targets train %d, valid %d, test %d; "
             "%d training interactions; %s", name, S, summary["length_min"], summary["length_max"],
             summary["length_median"], n_items, summary["targets_train"], summary["targets_valid"],
             summary["targets_test"], train.nnz,
             f"{with_repeats} sequences repeat an item" if with_repeats else "no item repeats within a sequence")
    return data


def _leave_one_out(offsets: np.ndarray, n_train: np.ndarray) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Targets of sequences whose first n_train[s] items are training items, then one validation
    and one test item: training targets at positions 1 .. n_train - 1."""
    S = len(n_train)
    k = np.maximum(n_train - 1, 0)
    seq = np.repeat(np.arange(S, dtype=np.int64), k)
    pos = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k) + 1
    ids = np.arange(S, dtype=np.int64)
    return {"train": (seq, pos), "valid": (ids, n_train.astype(np.int64)),
            "test": (ids, n_train.astype(np.int64) + 1)}


# --- dataset.pkl --------------------------------------------------------------------------------------------

_PKL_KEYS = ("train", "val", "test")
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _int_list_error(path: str, where: str, values: list) -> DataFormatError:
    for v in values:
        if type(v) is not int:
            return DataFormatError(path, None, f"{where}: item {v!r} is not an integer id ({type(v).__name__})")
    return DataFormatError(path, None, f"{where}: an item id does not fit in 64 bits")


def _load_pkl(path: str, *, max_len: int = DEFAULT_MAX_LEN) -> SequenceData:
    obj = read_plain_pickle(path)
    if type(obj) is not dict:
        raise DataFormatError(path, None, f"expected a dict with the keys train, val, test (and umap, smap), got "
                                          f"a {type(obj).__name__}")
    for key in _PKL_KEYS:
        if key not in obj:
            raise DataFormatError(path, None, f"the dict has no {key!r} key (keys: "
                                              f"{', '.join(repr(k) for k in list(obj)[:10])}); expected train, val, "
                                              "test (and umap, smap)")
    extra = [k for k in obj if k not in _PKL_KEYS + ("umap", "smap")]
    if extra:
        log.info("%s: ignoring the keys %s", path, ", ".join(map(repr, extra)))
    parts = {}
    for key in _PKL_KEYS:
        part = obj[key]
        if type(part) is not dict:
            raise DataFormatError(path, None, f"{key!r} must be a dict of user id -> list of item ids, got a "
                                              f"{type(part).__name__}")
        bad = [u for u in part if type(u) is not int]
        if bad:
            raise DataFormatError(path, None, f"{key}: user id {bad[0]!r} is not an integer")
        bad = [u for u in part if not _INT64_MIN <= u <= _INT64_MAX]
        if bad:
            raise DataFormatError(path, None, f"{key}: user id {bad[0]} does not fit in a 64-bit integer")
        if not part:
            raise DataFormatError(path, None, f"{key!r} holds no user")
        parts[key] = part
    users = sorted(parts["train"])
    for key in ("val", "test"):
        if set(parts[key]) != set(users):
            missing = sorted(set(users) - set(parts[key]))
            unknown = sorted(set(parts[key]) - set(users))
            what = (f"user {missing[0]} of 'train' has no {key!r} entry" if missing else
                    f"user {unknown[0]} of {key!r} has no 'train' entry")
            raise DataFormatError(path, None, f"{what} (every user needs train, val and test items)")
    lists = {}
    for key in _PKL_KEYS:
        ls = [parts[key][u] for u in users]
        if set(map(type, ls)) != {list}:
            u = next(u for u, v in zip(users, ls) if type(v) is not list)
            raise DataFormatError(path, None, f"{key}[{u}] must be a list of item ids, got a "
                                              f"{type(parts[key][u]).__name__}")
        lists[key] = ls
    n_train = np.fromiter(map(len, lists["train"]), dtype=np.int64, count=len(users))
    if (n_train == 0).any():
        u = users[int(np.flatnonzero(n_train == 0)[0])]
        raise DataFormatError(path, None, f"train[{u}] is an empty sequence (every user needs at least one "
                                          "training item)")
    for key in ("val", "test"):
        n = np.fromiter(map(len, lists[key]), dtype=np.int64, count=len(users))
        if (n != 1).any():
            i = int(np.flatnonzero(n != 1)[0])
            raise DataFormatError(path, None, f"{key}[{users[i]}] holds {int(n[i])} items; leave-one-out data has "
                                              f"exactly one {key} item per user")
    flat_list = list(itertools.chain.from_iterable(
        itertools.chain.from_iterable(zip(lists["train"], lists["val"], lists["test"]))))
    if set(map(type, flat_list)) != {int}:
        for key in _PKL_KEYS:
            for u, v in zip(users, lists[key]):
                if set(map(type, v)) - {int}:
                    raise _int_list_error(path, f"{key}[{u}]", v)
    try:
        flat = np.array(flat_list, dtype=np.int64)
    except OverflowError:
        raise DataFormatError(path, None, "an item id does not fit in a 64-bit integer") from None
    lengths = n_train + 2
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if (flat < 0).any():
        i = int(np.flatnonzero(flat < 0)[0])
        s = int(np.searchsorted(offsets, i, side="right") - 1)
        raise DataFormatError(path, None, f"user {users[s]}: negative item id {int(flat[i])}")
    universe = np.unique(flat)
    for key in ("umap", "smap"):
        if key in obj:
            m = obj[key]
            if type(m) is not dict or not all(type(v) is int for v in m.values()):
                raise DataFormatError(path, None, f"{key!r} must be a dict of original id -> integer id")
    if "smap" in obj:
        bad = [(k, v) for k, v in obj["smap"].items() if not 0 <= v <= _INT64_MAX]
        if bad:
            k, v = bad[0]
            what = "is negative" if v < 0 else "does not fit in a 64-bit integer"
            raise DataFormatError(path, None, f"'smap' maps {_show(k)} to the item id {v}, which {what}")
        ids = np.fromiter(obj["smap"].values(), dtype=np.int64, count=len(obj["smap"]))
        if len(np.unique(ids)) != len(ids):
            raise DataFormatError(path, None, "'smap' maps two original items to the same item id")
        unknown = np.setdiff1d(universe, ids)
        if len(unknown):
            raise DataFormatError(path, None, f"item id {int(unknown[0])} occurs in a sequence but not in 'smap' "
                                              f"({len(unknown)} such ids)")
        universe = np.unique(ids)
    items = np.searchsorted(universe, flat).astype(np.int64)
    extra_summary = {"source": "dataset.pkl"}
    name = (os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.basename(path) == PKL_NAME
            else os.path.splitext(os.path.basename(path))[0])
    return _assemble(name, items, offsets, _leave_one_out(offsets, n_train), len(universe), universe, max_len,
                     np.asarray(users, dtype=np.int64), extra_summary)


# --- DreamRec .df folders -----------------------------------------------------------------------------------

def _column(df, names: Sequence[str], path: str):
    for n in names:
        if n in df.columns:
            return n
    cols = ", ".join(repr(c) for c in list(df.columns)[:10])
    raise DataFormatError(path, None, f"no column {' or '.join(repr(n) for n in names)} (columns: {cols})")


def _as_ids(path: str, values, what: str, per_row: int = 1) -> np.ndarray:
    """(n,) int64 from a column or flat list of numbers; integral floats are accepted (DreamRec's own
    files store some ids as float64); the row of the first bad value is named."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        if values.dtype == np.uint64 and (values > np.iinfo(np.int64).max).any():
            row = int(np.flatnonzero(values > np.iinfo(np.int64).max)[0]) // per_row
            raise DataFormatError(path, row, f"{what} does not fit in a 64-bit integer", what="row")
        return values.astype(np.int64, copy=False)
    if isinstance(values, np.ndarray) and values.dtype.kind != "f":
        values = values.tolist()
    if not isinstance(values, np.ndarray):
        types = set(map(type, values))
        if not types <= _ID_TYPES:
            i = next(i for i, v in enumerate(values) if type(v) not in _ID_TYPES)
            raise DataFormatError(path, i // per_row, f"{what} {_show(values[i])} is not a number", what="row")
        if types <= _ID_TYPES - {float, np.float32, np.float64}:
            try:
                return np.array(values, dtype=np.int64)
            except OverflowError:
                pass
        values = np.array(values, dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > 2.0 ** 53)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataFormatError(path, i // per_row, f"{what} {_show(values[i])} is not an integer id", what="row")
    return values.astype(np.int64)


def _show(v: Any) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)[:40]


def _read_statis(path: str) -> Tuple[int, int]:
    df = read_dataframe(path)
    out = []
    for col in ("seq_size", "item_num"):
        if col not in df.columns:
            raise DataFormatError(path, None, f"no column {col!r} (columns: {', '.join(map(repr, df.columns))})")
        if len(df) < 1:
            raise DataFormatError(path, None, "the table has no row")
        v = _as_ids(path, df[col].to_numpy()[:1], col)[0]
        if v < 1:
            raise DataFormatError(path, 0, f"{col} must be >= 1, got {int(v)}", what="row")
        # item_num sizes the item ids (and every score row), seq_size every window: refused before the
        # splits are read when even the ids alone could not be held.
        if int(v) * 8 > MAX_DATA_BYTES:
            raise DataFormatError(path, 0, f"{col} = {int(v)} would take {_bytes(int(v) * 8)} for "
                                           f"{'its item ids' if col == 'item_num' else 'one window'} alone, more "
                                           f"than {_bytes(MAX_DATA_BYTES)} (refit.data.formats.MAX_DATA_BYTES)", what="row")
        out.append(int(v))
    return out[0], out[1]


@dataclass
class _Split:
    items: np.ndarray    # (N,) the items of the split's sequences, concatenated
    offsets: np.ndarray  # (S + 1,)
    seq: np.ndarray      # (R,) sequence of each row (0 .. S - 1)
    pos: np.ndarray      # (R,) position of each row's target
    first_rows: np.ndarray  # (S,) the first row of each sequence


def _read_split(path: str, seq_size: int, item_num: int) -> _Split:
    """Reads one DreamRec split and rebuilds its sessions from the rows (see the module docstring)."""
    df = read_dataframe(path)
    wcol = _column(df, ("seq",), path)
    lcol = _column(df, ("seq_len", "len_seq"), path)
    tcol = _column(df, ("tgt", "next"), path)
    R = len(df)
    if R == 0:
        raise DataFormatError(path, None, "the table has no rows")
    cells = df[wcol].tolist()
    if set(map(type, cells)) != {list}:
        r = next(r for r, c in enumerate(cells) if type(c) is not list)
        raise DataFormatError(path, r, f"{wcol!r} must hold a list of item ids, got {_kind(cells[r])}", what="row")
    n_cell = np.fromiter(map(len, cells), dtype=np.int64, count=R)
    if (n_cell != seq_size).any():
        r = int(np.flatnonzero(n_cell != seq_size)[0])
        longer = "longer than" if n_cell[r] > seq_size else "shorter than"
        raise DataFormatError(path, r, f"the window holds {int(n_cell[r])} items, {longer} seq_size = {seq_size} "
                                       f"({DREAMREC_STATS})", what="row")
    W = _as_ids(path, list(itertools.chain.from_iterable(cells)), "window item", per_row=seq_size).reshape(R, seq_size)
    lens = _as_ids(path, df[lcol].to_numpy(), lcol)
    tgt = _as_ids(path, df[tcol].to_numpy(), "target")
    pad = item_num
    bad = (W < 0) | (W > pad)
    if bad.any():
        r, j = (int(v) for v in np.argwhere(bad)[0])
        raise DataFormatError(path, r, f"window item {int(W[r, j])} is out of range (items are 0..{item_num - 1}, "
                                       f"{item_num} pads)", what="row")
    bad = (tgt < 0) | (tgt >= item_num)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataFormatError(path, r, f"target {int(tgt[r])} is out of range 0..{item_num - 1} (item_num = "
                                       f"{item_num})", what="row")
    real = W != pad
    n_real = real.sum(1)
    slots = np.arange(seq_size)
    bad = (real != (slots[None, :] < n_real[:, None])).any(1)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataFormatError(path, r, f"the window {W[r].tolist()} is not right-padded with {pad} (padding "
                                       "between items)", what="row")
    # DreamRec stores 1 for an all-padding window (its model reads slot len - 1).
    bad = (lens != n_real) & ~((n_real == 0) & (lens == 1))
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataFormatError(path, r, f"{lcol} = {int(lens[r])} but the window holds {int(n_real[r])} items",
                              what="row")
    # Row r continues row r - 1 when its window is that row's window with its target appended
    # (the oldest item dropped once the window is full).
    expect = W[:-1].copy()
    prev_n, prev_t = n_real[:-1], tgt[:-1]
    full = prev_n == seq_size
    part = np.flatnonzero(~full)
    expect[part, prev_n[part]] = prev_t[part]
    if full.any():
        expect[full] = np.concatenate([W[:-1][full, 1:], prev_t[full, None]], axis=1)
    cont = np.zeros(R, dtype=bool)
    cont[1:] = (W[1:] == expect).all(1)
    start = ~cont
    # Each row contributes its target; a row that starts a sequence first contributes its window.
    V = np.concatenate([W, tgt[:, None]], axis=1)
    take = np.concatenate([start[:, None] & (slots[None, :] < n_real[:, None]), np.ones((R, 1), bool)], axis=1)
    items = V[take]
    chunk = take.sum(1)
    end = np.cumsum(chunk)
    seq = np.cumsum(start) - 1
    first_rows = np.flatnonzero(start)
    offsets = np.concatenate([end[first_rows] - chunk[first_rows], [end[-1]]]).astype(np.int64)
    pos = end - 1 - offsets[seq]
    return _Split(items.astype(np.int64), offsets, seq.astype(np.int64), pos.astype(np.int64), first_rows)


def _load_dreamrec(folder: str, *, max_len: Optional[int] = None) -> SequenceData:
    stats = os.path.join(folder, DREAMREC_STATS)
    if not os.path.exists(stats):
        raise FileNotFoundError(f"{folder}: a DreamRec folder needs {DREAMREC_STATS} (seq_size and item_num)")
    seq_size, item_num = _read_statis(stats)
    items, offsets, targets, seq_ids, extra = [], [0], {}, [], {"source": "dreamrec", "seq_size": seq_size}
    n_seq = 0
    for split, fname in DREAMREC_FILES.items():
        path = os.path.join(folder, fname)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder}: a DreamRec folder needs {fname}")
        s = _read_split(path, seq_size, item_num)
        items.append(s.items)
        offsets.extend((s.offsets[1:] + offsets[-1]).tolist())
        targets[split] = (s.seq + n_seq, s.pos)
        seq_ids.append(s.first_rows)
        n_seq += len(s.offsets) - 1
        extra[f"rows_{split}"] = int(len(s.seq))
        extra[f"sequences_{split}"] = int(len(s.offsets) - 1)
    # item_num must exceed every id (checked row by row in _read_split) and, as DreamRec's ids are dense
    # indices, not be far above them: the id space is allocated (ids, training matrix, every score row).
    largest = max(int(a.max()) for a in items if len(a))
    limit = max(DENSE_ID_FACTOR * (largest + 1), DENSE_ID_FLOOR)
    if item_num > limit:
        raise DataFormatError(stats, 0, f"item_num = {item_num} is far above the largest item id of the splits, "
                                        f"{largest}: DreamRec's ids are dense indices 0..item_num-1, so item_num "
                                        f"may be at most max({DENSE_ID_FACTOR} x (largest id + 1), {DENSE_ID_FLOOR})"
                                        f" = {limit}; {item_num} items would take {_bytes(item_num * 8)} for their "
                                        "ids alone", what="row")
    name = os.path.basename(os.path.normpath(folder))
    return _assemble(name, np.concatenate(items), np.asarray(offsets, dtype=np.int64), targets, item_num,
                     np.arange(item_num, dtype=np.int64), seq_size if max_len is None else max_len,
                     np.concatenate(seq_ids), extra)


# --- PreferDiff text folders --------------------------------------------------------------------------------

# One line: ids separated by whitespace (str.split, as PreferDiff's ``line.split()``), each ASCII digits with
# an optional sign, as refit.data reads integer fields.
_ID_LINE = re.compile(r"(?:[+-]?[0-9]+ )*[+-]?[0-9]+")
_ID_TOKEN = re.compile(r"[+-]?[0-9]+")


@dataclass
class _TextSplit:
    ids: np.ndarray      # (N,) int64 the ids of every line, as in the file, concatenated
    lengths: np.ndarray  # (S,) int64 ids per line (>= 2)
    lines: np.ndarray    # (S,) int64 1-based line number of each sequence


def _read_text_split(path: str) -> _TextSplit:
    """Reads one PreferDiff split: one sequence per line, ids separated by whitespace, oldest first.

    Every line must hold at least two integer ids >= 0 (a target and some history); blank lines
    may only end the file. Anything else raises DataFormatError naming the file and line.
    """
    if not os.path.exists(path):
        raise DataFormatError(path, None, "no such file: a PreferDiff folder holds "
                                          f"{', '.join(PREFERDIFF_FILES.values())} (one sequence per line)")
    raw = _read_bytes(path, empty_ok=True)  # an empty file is refused below, as one without sequences
    text = _decode(path, raw)
    del raw
    # Lines as Python's text files give them (PreferDiff iterates over its open file): \n, \r\n or \r.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    del text
    tokens = [line.split() for line in lines]
    n = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    used = np.flatnonzero(n)
    if not len(used):
        raise DataFormatError(path, None, "the file holds no sequence (it is empty or blank)")
    end = int(used[-1]) + 1  # blank lines after the last sequence are not lines of data
    n, tokens = n[:end], tokens[:end]
    blank = np.flatnonzero(n == 0)
    if len(blank):
        raise DataFormatError(path, int(blank[0]) + 1, "empty line: every line is one user's sequence (PreferDiff "
                                                        "reads it as such, and an empty one has no target)")
    flat = list(itertools.chain.from_iterable(tokens))
    if not _ID_LINE.fullmatch(" ".join(flat)):
        for no, toks in enumerate(tokens, 1):
            for tok in toks:
                if not _ID_TOKEN.fullmatch(tok):
                    raise DataFormatError(path, no, f"item id {tok[:40]!r} is not an integer")
        raise AssertionError("unreachable: a token that is not an integer lies on some line")
    line_of = np.repeat(np.arange(1, end + 1, dtype=np.int64), n)
    try:
        ids = np.array(list(map(int, flat)), dtype=np.int64)
    except OverflowError:
        i = next(i for i, tok in enumerate(flat) if not -(2 ** 63) <= int(tok) < 2 ** 63)
        raise DataFormatError(path, int(line_of[i]), f"item id {flat[i][:40]} does not fit in a 64-bit "
                                                     "integer") from None
    del flat, tokens
    neg = np.flatnonzero(ids < 0)
    if len(neg):
        raise DataFormatError(path, int(line_of[neg[0]]), f"negative item id {int(ids[neg[0]])}")
    short = np.flatnonzero(n == 1)
    if len(short):
        no = int(short[0]) + 1
        raise DataFormatError(path, no, f"the line holds one id only ({int(ids[line_of == no][0])}): a target "
                                        "without history, which PreferDiff cannot use (its models read the "
                                        "history's last item at seq_lengths - 1 = -1, a padding slot)")
    return _TextSplit(ids, n, np.arange(1, end + 1, dtype=np.int64))


def _is_preferdiff_folder(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in PREFERDIFF_FILES.values())


def _load_preferdiff(folder: str, *, max_len: int = DEFAULT_MAX_LEN, train_targets: str = "all") -> SequenceData:
    """A PreferDiff folder (see :func:`load_sequences`): the lines of train_data.txt, then of
    valid_data.txt, then of test_data.txt, one sequence each; the target of a line is its last id."""
    if train_targets not in PREFERDIFF_TRAIN_TARGETS:
        raise ValueError(f"train_targets must be one of {', '.join(map(repr, PREFERDIFF_TRAIN_TARGETS))}, got "
                         f"{train_targets!r}")
    parts = {split: _read_text_split(os.path.join(folder, fname)) for split, fname in PREFERDIFF_FILES.items()}
    ids = np.concatenate([parts[s].ids for s in SPLITS])
    # PreferDiff's ids start at 1 (0 pads its windows) and it ranks 1..item_num, item_num the largest id
    # (recdata.py): the id space is kept, items that never occur included. A file that uses the id 0 is
    # taken as 0-based.
    base = 0 if int(ids.min()) == 0 else 1
    largest = int(ids.max())
    n_items = largest + 1 - base
    distinct = len(np.unique(ids))
    limit = max(DENSE_ID_FACTOR * distinct, DENSE_ID_FLOOR)
    if n_items > limit:
        for split in SPLITS:
            s = parts[split]
            far = np.flatnonzero(s.ids - base >= limit)
            if len(far):
                line = int(np.repeat(s.lines, s.lengths)[far[0]])
                raise DataFormatError(
                    os.path.join(folder, PREFERDIFF_FILES[split]), line,
                    f"item id {int(s.ids[far[0]])} is far above the {distinct} distinct ids of the three files: "
                    f"PreferDiff's ids are dense ({base}..largest id, every one ranked), so ids may span at most "
                    f"max({DENSE_ID_FACTOR} x distinct ids, {DENSE_ID_FLOOR}) = {limit} items; {n_items} would "
                    f"take {_bytes(n_items * 8)} for their ids alone")
        raise AssertionError("unreachable: the largest id lies in one of the files")
    lengths = np.concatenate([parts[s].lengths for s in SPLITS])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    targets, extra, first = {}, {"source": "preferdiff", "id_base": base, "train_targets": train_targets}, 0
    for split in SPLITS:
        k = len(parts[split].lengths)
        seq = np.arange(first, first + k, dtype=np.int64)
        last = lengths[first:first + k] - 1
        if split == "train" and train_targets == "all":
            tseq = np.repeat(seq, last)  # positions 1 .. length - 1 of each line
            pos = np.arange(int(last.sum()), dtype=np.int64) - np.repeat(np.cumsum(last) - last, last) + 1
            targets[split] = (tseq, pos)
        else:
            targets[split] = (seq, last)
        extra[f"lines_{split}"] = k
        first += k
    longer = int((lengths - 1 > max_len).sum())
    if longer:
        log.info("%s: %d lines hold more than max_len = %d history items; windows keep the last %d", folder, longer,
                 max_len, max_len)
    extra["history_max"] = int(lengths.max()) - 1
    name = os.path.basename(os.path.normpath(folder))
    return _assemble(name, ids - base, offsets, targets, n_items, np.arange(base, largest + 1, dtype=np.int64),
                     max_len, np.concatenate([parts[s].lines for s in SPLITS]), extra)


# --- synthetic sequences --------------------------------------------------------------------------------------

def synthetic_sequences(n_users: int = 500, n_items: int = 300, *, mean_length: float = 20.0, n_clusters: int = 10,
                        stay: float = 0.7, follow: float = 0.5, popularity_exponent: float = 0.6,
                        seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Item sequences with sequential structure and no repeated item within a sequence.

    Items belong to ``n_clusters`` clusters and have Zipf-like popularity
    (``rank ** -popularity_exponent``). A user moves along a Markov chain over
    clusters: after an item of cluster c the next item is of cluster c with
    probability ``stay``, else of a fixed successor cluster of c. Every item
    also has a fixed successor item in its cluster: with probability
    ``follow`` (when not yet seen) that successor comes next, otherwise an
    unseen item of the current cluster drawn by popularity (any unseen item
    once the cluster is exhausted). The next item thus depends on the last
    one, which a sequential model can learn and most-popular cannot. Lengths
    are log-normal around ``mean_length``, at least 4 (one training target,
    one validation and one test item), at most ``n_items // 2``.

    Returns:
        (items (N,) int64 ids 0 .. n_items - 1, offsets (n_users + 1,) int64).
    """
    if n_users < 1 or n_items < 8 or n_clusters < 1 or n_clusters > n_items:
        raise ValueError(f"synthetic-seq: need n_users >= 1, n_items >= 8 and 1 <= n_clusters <= n_items, got "
                         f"{n_users}, {n_items}, {n_clusters}")
    if not (mean_length >= 4 and 0 <= stay <= 1 and 0 <= follow <= 1):
        raise ValueError(f"synthetic-seq: need mean_length >= 4 and stay, follow in [0, 1], got {mean_length}, "
                         f"{stay}, {follow}")
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(np.arange(1, n_items + 1, dtype=np.float64) ** -popularity_exponent)
    cluster = rng.permutation(np.arange(n_items) % n_clusters)
    next_cluster = rng.permutation(n_clusters)
    successor = np.empty(n_items, dtype=np.int64)
    for c in range(n_clusters):  # a random cycle through each cluster's items
        members = rng.permutation(np.flatnonzero(cluster == c))
        successor[members] = np.roll(members, -1)
    lengths = np.clip(np.round(rng.lognormal(math.log(mean_length), 0.4, size=n_users)), 4,
                      max(4, n_items // 2)).astype(np.int64)
    T = int(lengths.max())
    out = np.zeros((n_users, T), dtype=np.int64)
    seen = np.zeros((n_users, n_items), dtype=bool)
    rows = np.arange(n_users)
    current = rng.integers(0, n_clusters, size=n_users)
    last = np.zeros(n_users, dtype=np.int64)
    for t in range(T):
        weight = popularity[None, :] * ~seen
        in_cluster = weight * (cluster[None, :] == current[:, None])
        has = in_cluster.sum(1) > 0
        weight = np.where(has[:, None], in_cluster, weight)
        cum = np.cumsum(weight, axis=1)
        r = rng.random(n_users) * cum[:, -1]
        drawn = np.minimum((cum <= r[:, None]).sum(1), n_items - 1)  # the first item whose cumulative weight exceeds r
        nxt = successor[last]
        follows = (t > 0) & (rng.random(n_users) < follow) & ~seen[rows, nxt]
        item = np.where(follows, nxt, drawn)
        out[:, t] = item
        seen[rows, item] = True
        last = item
        c = cluster[item]
        current = np.where(rng.random(n_users) < stay, c, next_cluster[c])
    mask = np.arange(T)[None, :] < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return out[mask], offsets


def _load_synthetic(*, max_len: int = DEFAULT_MAX_LEN, **generator) -> SequenceData:
    _refuse_unknown(SYNTHETIC, generator, ["max_len"] + list(inspect.signature(synthetic_sequences).parameters))
    items, offsets = synthetic_sequences(**generator)
    n_items = int(generator.get("n_items", inspect.signature(synthetic_sequences).parameters["n_items"].default))
    n_train = np.diff(offsets) - 2
    return _assemble(SYNTHETIC, items, offsets, _leave_one_out(offsets, n_train), n_items,
                     np.arange(n_items, dtype=np.int64), max_len, np.arange(len(n_train), dtype=np.int64),
                     {"source": "synthetic", **{k: v for k, v in generator.items()}})


# --- loading --------------------------------------------------------------------------------------------------

def _is_dreamrec_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, DREAMREC_FILES["train"]))


def is_sequence_source(name_or_path: Any) -> bool:
    """Whether :func:`load_sequences` (rather than an interaction loader) reads this name or path:
    ``"synthetic-seq"``, a ``.pkl`` or ``.df`` file, a folder holding ``dataset.pkl``, a DreamRec split or
    a PreferDiff split (any of ``train_data.txt``, ``valid_data.txt``, ``test_data.txt``; the loader
    names a missing one), or one of those three files."""
    if isinstance(name_or_path, str) and name_or_path.lower() == SYNTHETIC:
        return True
    try:
        path = os.fspath(name_or_path)
    except TypeError:
        return False
    if os.path.isdir(path):
        return (os.path.exists(os.path.join(path, PKL_NAME)) or _is_dreamrec_folder(path)
                or _is_preferdiff_folder(path))
    return os.path.isfile(path) and (path.endswith((".pkl", ".df"))
                                     or os.path.basename(path) in PREFERDIFF_FILES.values())


def load_sequences(path: str, **options) -> SequenceData:
    """Reads ml-1m_seq's ``dataset.pkl`` (a file or its folder), a DreamRec ``.df`` folder or a
    PreferDiff ``.txt`` folder.

    Pickles are read with an unpickler that admits only what these formats
    need; anything else raises ``refit.data.DataFormatError`` and nothing in
    the file runs.

    PreferDiff folders (``train_data.txt``, ``valid_data.txt``,
    ``test_data.txt``, as PreferDiff's ``recdata.py`` reads them): one user per
    line, item ids separated by whitespace, oldest first; users are split
    between the files (not leave-one-out). The last id of a line is its
    target, the ids before it its history; models see the last ``max_len``
    (10, PreferDiff's ``max_seq_length``) of them.

    * Training targets: by default (``train_targets="all"``) every id after
      the first of each line of ``train_data.txt``, predicted from the ids
      before it (prefix augmentation, as DreamRec's files and leave-one-out
      data hold it). ``train_targets="last"`` is exactly what PreferDiff trains
      on, one example per line: its last id (PreferDiff's
      ``SequenceDataset.__getitem__`` takes ``seq[:-1]`` as the history and
      ``seq[-1]`` as the label of each line, and its training loader iterates
      over the lines; no prefix of a line is an example of its own). On
      Beauty, a next-item cross-entropy model reached validation HR@20 0.041
      from the last ids and 0.125 from all of them (docs/models.md).
    * Validation / test targets: the last id of each line of
      ``valid_data.txt`` / ``test_data.txt``, in line order (target i of
      ``"valid"`` is line i + 1 of the file). Their histories are not
      training data (``SequenceData.train`` holds the lines of
      ``train_data.txt`` only).
    * Ids: PreferDiff's are 1-based (0 pads) and it ranks every id up to the
      largest (``item_num``), so the id space is kept as in the DreamRec
      loader: item ``i`` is the id ``i + 1``, ``n_items`` is the largest id,
      ``item_ids`` is ``arange(1, largest + 1)``, and ids that never occur stay
      items. Files that use the id 0 are taken as 0-based (item ``i`` is the
      id ``i``). The id space may be at most max(``DENSE_ID_FACTOR`` x the
      distinct ids, ``DENSE_ID_FLOOR``) items.
    * The sequences of ``train_data.txt`` come first, then those of
      ``valid_data.txt`` and ``test_data.txt``; ``sequence_ids`` holds each
      one's 1-based line number in its file. ``summary`` adds ``source``
      ("preferdiff"), ``id_base`` (1 or 0), ``train_targets``,
      ``lines_train`` / ``lines_valid`` / ``lines_test`` and ``history_max``.
    * Lines may hold more than ``max_len + 1`` ids (PreferDiff's own files
      never do): the windows keep the last ``max_len``.
    * Refused with a DataFormatError naming the file and its 1-based line:
      a token that is not an integer (ASCII digits, an optional sign), an id
      below 0 or beyond 64 bits, an empty line (blank lines after the last
      sequence are accepted), a line of one id (a target without history:
      PreferDiff's models would read the history's last item at index -1, a
      padding slot), a file without any sequence, and a missing file of the
      three (without a line), or one that is not UTF-8.

    Args:
        path: a ``dataset.pkl``-format file (any name) or a folder holding
            ``dataset.pkl``; a DreamRec folder (or one of its ``.df`` files);
            a PreferDiff folder (or one of its three ``.txt`` files); or
            ``"synthetic-seq"``.
        max_len: the default window length (``SequenceData.max_len``): 10, or
            the ``seq_size`` of a DreamRec folder.
        train_targets: PreferDiff folders only: ``"all"`` (default) or
            ``"last"`` (see above).
        Options of ``"synthetic-seq"``: ``n_users``, ``n_items``,
            ``mean_length``, ``seed`` and the others of :func:`synthetic_sequences`.

    Raises:
        DataFormatError (a ValueError) naming the file (and row, for ``.df``
        files, or line, for ``.txt`` files) of malformed or refused input;
        FileNotFoundError for a missing path; ImportError for a ``.df`` file
        without pandas installed; TypeError for an option the source does not take.
    """
    if isinstance(path, str) and path.lower() == SYNTHETIC:
        return _load_synthetic(**options)
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"no sequence data set {p!r}: not a path, and not {SYNTHETIC!r}")
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, PKL_NAME)):
            kind, p = "pkl", os.path.join(p, PKL_NAME)
        elif _is_dreamrec_folder(p):
            kind = "dreamrec"
        elif _is_preferdiff_folder(p):
            kind = "preferdiff"
        else:
            raise FileNotFoundError(f"{p}: no sequence data found (expected {PKL_NAME}, DreamRec's "
                                    f"{', '.join(DREAMREC_FILES.values())} and {DREAMREC_STATS}, or PreferDiff's "
                                    f"{', '.join(PREFERDIFF_FILES.values())})")
    elif p.endswith(".df"):
        kind, p = "dreamrec", os.path.dirname(os.path.abspath(p))
    elif os.path.basename(p) in PREFERDIFF_FILES.values():
        kind, p = "preferdiff", os.path.dirname(os.path.abspath(p))
    else:
        kind = "pkl"
    what = {"dreamrec": "a DreamRec folder", "preferdiff": "a PreferDiff folder", "pkl": "dataset.pkl"}[kind]
    _refuse_unknown(f"{p} ({what})", options, ("max_len", "train_targets") if kind == "preferdiff" else ("max_len",))
    max_len = options.get("max_len")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer))
                                or max_len < 1):
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if max_len is not None:
        check_window(max_len, 1, p)  # one window alone too large: refused before anything is read
    if kind == "dreamrec":
        return _load_dreamrec(p, max_len=None if max_len is None else int(max_len))
    if kind == "preferdiff":
        return _load_preferdiff(p, max_len=DEFAULT_MAX_LEN if max_len is None else int(max_len),
                                train_targets=options.get("train_targets", "all"))
    return _load_pkl(p, max_len=DEFAULT_MAX_LEN if max_len is None else int(max_len))

__all__ = ["PREFERDIFF_KS", "SequenceBatches", "SequenceData", "Targets",
           "is_sequence_source", "load_sequences", "read_dataframe", "read_plain_pickle",
           "synthetic_sequences"]
