"""gaussian_logprob: log-likelihood of a reverse diffusion trajectory (DESIGN.md, Op 1).

This module is the op's whole Python side: argument checks shared by every
backend, the fake (meta) implementations and gradients of the compiled op
``refit::gaussian_logprob`` and of the Triton op
``refit::gaussian_logprob_triton``, and the public function that dispatches.

Gradients of every order: the backward ops (``refit::gaussian_logprob_backward``
and its Triton twin) have gradients of their own, written with PyTorch ops
(so they are differentiable again). The gradient

    G[s,b,i] = g[b] * c * coef_pred[s] * r[s,b,i] / v_s,   r = traj[s+1] - mu_s,

(c = 1, or 1/I for ``reduction="mean"``; g[s,b] with ``per_step``) is
linear in g and affine in pred, so its own derivatives are short:
dG/dpred = -g c coef_pred^2 / v_s (diagonal), dG/dg = c coef_pred r / v_s.
Double backward (e.g. gradient penalties, Hessian-vector products) thus
gives on every backend what autograd gives through the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, dispatch, reference
from .._checks import dense_tensor, has_data

_OP = "gaussian_logprob"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COEF_FLOATS = (torch.float32, torch.float64)


def check_args(pred, traj, coef_pred, coef_x, log_var, mean: bool = False, op: str = _OP) -> None:
    """Raises TypeError / ValueError naming the argument; the same checks as the C++ ops."""
    named = (("pred", pred), ("traj", traj), ("coef_pred", coef_pred), ("coef_x", coef_x),
             ("log_var", log_var))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if pred.dtype not in _FLOATS:
        raise TypeError(f"{op}: pred must be float16, bfloat16, float32 or float64, got {pred.dtype}")
    if traj.dtype != pred.dtype:
        raise TypeError(f"{op}: traj must have pred's dtype {pred.dtype}, got {traj.dtype}")
    if pred.dim() != 3:
        raise ValueError(f"{op}: pred must be 3-D (S, B, I), got shape {tuple(pred.shape)}")
    if traj.dim() != 3:
        raise ValueError(f"{op}: traj must be 3-D (S+1, B, I), got shape {tuple(traj.shape)}")
    S, B, I = pred.shape
    if tuple(traj.shape) != (S + 1, B, I):
        raise ValueError(
            f"{op}: traj must have shape (S+1, B, I) = {(S + 1, B, I)} for pred of shape "
            f"{tuple(pred.shape)}, got {tuple(traj.shape)}"
        )
    if traj.device != pred.device:
        raise ValueError(f"{op}: traj is on {traj.device} but pred is on {pred.device}")
    if mean and I == 0:
        raise ValueError(f"{op}: reduction='mean' needs at least one item, got I = 0")
    for name, c in named[2:]:
        if c.dtype not in _COEF_FLOATS:
            raise TypeError(f"{op}: {name} must be float32 or float64, got {c.dtype}")
        if c.dim() != 1 or c.shape[0] != S:
            raise ValueError(f"{op}: {name} must have shape (S,) = ({S},), got {tuple(c.shape)}")
        if c.device != pred.device:
            raise ValueError(f"{op}: {name} is on {c.device} but pred is on {pred.device}")


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_grad(grad, pred, per_step: bool, op: str) -> None:
    if grad.dtype not in _COEF_FLOATS:
        raise TypeError(f"{op}: grad must be float32 or float64, got {grad.dtype}")
    S, B, _ = pred.shape
    want = (S, B) if per_step else (B,)
    if tuple(grad.shape) != want:
        raise ValueError(f"{op}: grad must have shape {want} for pred of shape {tuple(pred.shape)}, "
                         f"got {tuple(grad.shape)}")
    if grad.device != pred.device:
        raise ValueError(f"{op}: grad is on {grad.device} but pred is on {pred.device}")


def _fake_forward(pred, traj, coef_pred, coef_x, log_var, mean, per_step):
    check_args(pred, traj, coef_pred, coef_x, log_var, mean)
    S, B, _ = pred.shape
    return pred.new_empty((S, B) if per_step else (B,), dtype=_result_dtype(pred.dtype))


def _fake_backward(grad, pred, traj, coef_pred, coef_x, log_var, mean, per_step):
    check_args(pred, traj, coef_pred, coef_x, log_var, mean)
    _check_grad(grad, pred, per_step, _OP + "_backward")
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


def _setup_context(ctx, inputs, output):
    pred, traj, coef_pred, coef_x, log_var, mean, per_step = inputs
    ctx.save_for_backward(pred, traj, coef_pred, coef_x, log_var)
    ctx.mean = mean
    ctx.per_step = per_step


def _setup_backward_context(ctx, inputs, output):
    grad, pred, traj, coef_pred, coef_x, log_var, mean, per_step = inputs
    ctx.save_for_backward(grad, pred, traj, coef_pred, coef_x, log_var)
    ctx.mean = mean
    ctx.per_step = per_step


def _backward_of_backward(ctx, upstream):
    """Gradients of G = backward(g, pred, ...) for the (S, B, I) ``upstream`` dL'/dG.

    Returns (dL'/dg, dL'/dpred): ``c coef_pred[s] / v_s * sum_i upstream * r``
    (summed over s unless per_step) and ``-upstream * g c coef_pred^2 / v_s``.
    Computed in float64 for float64 inputs, else float32, and returned in g's
    and pred's dtypes. Both are PyTorch expressions, so they have gradients too.
    """
    grad, pred, traj, coef_pred, coef_x, log_var = ctx.saved_tensors
    S, B, I = pred.shape
    wide = torch.float64 in (pred.dtype, grad.dtype, upstream.dtype)
    acc = torch.float64 if wide else torch.float32
    cp = coef_pred.to(acc)
    scale = cp * torch.exp(-log_var.to(acc))  # (S,): coef_pred / v
    if ctx.mean:
        scale = scale / I
    h = upstream.to(acc)
    grad_g = grad_pred = None
    if ctx.needs_input_grad[0]:
        x = traj.to(acc)
        resid = x[1:] - cp[:, None, None] * pred.to(acc) - coef_x.to(acc)[:, None, None] * x[:-1]
        per = (h * resid).sum(-1) * scale[:, None]  # (S, B)
        grad_g = (per if ctx.per_step else per.sum(0)).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        g = grad.to(acc)
        g = g if ctx.per_step else g.expand(S, B)
        grad_pred = (-h * (g * (scale * cp)[:, None])[:, :, None]).to(pred.dtype)
    return grad_g, grad_pred, None, None, None, None, None, None


def _make_backward(backward_op):
    def _backward(ctx, grad):
        pred, traj, coef_pred, coef_x, log_var = ctx.saved_tensors
        grad_pred = None
        if ctx.needs_input_grad[0]:
            grad_pred = backward_op(grad, pred, traj, coef_pred, coef_x, log_var, ctx.mean, ctx.per_step)
        # traj and the per-step constants are treated as constants (DESIGN.md).
        return grad_pred, None, None, None, None, None, None

    return _backward


# --- the compiled op (registered by refit_kernels._C) -----------------------
if _extension.MODULE is not None:
    torch.library.register_fake("refit::gaussian_logprob")(_fake_forward)
    torch.library.register_fake("refit::gaussian_logprob_backward")(_fake_backward)
    torch.library.register_autograd(
        "refit::gaussian_logprob",
        _make_backward(lambda *a: torch.ops.refit.gaussian_logprob_backward(*a)),
        setup_context=_setup_context,
    )
    torch.library.register_autograd(
        "refit::gaussian_logprob_backward", _backward_of_backward, setup_context=_setup_backward_context
    )


# --- the Triton op ------------------------------------------------------------
# A custom op, so torch.compile traces calls to it as one opaque node.
@torch.library.custom_op("refit::gaussian_logprob_triton", mutates_args=())
def _gaussian_logprob_triton(pred: torch.Tensor, traj: torch.Tensor, coef_pred: torch.Tensor,
                             coef_x: torch.Tensor, log_var: torch.Tensor, mean: bool,
                             per_step: bool) -> torch.Tensor:
    check_args(pred, traj, coef_pred, coef_x, log_var, mean)
    from ..triton import gaussian_logprob as kernels

    out = kernels.forward(pred, traj, coef_pred, coef_x, log_var, mean, per_step)
    return out.to(_result_dtype(pred.dtype))


@torch.library.custom_op("refit::gaussian_logprob_backward_triton", mutates_args=())
def _gaussian_logprob_backward_triton(grad: torch.Tensor, pred: torch.Tensor, traj: torch.Tensor,
                                      coef_pred: torch.Tensor, coef_x: torch.Tensor,
                                      log_var: torch.Tensor, mean: bool,
                                      per_step: bool) -> torch.Tensor:
    check_args(pred, traj, coef_pred, coef_x, log_var, mean)
    _check_grad(grad, pred, per_step, _OP + "_backward")
    from ..triton import gaussian_logprob as kernels

    return kernels.backward(grad, pred, traj, coef_pred, coef_x, log_var, mean, per_step)


_gaussian_logprob_triton.register_fake(_fake_forward)
_gaussian_logprob_backward_triton.register_fake(_fake_backward)
_gaussian_logprob_triton.register_autograd(
    _make_backward(_gaussian_logprob_backward_triton), setup_context=_setup_context
)
_gaussian_logprob_backward_triton.register_autograd(_backward_of_backward,
                                                    setup_context=_setup_backward_context)


def _compiled(pred, traj, coef_pred, coef_x, log_var, mean, per_step):
    return torch.ops.refit.gaussian_logprob(pred, traj, coef_pred, coef_x, log_var, mean, per_step)


_IMPLS = {
    "reference": reference.gaussian_logprob,
    "cpu": _compiled,
    "cuda": _compiled,
    "triton": _gaussian_logprob_triton,
}


def gaussian_logprob(
    pred: torch.Tensor,
    traj: torch.Tensor,
    coef_pred: torch.Tensor,
    coef_x: torch.Tensor,
    log_var: torch.Tensor,
    *,
    reduction: str = "sum",
    per_step: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Exact log-likelihood of a reverse diffusion trajectory, per user.

    Step ``s`` of the trajectory is Gaussian with mean
    ``mu_s = coef_pred[s] * pred[s] + coef_x[s] * traj[s]`` and variance
    ``exp(log_var[s])``; the result is

        L[b] = sum_s sum_i -0.5 * ((traj[s+1,b,i] - mu_s[b,i])**2 / v_s + log(2*pi*v_s))

    Args:
        pred: (S, B, I) denoiser outputs at each step; float16, bfloat16,
            float32 or float64. The only input that receives a gradient.
        traj: (S+1, B, I) states, same dtype as ``pred``: ``traj[0]`` is the
            start, ``traj[s+1]`` the state sampled at step s. Treated as a
            constant (detached).
        coef_pred, coef_x, log_var: (S,) float32 or float64 per-step
            constants on the inputs' device (detached).
        reduction: ``"sum"`` (the exact log-likelihood) or ``"mean"`` (divided
            by I).
        per_step: return the (S, B) per-step terms instead of their sum.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            None lets the dispatcher choose (``REFIT_BACKEND`` overrides).

    Returns:
        (B,) or, with ``per_step``, (S, B): float64 for float64 inputs, else
        float32. Kernels accumulate in float32 or wider (float64 on the CPU).

    Gradients: of any order, with respect to ``pred``, on every backend
    (the gradient of the gradient is formed from PyTorch ops, see the
    module docstring), so double backward matches the reference.

    Raises:
        TypeError / ValueError naming the offending argument (also for
        sparse or nested tensors, and for meta tensors, which hold no data);
        refit_kernels.BackendUnavailable when a forced backend cannot run.
    """
    for arg_name, t in (("pred", pred), ("traj", traj), ("coef_pred", coef_pred), ("coef_x", coef_x),
                        ("log_var", log_var)):
        if isinstance(t, torch.Tensor):
            dense_tensor(t, arg_name, _OP)
            has_data(t, arg_name, _OP)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"{_OP}: reduction must be 'sum' or 'mean', got {reduction!r}")
    if not isinstance(per_step, bool):
        raise TypeError(f"{_OP}: per_step must be a bool, got {type(per_step).__name__}")
    mean = reduction == "mean"
    check_args(pred, traj, coef_pred, coef_x, log_var, mean)
    name = dispatch.select(_OP, pred.device, backend)
    return _IMPLS[name](pred, traj.detach(), coef_pred.detach(), coef_x.detach(), log_var.detach(),
                        mean, per_step)
