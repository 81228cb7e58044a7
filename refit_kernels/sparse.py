"""Sparse (CSR) arguments of the ops.

Interaction matrices are CSR over users x items. Every op that takes one
accepts a ``torch.sparse_csr_tensor``, a ``scipy.sparse`` CSR matrix (or
array), or an ``(indptr, indices[, values])`` tuple of tensors or NumPy
arrays, and passes plain ``indptr`` / ``indices`` / ``values`` tensors to the
kernels. :func:`as_csr` does that conversion and the cheap structural checks.

What is validated, and where (the same for every op and every backend):

* the structure of ``indptr``, for the whole matrix, here: ``indptr[0] == 0``,
  non-decreasing, ``indptr[-1] == nnz`` (O(n_rows), before any kernel runs);
* the column ids of the rows an op reads, by the op (every backend makes the
  same checks with the same messages): in ``[0, n_cols)`` and, where the op
  needs it (``topk_hits``), sorted and unique. Rows an op does not read are
  not looked at, so a batch over a large matrix costs what the batch reads.

Column indices inside a row are expected sorted and unique (the loaders of
``refit`` guarantee it); ops rely on that only where they check it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch

from ._checks import dense_tensor, has_data, is_int

_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class CSR:
    """A CSR matrix as plain tensors.

    Attributes:
        indptr: (n_rows + 1,) int64 (or int32 on request, see :func:`as_csr`),
            indptr[0] == 0, non-decreasing, indptr[-1] == nnz.
        indices: (nnz,) column ids, indptr's dtype.
        values: (nnz,) floating values, or None for an implicit all-ones matrix.
        n_cols: the number of columns when known (None for a tuple without it).
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    values: Optional[torch.Tensor]
    n_cols: Optional[int]

    @property
    def n_rows(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def nnz(self) -> int:
        return self.indices.shape[0]

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    @property
    def shape(self) -> Tuple[int, Optional[int]]:
        return (self.n_rows, self.n_cols)

    def to(self, device) -> "CSR":
        """The same matrix on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.indptr.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return CSR(move(self.indptr), move(self.indices), move(self.values), self.n_cols)


def _tensor(x: Any, name: str, part: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc":
            raise TypeError(f"{name}: {part} must hold numbers, got a numpy array of {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name}: {part} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _first_bad_row(indptr: torch.Tensor, nnz: int) -> int:
    """The first row r whose entries indptr[r] .. indptr[r+1] are not a range inside [0, nnz], or -1."""
    lo, hi = indptr[:-1], indptr[1:]
    bad = torch.nonzero((lo < 0) | (lo > hi) | (hi > nnz))
    return int(bad[0]) if bad.numel() else -1


def check_indptr(indptr: torch.Tensor, nnz: int, name: str) -> None:
    """ValueError naming ``name`` unless indptr[0] == 0, indptr is non-decreasing and indptr[-1] == nnz.

    ``indptr`` is a 1-D integer tensor with at least one entry. The first
    row whose range is broken is named; only then the two ends. O(n_rows),
    and one pass when the structure is fine.
    """
    if indptr.device.type == "cpu":
        # The usual case, a well-formed CPU indptr, in NumPy: a third of the
        # time of the same test in torch ops, and this runs on every op call.
        a = indptr.numpy()
        if a[0] == 0 and a[-1] == nnz and (a.shape[0] < 2 or bool((a[1:] >= a[:-1]).all())):
            return
    first, last = int(indptr[0]), int(indptr[-1])
    if first == 0 and last == nnz and (indptr.shape[0] < 2 or not bool((indptr[1:] < indptr[:-1]).any())):
        return
    r = _first_bad_row(indptr, nnz)
    if r >= 0:
        raise ValueError(f"{name}: indptr must be non-decreasing from 0 to nnz = {nnz}; {name} indptr of row "
                         f"{r} gives the entries {int(indptr[r])} .. {int(indptr[r + 1])}")
    raise ValueError(f"{name}: indptr must start at 0 and end at nnz = {nnz}, got {first} .. {last}")


def _is_scipy_sparse(x: Any) -> bool:
    # Duck-typed, so scipy is never imported just to check.
    return type(x).__module__.startswith("scipy.sparse") and hasattr(x, "tocsr")


def as_csr(x: Any, name: str = "matrix", *, n_cols: Optional[int] = None, device=None,
           values_dtype: Optional[torch.dtype] = None,
           index_dtype: Optional[torch.dtype] = torch.int64, check: bool = True) -> CSR:
    """Converts any accepted CSR form into a :class:`CSR`, checking its structure.

    Args:
        x: ``torch.sparse_csr_tensor``, scipy sparse matrix/array (converted
            with ``tocsr()``), ``(indptr, indices)`` / ``(indptr, indices,
            values)`` of tensors or numpy arrays, or a :class:`CSR`.
        name: the argument's name; it only labels error messages (default "matrix").
        n_cols: expected number of columns; checked against the matrix's own
            when it has one, and used when it has none.
        device: move the result there (no copy when already there).
        values_dtype: cast the values to this dtype (when there are values).
        index_dtype: dtype of the returned ``indptr`` and ``indices``
            (int64 by default). None keeps int32 when both are int32 (as
            scipy stores them), which saves converting the whole matrix on
            every call; anything else becomes int64.
        check: run the O(n_rows) checks of ``indptr``'s values (start at 0,
            non-decreasing, end at nnz; see :func:`check_indptr`). Every op
            runs them on its CSR arguments; only code being traced by
            ``torch.compile``, where reading tensor values is not possible,
            skips them (the kernels still check every ``indptr`` entry they
            read).

    Raises:
        TypeError for the wrong kinds of objects, dtypes or layouts (a part
        that is itself sparse, a float ``n_cols``); ValueError for an
        inconsistent structure or a meta tensor; each naming ``name``.
    """
    own_cols: Optional[int] = None
    if isinstance(x, CSR):  # already converted: re-check, re-type, move as asked
        indptr, indices, values, own_cols = x.indptr, x.indices, x.values, x.n_cols
    elif isinstance(x, torch.Tensor):
        if x.layout != torch.sparse_csr:
            raise TypeError(f"{name}: expected a CSR matrix (torch.sparse_csr_tensor, scipy.sparse "
                            f"CSR or an (indptr, indices[, values]) tuple), got a {x.layout} tensor")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D CSR matrix, got {x.dim()} dimensions")
        indptr, indices, values = x.crow_indices(), x.col_indices(), x.values()
        own_cols = x.shape[1]
    elif isinstance(x, (tuple, list)):  # before the scipy check, which torch.compile cannot trace
        if len(x) not in (2, 3):
            raise ValueError(f"{name}: a CSR tuple is (indptr, indices) or (indptr, indices, values), "
                             f"got {len(x)} items")
        indptr = _tensor(x[0], name, "indptr")
        indices = _tensor(x[1], name, "indices")
        values = None if len(x) == 2 or x[2] is None else _tensor(x[2], name, "values")
    elif _is_scipy_sparse(x):
        m = x.tocsr()
        indptr, indices, values = (torch.from_numpy(np.ascontiguousarray(a)) for a in (m.indptr, m.indices, m.data))
        own_cols = m.shape[1]
    else:
        raise TypeError(f"{name}: expected a CSR matrix (torch.sparse_csr_tensor, scipy.sparse CSR "
                        f"or an (indptr, indices[, values]) tuple), got {type(x).__name__}")

    if n_cols is not None and not is_int(n_cols):
        raise TypeError(f"{name}: n_cols must be an int, got {n_cols!r} ({type(n_cols).__name__})")
    if n_cols is not None and own_cols is not None and own_cols != n_cols:
        raise ValueError(f"{name}: expected {n_cols} columns, got a matrix with {own_cols}")
    cols = own_cols if own_cols is not None else n_cols

    for part, t in (("indptr", indptr), ("indices", indices), ("values", values)):
        if t is not None:
            dense_tensor(t, part, name)
            has_data(t, part, name)
    for part, t in (("indptr", indptr), ("indices", indices)):
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name}: {part} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: {part} must be 1-D, got shape {tuple(t.shape)}")
    if indptr.shape[0] < 1:
        raise ValueError(f"{name}: indptr must have n_rows + 1 >= 1 entries, got none")
    if indices.device != indptr.device:
        raise ValueError(f"{name}: indices is on {indices.device} but indptr is on {indptr.device}")
    if values is not None:
        if not values.is_floating_point():
            raise TypeError(f"{name}: values must be floating point, got {values.dtype}")
        if tuple(values.shape) != tuple(indices.shape):
            raise ValueError(f"{name}: values must have the shape of indices {tuple(indices.shape)}, "
                             f"got {tuple(values.shape)}")
        if values.device != indptr.device:
            raise ValueError(f"{name}: values is on {values.device} but indptr is on {indptr.device}")

    if index_dtype is None:
        both32 = indptr.dtype == torch.int32 and indices.dtype == torch.int32
        index_dtype = torch.int32 if both32 else torch.int64
    elif index_dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name}: index_dtype must be torch.int32, torch.int64 or None, got {index_dtype}")
    # (.to / .contiguous only when needed: this runs on every op call.)
    if indptr.dtype != index_dtype:
        indptr = indptr.to(index_dtype)
    if indices.dtype != index_dtype:
        indices = indices.to(index_dtype)
    indptr, indices = indptr.contiguous(), indices.contiguous()
    nnz = indices.shape[0]
    if check:
        # O(n_rows): cheap next to anything that reads the rows.
        check_indptr(indptr, nnz, name)
    if values is not None:
        if values_dtype is not None and values.dtype != values_dtype:
            values = values.to(values_dtype)
        values = values.contiguous()
    csr = CSR(indptr, indices, values, cols)
    return csr if device is None else csr.to(device)


def positive_counts(indptr: torch.Tensor, nnz: int, users: Optional[torch.Tensor], B: int) -> torch.Tensor:
    """(B,) int64: how many ranks each scores row of ``target_rank`` puts in its output (its positives).

    0 for a row the kernels will refuse (users[b] or its indptr range out of
    range): the output is sized before they check. The compiled op does the
    same (target_rank_output in csrc/target_rank.h).
    """
    n_rows = indptr.shape[0] - 1
    r = users if users is not None else torch.arange(B, device=indptr.device)
    if n_rows == 0:
        return torch.zeros(B, dtype=torch.int64, device=indptr.device)
    in_range = (r >= 0) & (r < n_rows)
    r = r.clamp(0, n_rows - 1)
    lo, hi = indptr[r], indptr[r + 1]
    ok = in_range & (lo >= 0) & (lo <= hi) & (hi <= nnz)
    return torch.where(ok, hi - lo, 0)


