"""gather_rows: sparse-to-dense gathering of CSR rows (DESIGN.md, Op 3).

    out[b, :] = sum over j in [segments[b], segments[b+1]) of  weights[j] * A[rows[j], :]

This module is the op's whole Python side: argument conversion and checks
shared by every backend, the fake (meta) implementations of the compiled ops
``refit::gather_rows`` / ``refit::gather_rows_out`` and of their Triton
twins, and the public function that dispatches.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .. import _extension, dispatch, reference
from .._checks import check_no_overlap, dense_tensor, has_data, int_arg, int_sequence
from ..sparse import CSR, as_csr

_OP = "gather_rows"
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_args(indptr, indices, values, rows, segments, weights, n_cols: int) -> int:
    """Structural checks (types, shapes, devices) with the C++ ops' messages; returns B."""
    if indptr.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_OP}: matrix indptr must be int32 or int64, got {indptr.dtype}")
    if indices.dtype != indptr.dtype:
        raise TypeError(f"{_OP}: matrix indices must have indptr's dtype {indptr.dtype}, got {indices.dtype}")
    if indptr.dim() != 1 or indptr.shape[0] < 1:
        raise ValueError(f"{_OP}: matrix indptr must be 1-D with n_rows + 1 >= 1 entries, "
                         f"got shape {tuple(indptr.shape)}")
    if indices.dim() != 1:
        raise ValueError(f"{_OP}: matrix indices must be 1-D, got shape {tuple(indices.shape)}")
    if n_cols < 0:
        raise ValueError(f"{_OP}: n_cols must be >= 0, got {n_cols}")
    device = indptr.device
    if indices.device != device:
        raise ValueError(f"{_OP}: matrix indices is on {indices.device} but indptr is on {device}")
    if values is not None:
        if values.dtype != torch.float32:
            raise TypeError(f"{_OP}: matrix values must be float32, got {values.dtype}")
        if values.dim() != 1 or values.shape[0] != indices.shape[0]:
            raise ValueError(f"{_OP}: matrix values must have the shape of indices ({indices.shape[0]},), "
                             f"got {tuple(values.shape)}")
        if values.device != device:
            raise ValueError(f"{_OP}: matrix values is on {values.device} but indptr is on {device}")
    if rows.dtype != torch.int64:
        raise TypeError(f"{_OP}: rows must be int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"{_OP}: rows must be 1-D, got shape {tuple(rows.shape)}")
    if rows.device != device:
        raise ValueError(f"{_OP}: rows is on {rows.device} but the matrix is on {device}")
    B = rows.shape[0]
    if segments is not None:
        if segments.dtype != torch.int64:
            raise TypeError(f"{_OP}: segments must be int64, got {segments.dtype}")
        if segments.dim() != 1 or segments.shape[0] < 1:
            raise ValueError(f"{_OP}: segments must be 1-D offsets (B + 1,) with B >= 0, "
                             f"got shape {tuple(segments.shape)}")
        if segments.device != device:
            raise ValueError(f"{_OP}: segments is on {segments.device} but the matrix is on {device}")
        B = segments.shape[0] - 1
    if weights is not None:
        if weights.dtype != torch.float32:
            raise TypeError(f"{_OP}: weights must be float32, got {weights.dtype}")
        if weights.dim() != 1 or weights.shape[0] != rows.shape[0]:
            raise ValueError(f"{_OP}: weights must have the shape of rows ({rows.shape[0]},), "
                             f"got {tuple(weights.shape)}")
        if weights.device != device:
            raise ValueError(f"{_OP}: weights is on {weights.device} but the matrix is on {device}")
    return B


def _check_dtype(dtype) -> None:
    if dtype not in _OUT_DTYPES:
        raise TypeError(f"{_OP}: dtype must be float32, float16 or bfloat16, got {dtype}")


def _inputs(indptr, indices, values, rows, segments, weights):
    """The tensors a kernel reads, by name, for the aliasing check of ``out``."""
    return (("matrix indptr", indptr), ("matrix indices", indices), ("matrix values", values), ("rows", rows),
            ("segments", segments), ("weights", weights))


def _check_out(out, B: int, n_cols: int, device, overlap: bool = True, inputs=()) -> None:
    """Checks ``out``; with ``overlap`` (never while torch.compile traces) also its memory.

    ``inputs``: (name, tensor or None) pairs that ``out`` must not overlap.
    """
    if out.dtype not in _OUT_DTYPES:
        raise TypeError(f"{_OP}: out must be float32, float16 or bfloat16, got {out.dtype}")
    if out.dim() != 2 or tuple(out.shape) != (B, n_cols):
        raise ValueError(f"{_OP}: out must have shape (B, n_cols) = ({B}, {n_cols}), got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"{_OP}: out is on {out.device} but the matrix is on {device}")
    # (Skipped while torch.compile traces, which cannot; the ops check again.)
    if overlap and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"{_OP}: out has elements that share memory (an expanded tensor?); "
                         "pass a tensor whose elements are distinct")
    if overlap and inputs:  # (fake tensors, which have no addresses, pass none)
        check_no_overlap(out, inputs, _OP)


def check_data(indptr, indices, rows, segments, n_cols: int) -> None:
    """The data checks of the C++ kernels, in PyTorch (for the reference and Triton backends).

    Raises IndexError for a row id or a column id out of range and ValueError
    for bad segments or an indptr that does not describe the gathered rows,
    reporting the first offending gathered row, like the C++ kernels.
    """
    n = rows.shape[0]
    if segments is not None:
        B = segments.shape[0] - 1
        first, last = int(segments[0]), int(segments[-1])
        if first != 0 or last != n:
            raise ValueError(f"{_OP}: segments must start at 0 and end at len(rows) = {n}, got {first} .. {last}")
        if B > 0:
            dec = torch.nonzero(segments[1:] < segments[:-1])
            if dec.numel():
                b = int(dec[0])
                raise ValueError(f"{_OP}: segments must be non-decreasing, got segments[{b}] = "
                                 f"{int(segments[b])} > segments[{b + 1}] = {int(segments[b + 1])}")
    if n == 0:
        return
    n_rows, nnz = indptr.shape[0] - 1, indices.shape[0]
    if n_rows == 0:  # no row id is valid (and indptr[1], read below, does not exist)
        raise IndexError(f"{_OP}: rows[0] = {int(rows[0])} is out of range for a matrix with 0 rows")
    bad_row = (rows < 0) | (rows >= n_rows)
    safe = torch.where(bad_row, torch.zeros_like(rows), rows)
    p0 = indptr[safe].to(torch.int64)
    p1 = indptr[safe + 1].to(torch.int64)
    bad_ptr = ~bad_row & ((p0 < 0) | (p0 > p1) | (p1 > nnz))
    ok = ~(bad_row | bad_ptr)
    lens = torch.where(ok, p1 - p0, torch.zeros_like(p0))
    j_of = torch.repeat_interleave(torch.arange(n, device=rows.device), lens)
    k = p0[j_of] + torch.arange(j_of.shape[0], device=rows.device) - (torch.cumsum(lens, 0) - lens)[j_of]
    cols = indices[k].to(torch.int64)
    bad_col_entry = (cols < 0) | (cols >= n_cols)
    bad_col = torch.zeros(n, dtype=torch.bool, device=rows.device)
    bad_col[j_of[bad_col_entry]] = True
    bad = torch.nonzero(bad_row | bad_ptr | bad_col)
    if bad.numel() == 0:
        return
    j = int(bad[0])
    r = int(rows[j])
    if bool(bad_row[j]):
        raise IndexError(f"{_OP}: rows[{j}] = {r} is out of range for a matrix with {n_rows} rows")
    if bool(bad_ptr[j]):
        raise ValueError(f"{_OP}: matrix indptr of row {r} (rows[{j}]) gives the entries {int(p0[j])} .. "
                         f"{int(p1[j])}, not a range inside [0, nnz = {nnz}]")
    e = int(torch.nonzero(bad_col_entry & (j_of == j))[0])
    raise IndexError(f"{_OP}: matrix has column index {int(cols[e])} (indices[{int(k[e])}], in row {r} = "
                     f"rows[{j}]) out of range for n_cols = {n_cols}")


# --- fake (meta) implementations ----------------------------------------------

def _fake(indptr, indices, values, rows, segments, weights, n_cols, dtype):
    _check_dtype(dtype)
    B = check_args(indptr, indices, values, rows, segments, weights, n_cols)
    return torch.empty((B, n_cols), dtype=dtype, device=indptr.device)


def _fake_out(indptr, indices, values, rows, segments, weights, n_cols, out):
    B = check_args(indptr, indices, values, rows, segments, weights, n_cols)
    _check_out(out, B, n_cols, indptr.device)


if _extension.MODULE is not None:
    torch.library.register_fake("refit::gather_rows")(_fake)
    torch.library.register_fake("refit::gather_rows_out")(_fake_out)


# --- the Triton ops -------------------------------------------------------------
# Custom ops, so torch.compile traces calls to them as opaque nodes (their
# bodies read tensor values to validate them).
@torch.library.custom_op("refit::gather_rows_out_triton", mutates_args=("out",))
def _gather_rows_out_triton(indptr: torch.Tensor, indices: torch.Tensor, values: Optional[torch.Tensor],
                            rows: torch.Tensor, segments: Optional[torch.Tensor],
                            weights: Optional[torch.Tensor], n_cols: int, out: torch.Tensor) -> None:
    B = check_args(indptr, indices, values, rows, segments, weights, n_cols)
    _check_out(out, B, n_cols, indptr.device, inputs=_inputs(indptr, indices, values, rows, segments, weights))
    check_data(indptr, indices, rows, segments, n_cols)
    from ..triton import gather_rows as kernels

    kernels.gather_rows_into(indptr, indices, values, rows.contiguous(),
                             None if segments is None else segments.contiguous(),
                             None if weights is None else weights.contiguous(), out)


@torch.library.custom_op("refit::gather_rows_triton", mutates_args=())
def _gather_rows_triton(indptr: torch.Tensor, indices: torch.Tensor, values: Optional[torch.Tensor],
                        rows: torch.Tensor, segments: Optional[torch.Tensor], weights: Optional[torch.Tensor],
                        n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    _check_dtype(dtype)
    B = check_args(indptr, indices, values, rows, segments, weights, n_cols)
    out = torch.empty((B, n_cols), dtype=dtype, device=indptr.device)
    _gather_rows_out_triton(indptr, indices, values, rows, segments, weights, n_cols, out)
    return out


_gather_rows_triton.register_fake(_fake)
_gather_rows_out_triton.register_fake(_fake_out)


def _reference_out(indptr, indices, values, rows, segments, weights, n_cols, out):
    out.copy_(reference.gather_rows(indptr, indices, values, rows, segments, weights, n_cols, out.dtype))


# --- the public function ----------------------------------------------------------

def _index_tensor(x: Any, name: str, device: torch.device) -> torch.Tensor:
    """rows / segments as a 1-D int64 tensor on ``device`` (tensors, arrays and sequences of ints).

    Floats and bools are refused (TypeError), never truncated to ids.
    """
    if isinstance(x, torch.Tensor):
        dense_tensor(x, name, _OP)
        t = x
    elif isinstance(x, np.ndarray):
        if x.size == 0 and x.dtype.kind == "f":  # np.array([]) is float64
            x = x.astype(np.int64)
        if x.dtype.kind not in "iu":
            raise TypeError(f"{_OP}: {name} must hold integers, got a numpy array of {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple, range)):
        t = int_sequence(x, name, _OP)
    else:
        raise TypeError(f"{_OP}: {name} must be a tensor, a numpy array or a sequence of ints, got {type(x).__name__}")
    if not isinstance(x, torch.Tensor):
        t = t.to(device)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{_OP}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{_OP}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{_OP}: {name} is on {t.device} but the matrix is on {device}")
    return (t if t.dtype == torch.int64 else t.to(torch.int64)).contiguous()


def gather_rows(
    matrix: Any,
    rows: Any,
    *,
    segments: Any = None,
    weights: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    n_cols: Optional[int] = None,
) -> torch.Tensor:
    """Dense rows of a sparse (CSR) matrix, plain or as weighted sums of row groups.

        out[b, :] = sum over j in [segments[b], segments[b+1]) of  weights[j] * matrix[rows[j], :]

    The plain form (no ``segments``) turns a batch of users into the dense
    model input, ``out[b] = matrix[rows[b]]``, without a dense copy of the
    whole matrix. The segmented form builds aggregated profiles (e.g. of a
    user's similar users) in the same single pass.

    Args:
        matrix: (n_rows, n_cols) CSR matrix: a ``torch.sparse_csr_tensor``, a
            ``scipy.sparse`` CSR matrix, or an ``(indptr, indices[, values])``
            tuple (then give ``n_cols`` or ``out``). Without values (a tuple
            of two) every stored entry is 1. Values are used as float32.
            int32 indices (scipy's) are used as they are, without a copy.
        rows: (n,) row ids, int32 or int64 (tensor, numpy array or sequence
            of ints; floats and bools are refused, never truncated), each in
            [0, n_rows); repeats are allowed.
        segments: optional (B + 1,) non-decreasing int32/int64 offsets into ``rows`` with
            ``segments[0] == 0`` and ``segments[B] == n``; output row b sums
            the gathered rows ``segments[b]:segments[b+1]`` (an empty segment
            gives a zero row). Default: one gathered row per output row, B = n.
        weights: optional (n,) floating weight of each gathered row
            (used as float32). Default: ones.
        dtype: output dtype, torch.float32, torch.float16 or torch.bfloat16.
            Sums run in float32 and are rounded once.
        out: optional (B, n_cols) tensor of dtype ``dtype`` on the matrix's
            device, any strides, sharing no memory with any input (the
            matrix, ``rows``, ``segments``, ``weights``): overwritten in full
            (zeroed, then filled) and returned; no new output is allocated.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            None lets the dispatcher choose (``REFIT_BACKEND`` overrides).
        n_cols: the number of columns (an int), needed only for a tuple
            ``matrix`` without ``out``; checked against the matrix's own otherwise.

    Returns:
        (B, n_cols) tensor of ``dtype`` (``out`` itself when given). Entries
        add up in the order of a segment's rows, then of each row's entries;
        duplicate column ids inside one row add up too.

    Validation, identical on every backend: the structure of the matrix's
    ``indptr`` (starts at 0, non-decreasing, ends at nnz) is checked for the
    whole matrix before anything runs; row ids, and the column ids of the
    rows that are gathered, are checked before anything is written. Rows
    that are not gathered are not read, so a bad column id there is no error.

    Raises:
        IndexError naming ``rows`` (a row id out of range) or ``matrix`` (a
        column id out of range in a gathered row), raised before anything is
        written; ValueError naming ``matrix`` for a broken ``indptr``, and
        naming ``out`` for an ``out`` that overlaps an input; TypeError /
        ValueError naming any other offending argument (floats or bools for
        ids or ``n_cols``, sparse or meta tensors, wrong dtypes or shapes);
        refit_kernels.BackendUnavailable when a forced backend cannot run.

    Not differentiable: ``weights`` and the matrix's values must not require grad.
    """
    compiling = torch.compiler.is_compiling()
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{_OP}: out must be a torch.Tensor, got {type(out).__name__}")
        dense_tensor(out, "out", _OP)
    if n_cols is not None:
        n_cols = int_arg(n_cols, "n_cols", _OP)
    if n_cols is None and out is not None and out.dim() == 2:
        cols_hint = None if _has_own_columns(matrix) else out.shape[1]
    else:
        cols_hint = n_cols
    # The whole-matrix structure checks of indptr (O(n_rows)) run here, for
    # every backend alike; they cannot run while torch.compile traces, where
    # the kernels' checks of every indptr entry they read remain.
    csr: CSR = as_csr(matrix, "matrix", n_cols=cols_hint, values_dtype=torch.float32,
                      index_dtype=None, check=not compiling)
    if csr.n_cols is None:
        raise ValueError(f"{_OP}: matrix is an (indptr, indices[, values]) tuple, which does not say how many "
                         "columns it has: pass n_cols= (or out=)")
    cols = int(csr.n_cols)
    device = csr.device
    rows_t = _index_tensor(rows, "rows", device)
    seg_t = None if segments is None else _index_tensor(segments, "segments", device)
    w_t = None
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"{_OP}: weights must be a torch.Tensor, got {type(weights).__name__}")
        dense_tensor(weights, "weights", _OP)
        if not weights.is_floating_point():
            raise TypeError(f"{_OP}: weights must be floating point, got {weights.dtype}")
        w_t = weights.to(torch.float32).contiguous()
    for name, t in (("weights", weights), ("matrix values", csr.values)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{_OP}: {name} requires grad, but gather_rows is not differentiable; "
                             "pass a detached tensor")
    _check_dtype(dtype)
    B = check_args(csr.indptr, csr.indices, csr.values, rows_t, seg_t, w_t, cols)
    if out is not None:
        _check_out(out, B, cols, device, overlap=not compiling,
                   inputs=_inputs(csr.indptr, csr.indices, csr.values, rows_t, seg_t, w_t))
        if out.dtype != dtype:
            raise ValueError(f"{_OP}: out has dtype {_dtype_name(out.dtype)} but dtype is "
                             f"{_dtype_name(dtype)}; pass dtype=torch.{_dtype_name(out.dtype)} with this out")

    name = dispatch.select(_OP, device, backend)
    args = (csr.indptr, csr.indices, csr.values, rows_t, seg_t, w_t, cols)
    if name == "reference":
        if not compiling:
            check_data(csr.indptr, csr.indices, rows_t, seg_t, cols)
        if out is None:
            return reference.gather_rows(*args, dtype)
        _reference_out(*args, out)
        return out
    if name == "triton":
        if out is None:
            return _gather_rows_triton(*args, dtype)
        _gather_rows_out_triton(*args, out)
        return out
    if out is None:
        return torch.ops.refit.gather_rows.default(*args, dtype)
    torch.ops.refit.gather_rows_out.default(*args, out)
    return out


def _has_own_columns(matrix: Any) -> bool:
    """Whether ``matrix`` carries its column count (anything but a tuple)."""
    return not isinstance(matrix, (tuple, list))
