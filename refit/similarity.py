"""Similar users by cosine similarity of their interaction rows, and their aggregated profiles.

:func:`top_similar_users` gives, for every user, the m users whose rows are
most cosine-similar (the neighbors of the N_sim-K reward), computed in blocks
of users so memory stays O(block x n_users). :func:`neighbor_profiles` sums
the neighbors' rows into one dense row per user with ``gather_rows``'
segmented form.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Optional, Tuple

import numpy as np
import scipy.sparse as sp
import torch

import refit_kernels as rk

from .runtime import distributed as dist

#: Elements of one block's (block x n_users) similarity matrix: 4 MB in float64, so a
#: block's working arrays stay in cache (larger blocks measured slower).
_BLOCK_ELEMENTS = 1 << 19


def _sparse_tensor(csr: rk.CSR, dtype: torch.dtype) -> torch.Tensor:
    values = torch.ones(csr.nnz, dtype=dtype) if csr.values is None else csr.values.to(dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(csr.indptr.long(), csr.indices.long(), values,
                                       size=(csr.n_rows, int(csr.n_cols)), check_invariants=False)


def _cpu_csr(matrix):
    """``matrix`` as a float64 CSR on the CPU, refusing one without a known column count."""
    csr = rk.as_csr(matrix, "matrix", values_dtype=torch.float64)
    if csr.n_cols is None:
        raise ValueError("matrix: pass a matrix that knows its column count (scipy or torch sparse)")
    return csr if csr.device.type == "cpu" else csr.to("cpu")


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
    csr = _cpu_csr(matrix)
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


def shared_similar_users(matrix: Any, m: int = 10, *, method: str = "exact", **options):
    """:func:`similar_users` computed once by all the processes of a torch.distributed job.

    The exact table: each rank computes a contiguous block of users
    (``user_range``) and the blocks are all-gathered, so every rank ends up
    with the whole (n_users, m) table, equal to the single-process one, for
    1 / world_size of the work each. The approximate table is computed whole
    by rank 0 and shared. In a single process it is :func:`similar_users`.
    Every rank must call it (it is a collective).
    """
    if not dist.is_distributed():
        return similar_users(matrix, m, method=method, **options)
    n = rk.as_csr(matrix, "matrix").n_rows
    if method == "auto":
        # Decided on rank 0, so that all ranks take the same path even if only some have pynndescent.
        method = dist.broadcast_object("approximate" if n > APPROXIMATE_ABOVE_USERS and approximate_available()
                                       else "exact")
    if method == "exact":
        part = similar_users(matrix, m, method="exact", user_range=dist.shard_range(n), **options)
    elif dist.rank() == 0:
        part = similar_users(matrix, m, method="approximate", **options)
    else:
        part = torch.full((0, m), -1, dtype=torch.int64)
        if options.get("return_similarity"):
            part = (part, torch.zeros((0, m), dtype=torch.float64))
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


# --- approximate similar users ------------------------------------------------------------------

#: Above this many users, :func:`similar_users` with ``method="auto"`` takes the approximate path.
#: Measured on synthetic data with 3,000 items, one core (benchmarks/results/scale.md): the exact
#: table took 35 s at 30,000 users and 491 s at 100,000 (time ~ users^2.2), the approximate one
#: (width 60) 91 s and 301 s (~ users^1.03); they cross near 65,000 users.
APPROXIMATE_ABOVE_USERS = 60_000

_MISSING_ANN = ("the approximate similar-user table needs pynndescent: pip install 'refit-kernels[ann]' "
                "(or pynndescent)")


def approximate_available() -> bool:
    """Whether the approximate path's optional dependency (pynndescent) imports."""
    try:
        import pynndescent  # noqa: F401
    except ImportError:
        return False
    return True


