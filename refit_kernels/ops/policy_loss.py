"""policy_loss: the policy-gradient loss of a batch of trajectories and its gradient, in one pass.

REINFORCE, GRPO and PPO all ascend an advantage-weighted log-likelihood of the
sampled trajectories. Through :func:`~refit_kernels.gaussian_logprob` that costs
two passes over the (S, B, I) trajectory: the forward reads ``pred`` and
``traj``, the backward reads both again and writes the gradient (5S + 2 rows of
traffic). The advantages are known before the loss is formed, so the weight of
every (step, user) row of the gradient is known too (REINFORCE), or follows from
that row's own term (PPO's per-step ratio): one pass gives the value, the
per-step log-likelihoods and the gradient (3S + 1 rows), and the backward only
hands the gradient on.

This module is the op's whole Python side: the checks shared by every backend,
the fake (meta) implementations and gradients of the compiled op
``refit::policy_loss`` and of the Triton op ``refit::policy_loss_triton``, and
the public function that dispatches.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _extension, dispatch, reference
from .._checks import dense_tensor, has_data
from .gaussian_logprob import _COEF_FLOATS, _result_dtype
from .gaussian_logprob import check_args as _check_logprob_args

_OP = "policy_loss"


class PolicyLoss(NamedTuple):
    """What :func:`policy_loss` returns."""

    loss: torch.Tensor  #: () the loss, with gradient to ``pred``
    logprob: torch.Tensor  #: (S, B) per-step log-likelihoods under ``pred`` (no gradient)


def check_args(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip, mean: bool,
               normalizer) -> None:
    """Raises TypeError / ValueError naming the argument; the same checks as the C++ ops."""
    for name, t in (("pred", pred), ("traj", traj), ("coef_pred", coef_pred), ("coef_x", coef_x),
                    ("log_var", log_var), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if old_logprob is not None and not isinstance(old_logprob, torch.Tensor):
        raise TypeError(f"{_OP}: old_logprob must be a torch.Tensor or None, got {type(old_logprob).__name__}")
    _check_logprob_args(pred, traj, coef_pred, coef_x, log_var, mean, op=_OP)
    S, B, _ = pred.shape
    if advantages.dtype not in _COEF_FLOATS:
        raise TypeError(f"{_OP}: advantages must be float32 or float64, got {advantages.dtype}")
    if advantages.dim() != 1 or advantages.shape[0] != B:
        raise ValueError(f"{_OP}: advantages must have shape (B,) = ({B},), got {tuple(advantages.shape)}")
    if advantages.device != pred.device:
        raise ValueError(f"{_OP}: advantages is on {advantages.device} but pred is on {pred.device}")
    if old_logprob is not None:
        if old_logprob.dtype not in _COEF_FLOATS:
            raise TypeError(f"{_OP}: old_logprob must be float32 or float64, got {old_logprob.dtype}")
        if tuple(old_logprob.shape) != (S, B):
            raise ValueError(f"{_OP}: old_logprob must have shape (S, B) = {(S, B)}, "
                             f"got {tuple(old_logprob.shape)}")
        if old_logprob.device != pred.device:
            raise ValueError(f"{_OP}: old_logprob is on {old_logprob.device} but pred is on {pred.device}")
        _positive_number(clip, "clip")
    _positive_number(normalizer, "normalizer")


def _positive_number(value, name: str) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{_OP}: {name} must be a finite number > 0, got {value!r}")


def _fake(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip, mean, normalizer):
    check_args(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip, mean, normalizer)
    S, B, _ = pred.shape
    acc = _result_dtype(pred.dtype)
    return (pred.new_empty((), dtype=acc), pred.new_empty((S, B), dtype=acc),
            torch.empty(pred.shape, dtype=pred.dtype, device=pred.device))


def _setup_context(ctx, inputs, output):
    pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip, mean, normalizer = inputs
    _, logprob, grad_pred = output
    ctx.mark_non_differentiable(logprob, grad_pred)
    # No zero-filled upstream gradients for the outputs nobody differentiates (one of them is as
    # large as pred): filling them would cost a pass of its own.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_pred, pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob)
    ctx.args = (clip, mean, normalizer)


def _backward(ctx, g_loss, _g_logprob, _g_grad):
    """d/d pred: the forward's gradient times the loss's upstream gradient (a scalar).

    The upstream gradient of a loss is almost always exactly 1 (``loss.backward()``); the stored
    gradient is then handed on as it is, without another pass over it. When a graph of the
    gradient is asked for (``create_graph=True``: double backward), the gradient is formed again
    by autograd through the reference, so its own derivatives are those of the reference.
    """
    grad_pred, pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or g_loss is None:
        return (None,) * 10
    clip, mean, normalizer = ctx.args
    if torch.is_grad_enabled():
        loss, _ = reference.policy_loss(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob,
                                        clip, mean, normalizer)
        (grad,) = torch.autograd.grad(loss, pred, create_graph=True)
        return (g_loss.to(grad.dtype) * grad,) + (None,) * 9
    if type(g_loss) is torch.Tensor and not torch.compiler.is_compiling() and bool(g_loss == 1):
        out = grad_pred
    else:
        out = (g_loss.to(torch.float64 if pred.dtype == torch.float64 else torch.float32) * grad_pred
               ).to(pred.dtype)
    return (out,) + (None,) * 9


# --- the compiled op (registered by refit_kernels._C) -----------------------
if _extension.MODULE is not None:
    torch.library.register_fake("refit::policy_loss")(_fake)
    torch.library.register_autograd("refit::policy_loss", _backward, setup_context=_setup_context)


# --- the Triton op ------------------------------------------------------------
@torch.library.custom_op("refit::policy_loss_triton", mutates_args=())
def _policy_loss_triton(pred: torch.Tensor, traj: torch.Tensor, coef_pred: torch.Tensor,
                        coef_x: torch.Tensor, log_var: torch.Tensor, advantages: torch.Tensor,
                        old_logprob: Optional[torch.Tensor], clip: float, mean: bool,
                        normalizer: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_args(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip, mean, normalizer)
    from ..triton import gaussian_logprob as kernels

    return kernels.policy_loss(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip, mean,
                               normalizer)


_policy_loss_triton.register_fake(_fake)
_policy_loss_triton.register_autograd(_backward, setup_context=_setup_context)


def _compiled(*args):
    return torch.ops.refit.policy_loss(*args)


_IMPLS = {"cpu": _compiled, "cuda": _compiled, "triton": _policy_loss_triton}


def policy_loss(
    pred: torch.Tensor,
    traj: torch.Tensor,
    coef_pred: torch.Tensor,
    coef_x: torch.Tensor,
    log_var: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprob: Optional[torch.Tensor] = None,
    clip: float = 0.2,
    reduction: str = "sum",
    normalizer: Optional[float] = None,
    backend: Optional[str] = None,
) -> PolicyLoss:
    """The policy-gradient loss of sampled trajectories, value and gradient in one pass.

    With ``L[s, b]`` the log-likelihood of step s of trajectory b, as
    :func:`~refit_kernels.gaussian_logprob` gives it with ``per_step=True``, and
    ``a`` the advantages:

    * REINFORCE / GRPO (no ``old_logprob``):
      ``loss = -sum_b a[b] * sum_s L[s, b] / normalizer``;
    * PPO's clipped surrogate, per step (``old_logprob`` given):
      ``rho = exp(L - old_logprob)``,
      ``loss = -sum_{s,b} min(rho * a[b], clamp(rho, 1 - clip, 1 + clip) * a[b]) / normalizer``.

    The value and its gradient are those of autograd through
    ``gaussian_logprob`` (the ``reference`` backend is exactly that path).

    Args:
        pred, traj, coef_pred, coef_x, log_var: as :func:`~refit_kernels.gaussian_logprob`:
            (S, B, I) denoiser outputs (float16, bfloat16, float32 or float64; the
            only input with a gradient), (S+1, B, I) states of pred's dtype, and
            (S,) float32 or float64 step constants; all on one device.
        advantages: (B,) float32 or float64 per-trajectory advantages (detached).
        old_logprob: (S, B) float32 or float64 per-step log-likelihoods of the
            sampling policy (PPO), or None (REINFORCE).
        clip: PPO's clip range, a finite number > 0 (used only with ``old_logprob``).
        reduction: ``"sum"`` or ``"mean"`` over items, as gaussian_logprob's.
        normalizer: what the summed loss is divided by, a finite number > 0;
            default B (REINFORCE: the batch mean) or S * B (PPO: the mean over
            steps and trajectories), and 1 for an empty batch.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            None lets the dispatcher choose (``REFIT_BACKEND`` overrides).

    Returns:
        ``PolicyLoss(loss, logprob)``: the () loss, differentiable with respect to
        ``pred`` (to any order), and the (S, B) per-step log-likelihoods
        (detached); float64 for float64 inputs, else float32. The kernels
        accumulate in float32 or wider (float64 on the CPU).

    Memory: the gradient is computed in the forward call and held, (S, B, I) in
    pred's dtype, until backward hands it on.

    Raises:
        TypeError / ValueError naming the offending argument (also for sparse,
        nested or meta tensors); refit_kernels.BackendUnavailable when a forced
        backend cannot run.
    """
    named = (("pred", pred), ("traj", traj), ("coef_pred", coef_pred), ("coef_x", coef_x),
             ("log_var", log_var), ("advantages", advantages), ("old_logprob", old_logprob))
    for arg_name, t in named:
        if isinstance(t, torch.Tensor):
            dense_tensor(t, arg_name, _OP)
            has_data(t, arg_name, _OP)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"{_OP}: reduction must be 'sum' or 'mean', got {reduction!r}")
    mean = reduction == "mean"
    if normalizer is None and isinstance(pred, torch.Tensor) and pred.dim() == 3:
        S, B = pred.shape[:2]
        normalizer = float(max(1, B if old_logprob is None else S * B))
    check_args(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip, mean, normalizer)
    name = dispatch.select(_OP, pred.device, backend)
    old = None if old_logprob is None else old_logprob.detach()
    args = (pred, traj.detach(), coef_pred.detach(), coef_x.detach(), log_var.detach(), advantages.detach(),
            old, float(clip), mean, float(normalizer))
    if name == "reference":
        return PolicyLoss(*reference.policy_loss(*args))
    loss, logprob, _ = _IMPLS[name](*args)
    return PolicyLoss(loss, logprob)
