"""Triton kernel of topk_hits (DESIGN.md, Op 2).

One program per row. The row's items are visited in blocks of KPAD
(KPAD = next power of two >= Kmax); each item becomes a packed int64 key that
orders (score, item) pairs exactly as the ranking rule does:

    key = (order-preserving int32 code of the score) << 32 | (I - 1 - item)

so a larger key ranks earlier and equal scores fall to the lower id. Excluded
items (found by binary search in the row's sorted exclusion list) and the
padding past I get the smallest int64, below every real key. A block is
merged into the running top list with the first step of a bitonic merge:
the running list sorted descending and the block sorted ascending, their
elementwise maximum holds the best KPAD keys of both. No row is ever sorted
whole. Hits and neighbor counts compare the positives and each neighbor's
items against the KPAD selected ids.

Problems with the inputs are not raised in the kernel: every check writes
the row's first problem into a (B, 4) report (the layout of
csrc/include/refit/topk_hits.h), loads that depend on unchecked values are
masked, and the host raises from the report.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import reference

_NAN = tl.constexpr(reference.TOPK_NAN)
_USER_RANGE = tl.constexpr(reference.TOPK_USER_RANGE)
_BAD_INDPTR = tl.constexpr(reference.TOPK_BAD_INDPTR)
_COLUMN_RANGE = tl.constexpr(reference.TOPK_COLUMN_RANGE)
_UNSORTED = tl.constexpr(reference.TOPK_UNSORTED)
_NEIGHBOR_RANGE = tl.constexpr(reference.TOPK_NEIGHBOR_RANGE)
_ARG_SCORES = tl.constexpr(0)
_ARG_EXCLUDE = tl.constexpr(1)
_ARG_POSITIVES = tl.constexpr(2)
_ARG_NEIGHBORS = tl.constexpr(3)
_ARG_SETS = tl.constexpr(4)


@triton.jit
def _rank_keys(x, items, I):
    """Packed int64 keys of float32 scores x at int64 item ids (larger = ranked earlier)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 are the same score
    bits = x.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their magnitude bits.
    code = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (code.to(tl.int64) << 32) | (I - 1 - items)


@triton.jit
def _none_keys(N: tl.constexpr):
    """The smallest int64, the key of nothing (excluded items, padding)."""
    return tl.full([N], -2147483648, tl.int32).to(tl.int64) << 32


@triton.jit
def _keep_first(e_code, e_arg, e_row, e_detail, code, arg, row, detail):
    """The row's report keeps its first problem: (code, ...) only fills an empty report."""
    take = (e_code == 0) & (code != 0)
    return (tl.where(take, code, e_code), tl.where(take, arg, e_arg),
            tl.where(take, row, e_row), tl.where(take, detail, e_detail))


@triton.jit
def _check_row(Indptr_ptr, Indices_ptr, r, r_ok, nnz, I, BLOCK: tl.constexpr):
    """[lo, hi) of CSR row r (when r_ok) and its first problem (code, detail).

    Checks the indptr range, then each column in order: in [0, I) and above
    its predecessor. A bad indptr range yields an empty row, so nothing is
    read out of bounds.
    """
    lo = tl.load(Indptr_ptr + r, mask=r_ok, other=0)
    hi = tl.load(Indptr_ptr + r + 1, mask=r_ok, other=0)
    ptr_ok = (lo >= 0) & (lo <= hi) & (hi <= nnz)
    code = tl.where(r_ok & (~ptr_ok), _BAD_INDPTR, 0).to(tl.int64)
    lo = tl.where(ptr_ok, lo, 0)
    hi = tl.where(ptr_ok, hi, 0)
    first_bad = hi
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = j < hi
        c = tl.load(Indices_ptr + j, mask=inside, other=0)
        prev = tl.load(Indices_ptr + j - 1, mask=inside & (j > lo), other=-1)
        bad = inside & ((c < 0) | (c >= I) | ((j > lo) & (c <= prev)))
        first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, j, hi)))
    has = first_bad < hi
    c = tl.load(Indices_ptr + first_bad, mask=has, other=0)
    code = tl.where(has, tl.where((c < 0) | (c >= I), _COLUMN_RANGE, _UNSORTED), code).to(tl.int64)
    detail = tl.where(has, c, 0).to(tl.int64)
    return lo, hi, code, detail