def similar_users(matrix: Any, m: int = 10, *, method: str = "auto", progress: Optional[Callable[[str], None]] = None,
                  **options):
    """The m most similar users of every user, exactly or approximately.

    ``method="exact"`` is :func:`top_similar_users`; ``"approximate"`` is
    :func:`approximate_similar_users`; ``"auto"`` (default) is exact up to
    :data:`APPROXIMATE_ABOVE_USERS` users and approximate above, or exact
    with a warning there when pynndescent is not installed. ``options`` go
    to the chosen function (each takes only its own).

    Returns what the chosen function returns: (n_users, m) int64 ids, -1 padded.
    """
    if method not in ("auto", "exact", "approximate"):
        raise ValueError(f"method must be 'auto', 'exact' or 'approximate', got {method!r}")
    n = rk.as_csr(matrix, "matrix").n_rows
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m < max(n, 2):
        # a user has at most n - 1 others; a larger m only pads with -1, and a huge one allocates n x m ids
        raise ValueError(f"similar users: m (--similar-users) must be an integer in [1, {max(n - 1, 1)}] for "
                         f"these {n:,} users, got {m!r}")
    if method == "auto":
        method = "exact"
        if n > APPROXIMATE_ABOVE_USERS:
            if approximate_available():
                method = "approximate"
            else:
                warnings.warn(f"similar users: {n:,} users, above {APPROXIMATE_ABOVE_USERS:,}, where the exact "
                              f"table's quadratic time dominates; computing it exactly because "
                              f"{_MISSING_ANN}", RuntimeWarning, stacklevel=2)
    exact_names = ("block_size", "return_similarity", "measure", "user_range")
    approx_names = ("width", "candidates_per_step", "seed", "return_similarity", "measure", "n_jobs")
    allowed = exact_names if method == "exact" else approx_names
    unknown = sorted(set(options) - set(exact_names) - set(approx_names))
    if unknown:
        raise TypeError(f"similar_users: unknown option(s) {unknown}")
    if method == "approximate" and options.get("user_range") is not None:
        raise ValueError("user_range is for the exact path; the approximate table is computed whole")
    chosen = {k: v for k, v in options.items() if k in allowed}
    if progress is not None:
        progress(f"similar users: {method} table for {n:,} users")
    if method == "exact":
        return top_similar_users(matrix, m, **chosen)
    return approximate_similar_users(matrix, m, progress=progress, **chosen)


# Above this many users the descent tries more candidates per user and step than
# pynndescent's default (min(60, width + 1)): at a fixed setting recall@10 falls with the
# users (0.960 at 300k, 0.897 at 1M synthetic users, width 60), while 160 per step held
# 0.986 at 300k and 0.959 at 1M, with a local time slope of 1.07 between them
# (benchmarks/results/scale.md).
MORE_CANDIDATES_ABOVE_USERS = 250_000
CANDIDATES_PER_STEP_LARGE = 160


def default_candidates_per_step(n_users: int) -> Optional[int]:
    """The descent's candidates per user and step for ``n_users`` users when none is given:
    None (pynndescent's default) up to MORE_CANDIDATES_ABOVE_USERS, CANDIDATES_PER_STEP_LARGE above."""
    return CANDIDATES_PER_STEP_LARGE if n_users > MORE_CANDIDATES_ABOVE_USERS else None


