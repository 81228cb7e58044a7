"""Reference implementations: plain PyTorch, the definition of every op.

They are written the way a user would write them in eager PyTorch, and they
are what the other backends are checked against: evaluated on float64 inputs
they are the truth the tests compare with.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_logprob(
    pred: torch.Tensor,
    traj: torch.Tensor,
    coef_pred: torch.Tensor,
    coef_x: torch.Tensor,
    log_var: torch.Tensor,
    mean: bool = False,
    per_step: bool = False,
) -> torch.Tensor:
    """Log-likelihood of a denoising trajectory under per-step Gaussians.

    Args:
        pred: (S, B, I) denoiser outputs, float16/bfloat16/float32/float64.
        traj: (S+1, B, I) states, pred's dtype; ``traj[s+1]`` was sampled at step s.
        coef_pred, coef_x, log_var: (S,) float32 or float64 per-step constants.
        mean: divide by I (``reduction="mean"``) instead of summing over items.
        per_step: return the (S, B) per-step terms instead of their sum.

    Returns:
        (B,) or (S, B); float64 for float64 inputs, float32 otherwise. The
        computation runs in that dtype; gradients flow to ``pred`` by autograd.
    """
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    n_items = pred.shape[-1]
    cp = coef_pred.to(acc)[:, None, None]
    cx = coef_x.to(acc)[:, None, None]
    lv = log_var.to(acc)
    x = traj.to(acc)
    resid = x[1:] - cp * pred.to(acc) - cx * x[:-1]
    sum_sq = (resid * resid).sum(-1)  # (S, B)
    terms = -0.5 * (sum_sq * torch.exp(-lv)[:, None] + n_items * (LOG_2PI + lv)[:, None])
    if mean:
        terms = terms / n_items
    return terms if per_step else terms.sum(0)


def policy_loss(
    pred: torch.Tensor,
    traj: torch.Tensor,
    coef_pred: torch.Tensor,
    coef_x: torch.Tensor,
    log_var: torch.Tensor,
    advantages: torch.Tensor,
    old_logprob: Optional[torch.Tensor] = None,
    clip: float = 0.2,
    mean: bool = False,
    normalizer: float = 1.0,
) -> "tuple[torch.Tensor, torch.Tensor]":
    """The policy-gradient loss of a batch of trajectories: autograd through ``gaussian_logprob``.

    With ``L`` the (S, B) per-step log-likelihoods of :func:`gaussian_logprob`
    (``per_step=True``) and ``a`` the (B,) advantages:

    * without ``old_logprob`` (REINFORCE): ``loss = -sum_b a[b] * sum_s L[s, b] / normalizer``;
    * with ``old_logprob`` (S, B) (PPO's clipped surrogate, per step):
      ``rho = exp(L - old_logprob)``,
      ``loss = -sum_{s,b} min(rho * a[b], clamp(rho, 1 - clip, 1 + clip) * a[b]) / normalizer``.

    Returns:
        ``(loss, logprob)``: the () loss, with gradient to ``pred`` by
        autograd, and ``L`` detached; float64 for float64 inputs, else float32.
    """
    terms = gaussian_logprob(pred, traj, coef_pred, coef_x, log_var, mean, per_step=True)
    a = advantages.detach().to(terms.dtype)
    if old_logprob is None:
        loss = -(a * terms.sum(0)).sum() / normalizer
    else:
        ratio = torch.exp(terms - old_logprob.detach().to(terms.dtype))
        clipped = ratio.clamp(1.0 - clip, 1.0 + clip)
        loss = -torch.minimum(ratio * a, clipped * a).sum() / normalizer
    return loss, terms.detach()


def gather_rows(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: "torch.Tensor | None",
    rows: torch.Tensor,
    segments: "torch.Tensor | None",
    weights: "torch.Tensor | None",
    n_cols: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense rows gathered from a CSR matrix: ``out[b] = sum_{j in seg b} w[j] * A[rows[j]]``.

    Args:
        indptr: (n_rows + 1,) int32 or int64 row offsets of A.
        indices: (nnz,) column ids of A, indptr's dtype.
        values: (nnz,) floating values of A, or None for an all-ones A.
        rows: (n,) int64 row ids into A.
        segments: (B + 1,) int64 offsets into ``rows``: output row b sums
            ``rows[segments[b]:segments[b+1]]``. None means one row per
            output (B = n).
        weights: (n,) floating weight of each gathered row, or None for ones.
        n_cols: the number of columns of A.
        dtype: the output dtype.

    Returns:
        (B, n_cols) tensor of ``dtype``. Sums run in float32, or in float64
        when ``dtype``, ``values`` or ``weights`` is float64; duplicate column
        ids inside one row of A add up.
    """
    wide = [t.dtype for t in (values, weights) if t is not None] + [dtype]
    acc = torch.float64 if torch.float64 in wide else torch.float32
    device = indptr.device
    rows = rows.to(torch.int64)
    n = rows.shape[0]
    B = n if segments is None else segments.shape[0] - 1
    indptr = indptr.to(torch.int64)
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    # Every stored entry of every gathered row, flattened: gathered row j_of[e], position k[e].
    j_of = torch.repeat_interleave(torch.arange(n, device=device), lens)
    first = torch.cumsum(lens, 0) - lens
    k = starts[j_of] + torch.arange(j_of.shape[0], device=device) - first[j_of]
    cols = indices[k].to(torch.int64)
    vals = torch.ones(k.shape[0], dtype=acc, device=device) if values is None else values[k].to(acc)
    if weights is not None:
        vals = vals * weights.to(acc)[j_of]
    if segments is None:
        out_row = j_of
    else:
        seg = segments.to(torch.int64)
        out_row = torch.repeat_interleave(torch.arange(B, device=device), seg[1:] - seg[:-1])[j_of]
    out = torch.zeros(B, n_cols, dtype=acc, device=device)
    out.index_put_((out_row, cols), vals, accumulate=True)
    return out.to(dtype)
# --- topk_hits (DESIGN.md, Op 2) ----------------------------------------------

# Per-row error report shared by every backend of topk_hits: four int64 per
# row, {code, argument, csr_row, detail}, as in csrc/include/refit/topk_hits.h.
TOPK_NAN, TOPK_USER_RANGE, TOPK_BAD_INDPTR, TOPK_COLUMN_RANGE, TOPK_UNSORTED, TOPK_NEIGHBOR_RANGE = 1, 2, 3, 4, 5, 6
TOPK_ARGS = ("scores", "exclude", "positives", "neighbors", "neighbor_sets")
_ARG_EXCLUDE, _ARG_POSITIVES, _ARG_NEIGHBORS, _ARG_SETS = 1, 2, 3, 4


def topk_row_error(report: torch.Tensor, n_items: int, n_rows: dict, op: str = "topk_hits") -> Optional[Exception]:
    """The exception for the first bad row of a (B, 4) report, or None when all rows are fine.

    ``n_rows`` maps "exclude", "positives" and "neighbor_sets" to their row
    counts (for the messages), ``op`` names the op whose kernel wrote the
    report (topk_hits or target_rank, which share it). The messages are
    those of the C++ kernels.
    """
    bad = (report[:, 0] != 0).nonzero()
    if bad.numel() == 0:
        return None
    b = int(bad[0, 0])
    code, arg, row, detail = (int(v) for v in report[b].tolist())
    name = TOPK_ARGS[arg] if 0 <= arg < len(TOPK_ARGS) else "?"
    if code == TOPK_NAN:
        return ValueError(f"{op}: scores row {b} contains NaN (first at column {detail}); "
                          "NaN scores cannot be ranked")
    if code == TOPK_USER_RANGE:
        return IndexError(f"{op}: users[{b}] = {detail} is out of range for {name} with "
                          f"{n_rows.get(name)} rows")
    if code == TOPK_BAD_INDPTR:
        return ValueError(f"{op}: {name} row {row} (scores row {b}) has an invalid indptr range: "
                          f"need 0 <= indptr[{row}] <= indptr[{row + 1}] <= nnz")
    if code == TOPK_COLUMN_RANGE:
        return IndexError(f"{op}: {name} row {row} (scores row {b}) has column index {detail}, "
                          f"out of range for I = {n_items} items")
    if code == TOPK_UNSORTED:
        return ValueError(f"{op}: {name} row {row} (scores row {b}) has column index {detail} after "
                          "a larger or equal one: the column indices of a row must be sorted and unique "
                          "(e.g. scipy's sum_duplicates())")
    if code == TOPK_NEIGHBOR_RANGE:
        return IndexError(f"{op}: neighbors[{b}, {row}] = {detail} is out of range for neighbor_sets "
                          f"with {n_rows.get('neighbor_sets')} rows (-1 marks padding)")
    return RuntimeError(f"{op}: internal error in row {b} (code {code}): please report it")


def _csr_row_problems(indptr, indices, rows, valid, n_items):
    """(code, detail) per entry of ``rows`` for the checks of a CSR row, in kernel order:
    its indptr range, then its columns (in [0, n_items) and strictly increasing)."""
    nnz = indices.shape[0]
    code = torch.zeros(rows.shape, dtype=torch.int64, device=rows.device)
    detail = torch.zeros_like(code)
    if indptr.shape[0] < 2:  # no rows: nothing is valid, and indptr[r + 1] below would not exist
        return code, detail
    r = torch.where(valid, rows, 0)
    lo, hi = indptr[r], indptr[r + 1]
    bad_ptr = valid & ~((lo >= 0) & (lo <= hi) & (hi <= nnz))
    code[bad_ptr] = TOPK_BAD_INDPTR
    good = valid & ~bad_ptr
    lengths = torch.where(good, hi - lo, 0)
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), lengths.flatten())
    starts = torch.cumsum(lengths.flatten(), 0) - lengths.flatten()
    offset = torch.arange(owner.numel(), device=rows.device) - starts[owner]
    pos = lo.flatten()[owner] + offset
    col = indices[pos]
    prev = indices[(pos - 1).clamp(min=0)]
    out_of_range = (col < 0) | (col >= n_items)
    unsorted = (offset > 0) & (col <= prev)
    problem = out_of_range | unsorted
    if bool(problem.any()):
        big = torch.iinfo(torch.int64).max
        first = torch.full((rows.numel(),), big, dtype=torch.int64, device=rows.device)
        first.scatter_reduce_(0, owner[problem], offset[problem], "amin")
        has = first != big
        at = lo.flatten()[has] + first[has]
        c = indices[at]
        flat_code = code.flatten()
        flat_detail = detail.flatten()
        flat_code[has] = torch.where((c < 0) | (c >= n_items), TOPK_COLUMN_RANGE, TOPK_UNSORTED)
        flat_detail[has] = c
        code, detail = flat_code.view(rows.shape), flat_detail.view(rows.shape)
    return code, detail