@triton.jit
def _check_user_row(Indptr_ptr, Indices_ptr, u, n_rows, nnz, I, BLOCK: tl.constexpr):
    """[lo, hi) of CSR row u = users[b] and its first problem as (code, csr_row, detail) for the report:
    u out of range (csr_row 0, detail u), then the row's own checks (_check_row)."""
    r_ok = (u >= 0) & (u < n_rows)
    lo, hi, code, detail = _check_row(Indptr_ptr, Indices_ptr, u, r_ok, nnz, I, BLOCK)
    code = tl.where(r_ok, code, _USER_RANGE).to(tl.int64)
    row = tl.where(r_ok, u, 0).to(tl.int64)
    detail = tl.where(r_ok, detail, u).to(tl.int64)
    return lo, hi, code, row, detail


@triton.jit
def _start_row(Users_ptr, ExIndptr_ptr, ExIndices_ptr, ex_rows, ex_nnz, I, HAS_USERS: tl.constexpr,
               HAS_EXCL: tl.constexpr, BLOCK_C: tl.constexpr):
    """What a ranking kernel's program knows first: its scores row b, the CSR row u (users[b], or b),
    the checked exclusion range [ex_lo, ex_hi) (empty without exclude), and the row's report so far
    (code, arg, csr_row, detail)."""
    b = tl.program_id(0).to(tl.int64)
    if HAS_USERS:
        u = tl.load(Users_ptr + b)
    else:
        u = b
    zero = tl.zeros([], tl.int64)
    e_code, e_arg, e_row, e_detail = zero, zero, zero, zero
    ex_lo = zero
    ex_hi = zero
    if HAS_EXCL:
        ex_lo, ex_hi, code, row, detail = _check_user_row(ExIndptr_ptr, ExIndices_ptr, u, ex_rows, ex_nnz, I, BLOCK_C)
        e_code, e_arg, e_row, e_detail = _keep_first(e_code, e_arg, e_row, e_detail, code, _ARG_EXCLUDE, row, detail)
    return b, u, ex_lo, ex_hi, e_code, e_arg, e_row, e_detail


@triton.jit
def _in_sorted(Indices_ptr, lo0, hi0, items):
    """Whether each item is among the sorted column indices [lo0, hi0) (binary search)."""
    lo = tl.zeros_like(items) + lo0
    hi = tl.zeros_like(items) + hi0
    while tl.max(hi - lo) > 0:
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(Indices_ptr + mid, mask=active, other=0)
        right = active & (v < items)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (v >= items), mid, hi)
    there = lo < hi0
    v = tl.load(Indices_ptr + lo, mask=there, other=-1)
    return there & (v == items)


