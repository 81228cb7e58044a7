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
