"""Triton kernel of target_rank (DESIGN.md, Op 4).

One program per row. The row's positives are taken BLOCK_P at a time (their
scores and ids as vectors); the row is streamed in blocks of BLOCK_I items
and a (BLOCK_P, BLOCK_I) comparison counts, per positive, the items that
beat it under topk_hits' ranking rule (higher score, or an equal score and a
lower id). Excluded items are taken off afterwards from a pass over the
row's exclusion list, so the main loop has no exclusion test; an excluded
positive (found by binary search in that sorted list) gets -1. A row with at
most BLOCK_P positives is read once (BLOCK_P is chosen per call from the
longest positives row, up to 16). No selection, no sort.

Problems with the inputs are not raised in the kernel: every check writes
the row's first problem into a (B, 4) report (the layout of
csrc/include/refit/topk_hits.h, in the order every backend checks:
exclude, NaN, positives), loads that depend on unchecked values are
masked, and the host raises from the report.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from ..sparse import positive_counts
from .topk_hits import _ARG_POSITIVES, _ARG_SCORES, _NAN, _check_user_row, _in_sorted, _keep_first, _start_row

#: The most positives one pass over a row counts (the width of the comparison block).
MAX_BLOCK_P = 16


@triton.jit
def _beats(s, i, sp, p):
    """(P, N) whether items i (scores s, (N,)) rank before positives p (scores sp, (P,))."""
    return (s[None, :] > sp[:, None]) | ((s[None, :] == sp[:, None]) & (i[None, :] < p[:, None]))


@triton.jit
def _target_rank_kernel(
    Scores_ptr, score_row_stride, I,
    Users_ptr,
    ExIndptr_ptr, ExIndices_ptr, ex_rows, ex_nnz,
    PoIndptr_ptr, PoIndices_ptr, po_rows, po_nnz,
    Starts_ptr, Ranks_ptr, Report_ptr,
    HAS_USERS: tl.constexpr, HAS_EXCL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, u, ex_lo, ex_hi, e_code, e_arg, e_row, e_detail = _start_row(
        Users_ptr, ExIndptr_ptr, ExIndices_ptr, ex_rows, ex_nnz, I, HAS_USERS, HAS_EXCL, BLOCK_C)
    zero = tl.zeros([], tl.int64)
    # Excluded ids index the scores: only an exclusion row without problems is used.
    ex_hi = tl.where(e_code == 0, ex_hi, ex_lo)

    # The positives: needed for the pass, reported after the scores (NaN).
    lo, hi, po_code, po_row, po_detail = _check_user_row(PoIndptr_ptr, PoIndices_ptr, u, po_rows, po_nnz, I, BLOCK_C)
    n_pos = tl.where(po_code == 0, hi - lo, 0)
    if HAS_USERS:
        out_at = tl.load(Starts_ptr + b)
    else:
        out_at = lo

    row = Scores_ptr + b * score_row_stride
    nan_at = zero + I
    n_chunks = tl.maximum((n_pos + BLOCK_P - 1) // BLOCK_P, 1)  # one pass at least, which finds NaN
    for c in range(0, n_chunks):
        j = c * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        live = j < n_pos
        p = tl.load(PoIndices_ptr + lo + j, mask=live, other=0)
        sp = tl.load(row + p, mask=live, other=0.0).to(ACC)
        cnt = tl.zeros([BLOCK_P], tl.int32)
        for start in range(0, I, BLOCK_I):
            items = start + tl.arange(0, BLOCK_I).to(tl.int64)
            in_row = items < I
            x = tl.load(row + items, mask=in_row, other=0.0).to(ACC)
            nan_at = tl.minimum(nan_at, tl.min(tl.where(in_row & (x != x), items, I)))
            win = _beats(x, items, sp, p) & in_row[None, :]
            cnt += tl.sum(win.to(tl.int32), axis=1)
        excluded = j < 0
        if HAS_EXCL:
            for start in range(ex_lo, ex_hi, BLOCK_C):
                je = start + tl.arange(0, BLOCK_C).to(tl.int64)
                inside = je < ex_hi
                e = tl.load(ExIndices_ptr + je, mask=inside, other=0)
                se = tl.load(row + e, mask=inside, other=0.0).to(ACC)
                cnt -= tl.sum((_beats(se, e, sp, p) & inside[None, :]).to(tl.int32), axis=1)
            excluded = _in_sorted(ExIndices_ptr, ex_lo, ex_hi, p)
        rank = tl.where(excluded, -1, cnt.to(tl.int64))
        tl.store(Ranks_ptr + out_at + j, rank, mask=live)

    e_code, e_arg, e_row, e_detail = _keep_first(
        e_code, e_arg, e_row, e_detail, tl.where(nan_at < I, _NAN, 0).to(tl.int64), _ARG_SCORES, zero, nan_at)
    e_code, e_arg, e_row, e_detail = _keep_first(e_code, e_arg, e_row, e_detail, po_code, _ARG_POSITIVES, po_row,
                                                 po_detail)
    tl.store(Report_ptr + b * 4 + 0, e_code)
    tl.store(Report_ptr + b * 4 + 1, e_arg)
    tl.store(Report_ptr + b * 4 + 2, e_row)
    tl.store(Report_ptr + b * 4 + 3, e_detail)


def target_rank(scores: torch.Tensor, users: Optional[torch.Tensor], exclude_indptr: Optional[torch.Tensor],
                exclude_indices: Optional[torch.Tensor], positives_indptr: torch.Tensor,
                positives_indices: torch.Tensor) -> torch.Tensor:
    """The op on checked plain tensors (see refit_kernels/ops/target_rank.py).

    Returns the (n,) int64 ranks like the compiled op; raises from the
    kernel's per-row report.
    """
    if scores.shape[1] > 1 and scores.stride(1) != 1:
        scores = scores.contiguous()
    B, I = scores.shape
    dev = scores.device
    nnz = positives_indices.shape[0]
    lengths = positive_counts(positives_indptr, nnz, users, B)
    if users is None:
        # Beside the positives' entries; an entry no row holds stays -1 (csrc/target_rank.h).
        ranks = torch.full((nnz,), -1, dtype=torch.int64, device=dev)
        starts = None
    else:
        ends = torch.cumsum(lengths, 0)
        ranks = torch.empty((int(ends[-1]) if B else 0,), dtype=torch.int64, device=dev)
        starts = ends - lengths
    report = torch.zeros((B, 4), dtype=torch.int64, device=dev)
    if B > 0:
        longest = int(lengths.max())
        block_p = min(MAX_BLOCK_P, triton.next_power_of_2(max(longest, 1)))
        none = torch.zeros(1, dtype=torch.int64, device=dev)  # stands for absent tensors
        pick = lambda t: none if t is None else t.contiguous()  # noqa: E731
        _target_rank_kernel[(B,)](
            scores, scores.stride(0), I,
            pick(users),
            pick(exclude_indptr), pick(exclude_indices),
            0 if exclude_indptr is None else exclude_indptr.shape[0] - 1,
            0 if exclude_indices is None else exclude_indices.shape[0],
            positives_indptr.contiguous(), positives_indices.contiguous(), positives_indptr.shape[0] - 1, nnz,
            pick(starts), ranks, report,
            HAS_USERS=users is not None, HAS_EXCL=exclude_indptr is not None,
            ACC=tl.float64 if scores.dtype == torch.float64 else tl.float32,
            BLOCK_I=max(16, 1024 // block_p), BLOCK_P=block_p, BLOCK_C=64,
        )
    n_rows = {"exclude": None if exclude_indptr is None else exclude_indptr.shape[0] - 1,
              "positives": positives_indptr.shape[0] - 1}
    error = reference.topk_row_error(report.cpu(), I, n_rows, op="target_rank")
    if error is not None:
        raise error
    return ranks