@triton.jit
def _topk_hits_kernel(
    Scores_ptr, score_row_stride, I,
    Ks_ptr, n_ks, kmax,
    Users_ptr,
    ExIndptr_ptr, ExIndices_ptr, ex_rows, ex_nnz,
    PoIndptr_ptr, PoIndices_ptr, po_rows, po_nnz,
    Nbr_ptr, M,
    NsIndptr_ptr, NsIndices_ptr, ns_rows, ns_nnz,
    Disc_ptr,
    Hits_ptr, Dcg_ptr, NbrHits_ptr, First_ptr, Indices_ptr, Report_ptr,
    HAS_USERS: tl.constexpr, HAS_EXCL: tl.constexpr, HAS_POS: tl.constexpr, HAS_NBR: tl.constexpr,
    WRITE_INDICES: tl.constexpr, KPAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, u, ex_lo, ex_hi, e_code, e_arg, e_row, e_detail = _start_row(
        Users_ptr, ExIndptr_ptr, ExIndices_ptr, ex_rows, ex_nnz, I, HAS_USERS, HAS_EXCL, BLOCK_C)
    zero = tl.zeros([], tl.int64)

    # Selection: merge blocks of keys into the best KPAD seen so far.
    row = Scores_ptr + b * score_row_stride
    top = _none_keys(KPAD)
    nan_at = zero + I
    for start in range(0, I, KPAD):
        items = start + tl.arange(0, KPAD).to(tl.int64)
        in_row = items < I
        x = tl.load(row + items, mask=in_row, other=0.0).to(tl.float32)
        is_nan = in_row & (x != x)
        nan_at = tl.minimum(nan_at, tl.min(tl.where(is_nan, items, I)))
        rankable = in_row & (x == x)
        if HAS_EXCL:
            rankable = rankable & (~_in_sorted(ExIndices_ptr, ex_lo, ex_hi, items))
        keys = tl.where(rankable, _rank_keys(x, items, I), _none_keys(KPAD))
        if tl.max(keys) > tl.min(top):
            top = tl.maximum(tl.sort(top, descending=True), tl.sort(keys))
    e_code, e_arg, e_row, e_detail = _keep_first(
        e_code, e_arg, e_row, e_detail, tl.where(nan_at < I, _NAN, 0).to(tl.int64), _ARG_SCORES, zero, nan_at)

    top = tl.sort(top, descending=True)
    rank = tl.arange(0, KPAD)
    ranked = (rank < kmax) & (top > _none_keys(KPAD))
    ids = tl.where(ranked, (I - 1) - (top & 0x7FFFFFFF), -1)

    hit = tl.zeros([KPAD], tl.int32)
    if HAS_POS:
        lo, hi, code, row, detail = _check_user_row(PoIndptr_ptr, PoIndices_ptr, u, po_rows, po_nnz, I, BLOCK_C)
        e_code, e_arg, e_row, e_detail = _keep_first(e_code, e_arg, e_row, e_detail, code, _ARG_POSITIVES, row,
                                                     detail)
        for start in range(lo, hi, BLOCK_C):
            j = start + tl.arange(0, BLOCK_C).to(tl.int64)
            c = tl.load(PoIndices_ptr + j, mask=j < hi, other=-1)
            match = (c[:, None] == ids[None, :]) & ranked[None, :] & (j < hi)[:, None]
            hit = tl.maximum(hit, tl.max(match.to(tl.int32), axis=0))

    cnt = tl.zeros([KPAD], tl.int32)
    n_valid = zero
    if HAS_NBR:
        for m in range(0, M):
            v = tl.load(Nbr_ptr + b * M + m)
            bad_id = (v < -1) | (v >= ns_rows)
            e_code, e_arg, e_row, e_detail = _keep_first(
                e_code, e_arg, e_row, e_detail, tl.where(bad_id, _NEIGHBOR_RANGE, 0).to(tl.int64),
                _ARG_NEIGHBORS, zero + m, v)
            v_ok = (v >= 0) & (v < ns_rows)
            lo, hi, code, detail = _check_row(NsIndptr_ptr, NsIndices_ptr, v, v_ok, ns_nnz, I, BLOCK_C)
            e_code, e_arg, e_row, e_detail = _keep_first(e_code, e_arg, e_row, e_detail, code, _ARG_SETS, v, detail)
            n_valid += v_ok.to(tl.int64)
            for start in range(lo, hi, BLOCK_C):
                j = start + tl.arange(0, BLOCK_C).to(tl.int64)
                c = tl.load(NsIndices_ptr + j, mask=j < hi, other=-1)
                match = (c[:, None] == ids[None, :]) & ranked[None, :] & (j < hi)[:, None]
                cnt += tl.sum(match.to(tl.int32), axis=0)

    disc = tl.load(Disc_ptr + rank, mask=rank < kmax, other=0.0)
    is_hit = (hit > 0) & ranked
    first = tl.min(tl.where(is_hit, rank, KPAD))
    tl.store(First_ptr + b, tl.where(first < KPAD, first, -1).to(tl.int64))
    denom = tl.maximum(n_valid, 1).to(tl.float64)
    for j in range(0, n_ks):
        k = tl.load(Ks_ptr + j)
        inside = rank < k
        h = tl.sum(tl.where(inside & is_hit, 1, 0))
        d = tl.sum(tl.where(inside & is_hit, disc, 0.0))
        c = tl.sum(tl.where(inside, cnt, 0))
        nh = tl.where(n_valid > 0, c.to(tl.float64) / denom, 0.0)
        tl.store(Hits_ptr + b * n_ks + j, h.to(tl.int64))
        tl.store(Dcg_ptr + b * n_ks + j, d.to(tl.float32))
        tl.store(NbrHits_ptr + b * n_ks + j, nh.to(tl.float32))
    if WRITE_INDICES:
        tl.store(Indices_ptr + b * kmax + rank, ids.to(tl.int64), mask=rank < kmax)
    tl.store(Report_ptr + b * 4 + 0, e_code)
    tl.store(Report_ptr + b * 4 + 1, e_arg)
    tl.store(Report_ptr + b * 4 + 2, e_row)
    tl.store(Report_ptr + b * 4 + 3, e_detail)


def topk_hits(scores: torch.Tensor, ks: List[int], users: Optional[torch.Tensor],
              exclude_indptr: Optional[torch.Tensor], exclude_indices: Optional[torch.Tensor],
              positives_indptr: Optional[torch.Tensor], positives_indices: Optional[torch.Tensor],
              neighbors: Optional[torch.Tensor], neighbor_sets_indptr: Optional[torch.Tensor],
              neighbor_sets_indices: Optional[torch.Tensor], return_indices: bool):
    """The op on checked plain tensors (see refit_kernels/ops/topk_hits.py); Kmax <= 1024.

    Returns (hits, dcg, neighbor_hits, first_hit, indices) like the compiled
    op; raises from the kernel's per-row report.
    """
    if scores.shape[1] > 1 and scores.stride(1) != 1:
        scores = scores.contiguous()
    B, I = scores.shape
    dev = scores.device
    n_k, kmax = len(ks), ks[-1]
    hits = torch.empty((B, n_k), dtype=torch.int64, device=dev)
    dcg = torch.empty((B, n_k), dtype=torch.float32, device=dev)
    nbr_hits = torch.empty((B, n_k), dtype=torch.float32, device=dev)
    first_hit = torch.empty((B,), dtype=torch.int64, device=dev)
    indices = torch.empty((B, kmax if return_indices else 0), dtype=torch.int64, device=dev)
    report = torch.zeros((B, 4), dtype=torch.int64, device=dev)
    if B > 0:
        kpad = max(16, triton.next_power_of_2(kmax))
        block_c = max(8, min(64, 4096 // kpad))
        none = torch.zeros(1, dtype=torch.int64, device=dev)  # stands for absent tensors
        pick = lambda t: none if t is None else t.contiguous()  # noqa: E731
        rows = lambda p: 0 if p is None else p.shape[0] - 1  # noqa: E731
        nnz = lambda i: 0 if i is None else i.shape[0]  # noqa: E731
        ks_t = torch.tensor(ks, dtype=torch.int64, device=dev)
        disc = 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float64, device=dev) + 2.0)
        nbrs = None if neighbors is None else neighbors.contiguous()
        _topk_hits_kernel[(B,)](
            scores, scores.stride(0), I,
            ks_t, n_k, kmax,
            pick(users),
            pick(exclude_indptr), pick(exclude_indices), rows(exclude_indptr), nnz(exclude_indices),
            pick(positives_indptr), pick(positives_indices), rows(positives_indptr), nnz(positives_indices),
            pick(nbrs), 0 if nbrs is None else nbrs.shape[1],
            pick(neighbor_sets_indptr), pick(neighbor_sets_indices), rows(neighbor_sets_indptr),
            nnz(neighbor_sets_indices),
            disc,
            hits, dcg, nbr_hits, first_hit, indices if return_indices else none, report,
            HAS_USERS=users is not None, HAS_EXCL=exclude_indptr is not None,
            HAS_POS=positives_indptr is not None, HAS_NBR=neighbors is not None,
            WRITE_INDICES=return_indices, KPAD=kpad, BLOCK_C=block_c,
        )
    n_rows = {"exclude": None if exclude_indptr is None else exclude_indptr.shape[0] - 1,
              "positives": None if positives_indptr is None else positives_indptr.shape[0] - 1,
              "neighbor_sets": None if neighbor_sets_indptr is None else neighbor_sets_indptr.shape[0] - 1}
    error = reference.topk_row_error(report.cpu(), I, n_rows)
    if error is not None:
        raise error
    return hits, dcg, nbr_hits, first_hit, indices
