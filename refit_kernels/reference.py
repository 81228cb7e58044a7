"""Reference implementations: plain PyTorch, the definition of every op.

They are written the way a user would write them in eager PyTorch, and they
are what the other backends are checked against: evaluated on float64 inputs
they are the truth the tests compare with.
"""

from __future__ import annotations

import math

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