def _topk_report(scores, users, excl, pos, neighbors, sets):
    """The (B, 4) per-row error report of topk_hits, in the order the kernels check."""
    B, I = scores.shape
    dev = scores.device
    report = torch.zeros(B, 4, dtype=torch.int64, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    batch = torch.arange(B, device=dev)
    own_rows = users if users is not None else batch

    def put(bad, code, arg, row, detail):
        sel = bad & ~done
        fill = torch.stack(torch.broadcast_tensors(
            torch.as_tensor(code, device=dev), torch.as_tensor(arg, device=dev),
            torch.as_tensor(row, device=dev), torch.as_tensor(detail, device=dev)), -1).expand(B, 4)
        report[sel] = fill[sel]
        done.logical_or_(sel)

    def csr_checks(csr, arg):
        indptr, indices = csr
        n = indptr.shape[0] - 1
        in_range = (own_rows >= 0) & (own_rows < n)
        put(~in_range, TOPK_USER_RANGE, arg, 0, own_rows)
        code, detail = _csr_row_problems(indptr, indices, own_rows, in_range, I)
        put(code != 0, code, arg, own_rows, detail)

    if excl is not None:
        csr_checks(excl, _ARG_EXCLUDE)
    nan = torch.isnan(scores)
    if I > 0:  # (target_rank takes rows without items; topk_hits' ks rule them out)
        put(nan.any(1), TOPK_NAN, 0, 0, nan.to(torch.int8).argmax(1))
    if pos is not None:
        csr_checks(pos, _ARG_POSITIVES)
    if neighbors is not None and neighbors.shape[1] > 0:
        indptr, indices = sets
        n = indptr.shape[0] - 1
        out_of_range = (neighbors < -1) | (neighbors >= n)
        ok = (neighbors >= 0) & (neighbors < n)
        code, detail = _csr_row_problems(indptr, indices, neighbors, ok, I)
        code = torch.where(out_of_range, TOPK_NEIGHBOR_RANGE, code)
        arg = torch.where(out_of_range, _ARG_NEIGHBORS, _ARG_SETS)
        row = torch.where(out_of_range, torch.arange(neighbors.shape[1], device=dev), neighbors)
        detail = torch.where(out_of_range, neighbors, detail)
        m = (code != 0).to(torch.int8).argmax(1, keepdim=True)  # each row's first bad neighbor
        put((code != 0).any(1), code.gather(1, m)[:, 0], arg.gather(1, m)[:, 0], row.gather(1, m)[:, 0],
            detail.gather(1, m)[:, 0])
    return report


def _row_entries(indptr, rows):
    """The entries of CSR rows rows[0], rows[1], ... one after the other: (owner, entry), each
    (n,) int64, where owner is the position in ``rows`` the entry belongs to and entry its index
    into the CSR's indices."""
    lo, hi = indptr[rows], indptr[rows + 1]
    lengths = hi - lo
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), lengths)
    offset = torch.arange(owner.numel(), device=rows.device) - (torch.cumsum(lengths, 0) - lengths)[owner]
    return owner, lo[owner] + offset