def approximate_similar_users(matrix: Any, m: int = 10, *, width: int = 60, candidates_per_step: Optional[int] = None,
                              seed: int = 0, n_jobs: int = 1, return_similarity: bool = False, measure: str = "cosine",
                              progress: Optional[Callable[[str], None]] = None):
    """The m most cosine-similar users of every user, approximately, in about linear time.

    Candidates come from a nearest-neighbour-descent graph on the rows'
    cosine distance (pynndescent, the ``ann`` extra): ``width`` candidates
    per user. Each candidate is then scored exactly as in
    :func:`top_similar_users` (the same dot products, ranking key and tie
    rule) and the best m with positive similarity are kept. So every
    returned id is a user with positive similarity, the order is the exact
    order of the returned users, and the table differs from the exact one
    only by missed users (recall, measured in benchmarks/RESULTS.md).

    Cost: pynndescent's graph, about linear in the users for a fixed
    ``width`` (time grows with ``width``, recall too); then ``width``
    exact sparse dot products per user. Memory: the (n_users, width)
    graph, pynndescent's search trees, and chunks of 2^24 stored entries.

    Args:
        matrix: (n_users, n_items) CSR matrix, as in :func:`top_similar_users`; CPU.
        m: neighbours per user (>= 1).
        width: candidates per user (>= m): the graph's neighbour count.
        candidates_per_step: how many candidates the descent tries per user
            and step (pynndescent's ``max_candidates``). None:
            :func:`default_candidates_per_step` of the users with data,
            that is pynndescent's default, min(60, width + 1), up to
            250,000 users and 160 above. More raise recall at a cost: at
            300k synthetic users, width 60, 120 of them took recall@10 from
            0.960 to 0.981 for 1.3x the time; with 160, 1M users reached
            0.959 against 0.897 (benchmarks/results/scale.md).
        seed: pynndescent's random_state; with ``n_jobs=1`` the result is
            a function of (matrix, m, width, seed).
        n_jobs: pynndescent's threads (more is faster; the graph may then
            depend on the thread schedule).
        return_similarity: also return the (n_users, m) float64 similarities.
        measure: only ``"cosine"``; ``"overlap"`` (raw shared counts) has
            no approximate path and is refused.
        progress: optional callable given one line per phase.

    Returns:
        (n_users, m) int64 user ids (-1 = padding), and with
        ``return_similarity`` the (n_users, m) float64 similarities.

    Raises:
        ImportError: pynndescent is not installed (names the extra).
    """
    for name, value, low in (("m", m, 1), ("width", width, 1), ("n_jobs", n_jobs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if candidates_per_step is not None and (isinstance(candidates_per_step, bool)
                                            or not isinstance(candidates_per_step, int) or candidates_per_step < 1):
        raise ValueError(f"candidates_per_step must be None or an int >= 1, got {candidates_per_step!r}")
    if width < m:
        raise ValueError(f"width must be >= m={m} (the candidates the m neighbours are chosen from), got {width}")
    if measure != "cosine":
        raise ValueError(f"measure: the approximate path ranks by cosine only, got {measure!r} "
                         f"(use top_similar_users for 'overlap')")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    csr = _cpu_csr(matrix)
    try:
        import pynndescent
    except ImportError as e:
        raise ImportError(_MISSING_ANN) from e
    say = progress or (lambda line: None)
    n, n_items = csr.n_rows, int(csr.n_cols)
    lens = csr.indptr[1:] - csr.indptr[:-1]
    binary = csr.values is None or bool((csr.values == 1).all())
    values = None if binary else csr.values
    sq_norm = lens.to(torch.float64) if binary else torch.zeros(n, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(n), lens), csr.values ** 2)
    ids = torch.full((n, m), -1, dtype=torch.int64)
    sims = torch.zeros((n, m), dtype=torch.float64)
    active = torch.nonzero(sq_norm > 0).flatten()
    scorer = _PairDots(csr, values)
    if active.numel() >= 2:
        t0 = time.perf_counter()
        rows = scorer.A[active.numpy()].astype(np.float32)
        k = min(width + 1, active.numel())  # pynndescent lists each point as its own first neighbour
        if candidates_per_step is None:
            candidates_per_step = default_candidates_per_step(active.numel())
        torch_threads = torch.get_num_threads()
        try:
            with warnings.catch_warnings():
                # "Failed to correctly find n_neighbors for some samples": the missing ones are -1 here,
                # and the recall that matters is measured against the exact table.
                warnings.filterwarnings("ignore", message="Failed to correctly find n_neighbors")
                extra = {} if candidates_per_step is None else {"max_candidates": candidates_per_step}
                index = pynndescent.NNDescent(rows, metric="cosine", n_neighbors=k, random_state=seed,
                                              n_jobs=n_jobs, low_memory=True, compressed=True, **extra)
        finally:
            # numba's OpenMP threading layer can load the libgomp torch already uses, and setting its
            # own thread count (NUMBA_NUM_THREADS, the cores by default) then sets torch's too: every
            # later torch op would run on that many threads, whatever the caller chose.
            torch.set_num_threads(torch_threads)
        graph = torch.from_numpy(np.asarray(index.neighbor_graph[0], dtype=np.int64))
        del index
        cand = torch.where(graph >= 0, active[graph.clamp(min=0)], torch.full_like(graph, -1))
        per_step = "pynndescent's default" if candidates_per_step is None else candidates_per_step
        say(f"similar users (approximate): {width} candidates per user ({per_step} per descent step) "
            f"for {active.numel():,} users in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        step = max(1, (1 << 20) // k)
        for b0 in range(0, active.numel(), step):
            u = active[b0:b0 + step]
            c = cand[b0:b0 + step]
            c = torch.where(c == u[:, None], torch.full_like(c, -1), c)
            c = _first_occurrences(c)
            valid = c >= 0
            r, col = torch.nonzero(valid, as_tuple=True)
            dot = torch.zeros(c.shape, dtype=torch.float64)
            dot[r, col] = torch.from_numpy(scorer.dots(u[r].numpy(), c[r, col].numpy()))
            key = dot * dot.abs() / sq_norm[c.clamp(min=0)]  # the exact path's ranking key
            key = torch.where(valid & (dot > 0), key, torch.full_like(key, -math.inf))
            chosen, kept = _best(c, key, dot, m)
            ids[u] = chosen
            s = kept / torch.sqrt(sq_norm[u][:, None] * sq_norm[chosen.clamp(min=0)])
            sims[u] = torch.where(chosen >= 0, s, torch.zeros_like(s))
        say(f"similar users (approximate): exact scores of the candidates in {time.perf_counter() - t0:.1f} s")
    return (ids, sims) if return_similarity else ids


def _first_occurrences(c: torch.Tensor) -> torch.Tensor:
    """c (b, k) with repeated ids within a row replaced by -1 (the first stays)."""
    order = torch.sort(c, dim=1, stable=True)
    repeat = torch.zeros_like(c, dtype=torch.bool)
    repeat[:, 1:] = order.values[:, 1:] == order.values[:, :-1]
    drop = torch.zeros_like(repeat).scatter_(1, order.indices, repeat)
    return torch.where(drop, torch.full_like(c, -1), c)


def _best(ids: torch.Tensor, key: torch.Tensor, dot: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row the m ids with the largest finite keys, largest first, ties to the lower id; -1
    padded. Returns the ids and their dot products."""
    order = torch.sort(ids, dim=1, stable=True).indices  # ascending ids, so ties keep the lower first
    ids, key, dot = ids.gather(1, order), key.gather(1, order), dot.gather(1, order)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :m]
    ids, key, dot = ids.gather(1, order), key.gather(1, order), dot.gather(1, order)
    ids = torch.where(torch.isfinite(key), ids, torch.full_like(ids, -1))
    if ids.shape[1] < m:
        pad = m - ids.shape[1]
        ids = torch.cat([ids, torch.full((ids.shape[0], pad), -1, dtype=ids.dtype)], 1)
        dot = torch.cat([dot, torch.zeros((dot.shape[0], pad), dtype=dot.dtype)], 1)
    return ids, dot


class _PairDots:
    """Exact dot products of pairs of rows, with scipy's row indexing and sorted-merge product
    (a few ns per stored entry)."""

    def __init__(self, csr: rk.CSR, values):
        data = np.ones(csr.nnz) if values is None else values.numpy().astype(np.float64)
        self.A = sp.csr_matrix((data, csr.indices.numpy(), csr.indptr.numpy()), shape=(csr.n_rows, int(csr.n_cols)))
        self.A.sort_indices()
        self.lens = np.diff(self.A.indptr)

    def dots(self, u: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(P,) float64: <row u[i], row w[i]>, in chunks of about 2^24 stored entries."""
        out = np.zeros(u.shape[0], dtype=np.float64)
        ends = np.cumsum(self.lens[w])
        start = 0
        while start < u.shape[0]:
            base = ends[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, base + (1 << 24), side="right")))
            prod = self.A[u[start:stop]].multiply(self.A[w[start:stop]]).tocsr()
            counts = np.diff(prod.indptr)
            nz = counts > 0
            if nz.any():
                out[start:stop][nz] = np.add.reduceat(prod.data, prod.indptr[:-1][nz])
            start = stop
        return out
