"""Similar users by cosine similarity of their interaction rows, and their aggregated profiles.

:func:`top_similar_users` gives, for every user, the m users whose rows are
most cosine-similar (the neighbors of the N_sim-K reward), computed in blocks
of users so memory stays O(block x n_users). :func:`neighbor_profiles` sums
the neighbors' rows into one dense row per user with ``gather_rows``'
segmented form.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Tuple

import torch

import refit_kernels as rk

from . import distributed as dist

#: Elements of one block's (block x n_users) similarity matrix: 4 MB in float64, so a
#: block's working arrays stay in cache (larger blocks measured slower).
_BLOCK_ELEMENTS = 1 << 19


def _sparse_tensor(csr: rk.CSR, dtype: torch.dtype) -> torch.Tensor:
    values = torch.ones(csr.nnz, dtype=dtype) if csr.values is None else csr.values.to(dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(csr.indptr.long(), csr.indices.long(), values,
                                       size=(csr.n_rows, int(csr.n_cols)), check_invariants=False)


def top_similar_users(matrix: Any, m: int = 10, *, block_size: Optional[int] = None,
                      return_similarity: bool = False, measure: str = "cosine",
                      user_range: Optional[Tuple[int, int]] = None):
    """The m most cosine-similar users of every user.

    Similarity of users u and v is ``<x_u, x_v> / (|x_u| |x_v|)`` over their
    rows of ``matrix`` (the training interactions); with ``measure="overlap"``
    it is the plain ``<x_u, x_v>`` (for 0/1 rows: the number of shared
    items, CF-Diff's weighting of 3-hop neighbors). A user's neighbors are
    the users with positive similarity, highest first, ties to the lower id;
    the user itself is excluded. Rows are padded with -1 when fewer than m
    users qualify, so a user without interactions gets m times -1.

    Exact: the ranking compares ``dot * |dot| / |x_v|^2`` (the similarity
    times the constant ``|x_u|``, squared with its sign), computed from exact
    dot products for 0/1 matrices (and any matrix whose products and sums are
    exact in float64), so equal similarities are equal keys and ties resolve
    by id, not by rounding.

    Memory: the users are processed in blocks of ``block_size`` (default:
    about 512K / n_users), each holding O(block_size x n_users) values; the
    n_users x n_users matrix is never formed.

    Args:
        matrix: (n_users, n_items) CSR matrix in any form ``gather_rows``
            accepts (a scipy matrix, a torch sparse CSR tensor, ...); CPU.
        m: neighbors per user (>= 1).
        block_size: users per block.
        return_similarity: also return the (n_users, m) float64 similarities
            (0 where padded).
        measure: ``"cosine"`` (default) or ``"overlap"``.
        user_range: ``(start, stop)``: compute the rows of these users only
            (their neighbors are still searched among all users); each row
            is the same as in the full table.

    Returns:
        (n_users, m) int64 tensor of user ids (-1 = padding), and with
        ``return_similarity`` the similarities as well; with ``user_range``,
        (stop - start, m).
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    if measure not in ("cosine", "overlap"):
        raise ValueError(f"measure must be 'cosine' or 'overlap', got {measure!r}")
    csr = rk.as_csr(matrix, "matrix", values_dtype=torch.float64)
    if csr.n_cols is None:
        raise ValueError("matrix: pass a matrix that knows its column count (scipy or torch sparse)")
    if csr.device.type != "cpu":
        csr = csr.to("cpu")
    n = csr.n_rows
    lo, hi = (0, n) if user_range is None else (int(user_range[0]), int(user_range[1]))
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"user_range must satisfy 0 <= start <= stop <= n_users={n}, got {user_range}")
    ids = torch.full((hi - lo, m), -1, dtype=torch.int64)
    sims = torch.zeros((hi - lo, m), dtype=torch.float64)
    if n == 0 or hi == lo:
        return (ids, sims) if return_similarity else ids
    binary = csr.values is None or bool((csr.values == 1).all())
    # 0/1 rows: dot products are counts, exact in float32 (below 2^24).
    work = torch.float32 if binary else torch.float64
    values = None if binary else csr.values
    X = _sparse_tensor(rk.CSR(csr.indptr, csr.indices, values, csr.n_cols), work)
    counts = (csr.indptr[1:] - csr.indptr[:-1]).to(torch.float64)
    sq_norm = counts if binary else torch.zeros(n, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(n), csr.indptr[1:] - csr.indptr[:-1]), csr.values ** 2)
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // n)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    k = min(m, n)
    all_ids = torch.arange(n)
    gather_matrix = (csr.indptr, csr.indices) if binary else (csr.indptr, csr.indices, csr.values.float())
    for u0 in range(lo, hi, block_size):
        u1 = min(hi, u0 + block_size)
        block = torch.arange(u0, u1)
        if binary:
            dense = rk.gather_rows(gather_matrix, block, n_cols=int(csr.n_cols))
        else:
            dense = _dense_rows_float64(csr, block)
        dot = torch.sparse.mm(X, dense.t().contiguous()).t().to(torch.float64)  # (b, n)
        if measure == "overlap":
            key = dot.clone()
        else:
            # Ranking key of v for u: sim(u, v) * |x_u|, squared with its sign; exact divisions.
            key = dot * dot.abs() / torch.where(sq_norm > 0, sq_norm, torch.ones_like(sq_norm))
        key[torch.arange(u1 - u0), block] = -math.inf  # not one's own neighbor
        key[:, sq_norm == 0] = -math.inf
        chosen = _top_ids(key, k, all_ids)  # (b, k), -1 padded
        ids[u0 - lo:u1 - lo, :k] = chosen
        if return_similarity:
            safe = chosen.clamp(min=0)
            d = dot.gather(1, safe)
            s = d if measure == "overlap" else d / torch.sqrt(sq_norm[block][:, None] * sq_norm[safe])
            sims[u0 - lo:u1 - lo, :k] = torch.where(chosen >= 0, s, torch.zeros_like(s))
    return (ids, sims) if return_similarity else ids