def _dense_rows(indptr, indices, rows, n_items):
    """(len(rows), n_items) bool: row j marks the columns of CSR row rows[j]."""
    owner, entry = _row_entries(indptr, rows)
    dense = torch.zeros(rows.numel(), n_items, dtype=torch.bool, device=rows.device)
    dense[owner, indices[entry]] = True
    return dense


def topk_hits(
    scores: torch.Tensor,
    ks,
    users: Optional[torch.Tensor] = None,
    exclude_indptr: Optional[torch.Tensor] = None,
    exclude_indices: Optional[torch.Tensor] = None,
    positives_indptr: Optional[torch.Tensor] = None,
    positives_indices: Optional[torch.Tensor] = None,
    neighbors: Optional[torch.Tensor] = None,
    neighbor_sets_indptr: Optional[torch.Tensor] = None,
    neighbor_sets_indices: Optional[torch.Tensor] = None,
    return_indices: bool = False,
):
    """Top-k hit counts of ranked rows, the definition (DESIGN.md, Op 2).

    Ranks each row of ``scores`` by the full sort the rule describes (higher
    score first, equal scores by lower item id, excluded items last and cut
    off), then counts hits at every k against the row's positives and its
    neighbors' item sets.

    Args:
        scores: (B, I) float16/bfloat16/float32/float64; NaN is an error.
        ks: ascending ints, 1 <= k <= I; Kmax = ks[-1].
        users: (B,) int64 CSR row of each scores row (default: row b).
        exclude_*, positives_*: CSR (indptr, indices) int64, rows sorted and unique.
        neighbors: (B, M) int64 rows of neighbor_sets_*, -1 = padding.
        return_indices: also return the ranked items.

    Returns:
        (hits (B, n_k) int64, dcg (B, n_k) float64, neighbor_hits (B, n_k)
        float64, first_hit (B,) int64, indices (B, Kmax) int64 -1 padded, or
        (B, 0) without ``return_indices``).
    """
    ks = [int(k) for k in ks]
    B, I = scores.shape
    dev = scores.device
    kmax = ks[-1]
    excl = None if exclude_indptr is None else (exclude_indptr, exclude_indices)
    pos = None if positives_indptr is None else (positives_indptr, positives_indices)
    sets = None if neighbor_sets_indptr is None else (neighbor_sets_indptr, neighbor_sets_indices)
    report = _topk_report(scores, users, excl, pos, neighbors, sets)
    n_rows = {name: (None if csr is None else csr[0].shape[0] - 1)
              for name, csr in (("exclude", excl), ("positives", pos), ("neighbor_sets", sets))}
    error = topk_row_error(report.cpu(), I, n_rows)
    if error is not None:
        raise error
    rows = users if users is not None else torch.arange(B, device=dev)

    # The ranking: a stable sort by descending score keeps equal scores in id
    # order; a second stable sort moves excluded items behind all the others.
    s = scores.to(torch.float64)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    excluded = (_dense_rows(*excl, rows, I) if excl is not None
                else torch.zeros(B, I, dtype=torch.bool, device=dev))
    order = order.gather(1, torch.sort(excluded.gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    rank = torch.arange(kmax, device=dev)
    n_rankable = I - excluded.sum(1)
    top = torch.where(rank[None, :] < n_rankable[:, None], order[:, :kmax], -1)  # (B, Kmax)
    ranked = top >= 0
    k_at = torch.tensor(ks, device=dev) - 1

    if pos is not None:
        hit = _dense_rows(*pos, rows, I).gather(1, top.clamp(min=0)) & ranked
    else:
        hit = torch.zeros(B, kmax, dtype=torch.bool, device=dev)
    discount = 1.0 / torch.log2(rank.to(torch.float64) + 2.0)
    hits = hit.to(torch.int64).cumsum(1)[:, k_at]
    dcg = (hit * discount).cumsum(1)[:, k_at]
    first_hit = torch.where(hit.any(1), hit.to(torch.int8).argmax(1), -1)

    neighbor_hits = torch.zeros(B, len(ks), dtype=torch.float64, device=dev)
    if neighbors is not None and neighbors.shape[1] > 0:
        valid = neighbors >= 0
        # Only the rows that valid neighbors name are read (padding points at
        # an extra empty row), as in the kernels: other rows may be malformed.
        needed, inverse = torch.unique(neighbors[valid], return_inverse=True)
        where = torch.full_like(neighbors, needed.numel())
        where[valid] = inverse
        sets_dense = torch.cat([_dense_rows(*sets, needed, I),
                                torch.zeros(1, I, dtype=torch.bool, device=dev)])
        member = sets_dense[where[:, :, None], top.clamp(min=0)[:, None, :]]  # (B, M, Kmax)
        member &= valid[:, :, None] & ranked[:, None, :]
        counts = member.sum(1).cumsum(1)[:, k_at].to(torch.float64)
        n_valid = valid.sum(1, keepdim=True)
        neighbor_hits = torch.where(n_valid > 0, counts / n_valid.clamp(min=1), 0.0)
    indices = top if return_indices else torch.empty(B, 0, dtype=torch.int64, device=dev)
    return hits, dcg, neighbor_hits, first_hit, indices


# --- target_rank (DESIGN.md, Op 4) -----------------------------------------------

def target_rank(
    scores: torch.Tensor,
    users: Optional[torch.Tensor] = None,
    exclude_indptr: Optional[torch.Tensor] = None,
    exclude_indices: Optional[torch.Tensor] = None,
    positives_indptr: Optional[torch.Tensor] = None,
    positives_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The rank of every positive under topk_hits' ranking rule, the definition (DESIGN.md, Op 4).

    For a positive p of scores row b: the number of the row's items i != p
    that are not excluded and have ``s[b, i] > s[b, p]``, or ``s[b, i] ==
    s[b, p]`` and ``i < p``; -1 when p is itself excluded (never ranked). So
    ``rank < k`` exactly when ``topk_hits`` counts p as a hit at k.

    Args:
        scores: (B, I) float16/bfloat16/float32/float64; NaN is an error.
        users: (B,) int64 CSR row of each scores row (default: row b).
        exclude_*, positives_*: CSR (indptr, indices) int64, rows sorted and unique.

    Returns:
        (n,) int64: with users, the ranks of the positives of rows users[0],
        users[1], ... one after the other, each row's in its CSR order;
        without users, (nnz,) beside ``positives_indices``.
    """
    B, I = scores.shape
    dev = scores.device
    excl = None if exclude_indptr is None else (exclude_indptr, exclude_indices)
    pos = (positives_indptr, positives_indices)
    report = _topk_report(scores, users, excl, pos, None, None)
    n_rows = {"exclude": None if excl is None else excl[0].shape[0] - 1, "positives": pos[0].shape[0] - 1}
    error = topk_row_error(report.cpu(), I, n_rows, op="target_rank")
    if error is not None:
        raise error
    rows = users if users is not None else torch.arange(B, device=dev)
    owner, entry = _row_entries(positives_indptr, rows)  # the scores row of every positive
    p = positives_indices[entry]
    row_scores = scores[owner]  # (n, I); comparisons in the scores' own dtype are exact
    sp = row_scores.gather(1, p[:, None])
    ids = torch.arange(I, device=dev)
    beats = (row_scores > sp) | ((row_scores == sp) & (ids[None, :] < p[:, None]))
    rank = beats.sum(1)
    if excl is not None:
        excluded = _dense_rows(*excl, rows, I)[owner]
        rank = torch.where(excluded.gather(1, p[:, None])[:, 0], -1, (beats & ~excluded).sum(1))
    if users is not None:
        return rank
    # Beside the positives' entries; -1 for an entry no row holds (only an indptr that does not run
    # from 0 to nnz leaves one, which the public function refuses).
    return torch.full_like(positives_indices, -1).index_put_((entry,), rank)
