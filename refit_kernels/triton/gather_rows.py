"""Triton kernel of gather_rows (DESIGN.md, Op 3).

One program per output row walks its segment's gathered rows in order and
adds each row's weighted entries into a float32 accumulator row with atomic
adds (a row's entries are spread over the program's lanes, and distinct
lanes may hold the same column when a segment repeats a column). The
accumulator is the output itself for float32, else a float32 workspace that
is rounded into the output once at the end.

Indices are validated before the kernel runs (in
:mod:`refit_kernels.ops.gather_rows`), so every load is in bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    Indptr_ptr, Indices_ptr, Values_ptr, Rows_ptr, Segments_ptr, Weights_ptr, Acc_ptr,
    acc_row_stride, acc_col_stride,
    HAS_VALUES: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if HAS_SEGMENTS:
        j0 = tl.load(Segments_ptr + b)
        j1 = tl.load(Segments_ptr + b + 1)
    else:
        j0 = b
        j1 = b + 1
    acc_row = Acc_ptr + b * acc_row_stride
    for j in range(j0, j1):
        r = tl.load(Rows_ptr + j)
        p0 = tl.load(Indptr_ptr + r).to(tl.int64)
        p1 = tl.load(Indptr_ptr + r + 1).to(tl.int64)
        if HAS_WEIGHTS:
            w = tl.load(Weights_ptr + j)
        else:
            w = 1.0
        for start in range(p0, p1, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < p1
            cols = tl.load(Indices_ptr + offs, mask=mask, other=0).to(tl.int64)
            if HAS_VALUES:
                v = tl.load(Values_ptr + offs, mask=mask, other=0.0) * w
            else:
                v = tl.zeros([BLOCK], dtype=tl.float32) + w
            tl.atomic_add(acc_row + cols * acc_col_stride, v, mask=mask)


def gather_rows_into(indptr, indices, values, rows, segments, weights, out) -> None:
    """Fills ``out`` (B, n_cols) with the gathered sums; every index is already validated."""
    B, n_cols = out.shape
    acc = out if out.dtype == torch.float32 else torch.empty((B, n_cols), dtype=torch.float32, device=out.device)
    acc.zero_()
    if B > 0 and n_cols > 0 and rows.shape[0] > 0:
        dummy = rows  # stands in for absent optional pointers (never read)
        _gather_rows_kernel[(B,)](
            indptr, indices, dummy if values is None else values, rows,
            dummy if segments is None else segments, dummy if weights is None else weights, acc,
            acc.stride(0), acc.stride(1),
            HAS_VALUES=values is not None, HAS_SEGMENTS=segments is not None,
            HAS_WEIGHTS=weights is not None, BLOCK=128,
        )
    if acc is not out:
        out.copy_(acc)  # one round-to-nearest-even per element