def shared_similar_users(matrix: Any, m: int = 10, **options):
    """:func:`top_similar_users` computed once by all the processes of a torch.distributed job.

    Each rank computes a contiguous block of users (``user_range``) and the
    blocks are all-gathered, so every rank ends up with the whole
    (n_users, m) table, equal to the single-process one, for 1 / world_size of
    the work each. In a single process it is :func:`top_similar_users`. Every
    rank must call it (it is a collective).
    """
    if not dist.is_distributed():
        return top_similar_users(matrix, m, **options)
    n = rk.as_csr(matrix, "matrix").n_rows
    part = top_similar_users(matrix, m, user_range=dist.shard_range(n), **options)
    if isinstance(part, tuple):
        return tuple(dist.all_gather_rows(p) for p in part)
    return dist.all_gather_rows(part)


def _dense_rows_float64(csr: rk.CSR, block: torch.Tensor) -> torch.Tensor:
    """Dense float64 rows (exact values; gather_rows outputs at most float32)."""
    starts, ends = csr.indptr[block], csr.indptr[block + 1]
    lens = ends - starts
    r = torch.repeat_interleave(torch.arange(block.shape[0]), lens)
    k = starts[r] + torch.arange(r.shape[0]) - (torch.cumsum(lens, 0) - lens)[r]
    out = torch.zeros(block.shape[0], int(csr.n_cols), dtype=torch.float64)
    out.index_put_((r, csr.indices[k].long()), csr.values[k].to(torch.float64), accumulate=True)
    return out


def _top_ids(key: torch.Tensor, k: int, all_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the ids of the k largest positive keys, largest first, ties to the lower id; -1 padded.

    topk alone may pick any of several tied keys at the k-th place; here the
    set is fixed first (everything above the k-th value, then the lowest ids
    among those equal to it), then ordered with a stable sort.
    """
    b, n = key.shape
    kth = torch.topk(key, k, dim=1, sorted=True).values[:, k - 1 : k]  # (b, 1)
    positive = key > 0
    above = (key > kth) & positive
    tied = (key == kth) & (kth > 0)
    need = k - above.sum(1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, 1) <= need))
    # The chosen ids in ascending order (at most k per row; n marks an empty slot).
    cand = torch.where(chosen, all_ids[None, :], torch.full_like(key, n, dtype=torch.int64))
    ids = -torch.topk(-cand, k, dim=1, sorted=True).values
    valid = ids < n
    keys = torch.where(valid, key.gather(1, ids.clamp(max=n - 1)), torch.full(ids.shape, -math.inf, dtype=key.dtype))
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    ids = ids.gather(1, order)
    return torch.where(ids < n, ids, torch.full_like(ids, -1))


def neighbor_profiles(matrix: Any, neighbors: torch.Tensor, *, weights: Optional[torch.Tensor] = None,
                      mean: bool = True, dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Sums of neighbors' rows: ``out[b] = sum_j w[b, j] * matrix[neighbors[b, j]]`` over valid j.

    Args:
        matrix: (n_users, n_items) CSR matrix (any form ``gather_rows`` takes).
        neighbors: (B, M) user ids, -1 = padding (as from :func:`top_similar_users`).
        weights: optional (B, M) weights (ignored where padded). Default ones.
        mean: divide each row by its number of valid neighbors (after weighting).
        dtype, out, backend: as in :func:`refit_kernels.gather_rows`.

    Returns:
        (B, n_items) dense profiles; a user without valid neighbors gets a zero row.
    """
    if neighbors.dim() != 2:
        raise ValueError(f"neighbors must be (B, M), got shape {tuple(neighbors.shape)}")
    valid = neighbors >= 0
    rows = neighbors[valid]
    counts = valid.sum(1)
    segments = torch.cat([torch.zeros(1, dtype=torch.int64, device=neighbors.device), torch.cumsum(counts, 0)])
    w = None
    if weights is not None:
        if weights.shape != neighbors.shape:
            raise ValueError(f"weights must have the shape of neighbors {tuple(neighbors.shape)}, "
                             f"got {tuple(weights.shape)}")
        w = weights[valid].to(torch.float32)
    if mean:
        scale = (1.0 / counts.clamp(min=1).to(torch.float32)).repeat_interleave(counts)
        w = scale if w is None else w * scale
    return rk.gather_rows(matrix, rows, segments=segments, weights=w, dtype=dtype, out=out, backend=backend)
