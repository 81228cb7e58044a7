"""Triton kernels of gaussian_logprob (DESIGN.md, Op 1).

One program per (step, user) row walks the row's I items in blocks,
accumulating in float32 (float64 for float64 inputs). The forward pass writes
one term per row; the backward pass writes the gradient row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import interpret_mode

_LOG_2PI = tl.constexpr(math.log(2.0 * math.pi))


@triton.jit
def _to_bf16_rtne(x):
    """float32 -> bfloat16, rounding to nearest even with integer arithmetic.

    Triton's interpreter truncates in ``.to(tl.bfloat16)``; compiled Triton
    rounds. This gives the compiled result in both (used only when interpreting).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), out)


@triton.jit
def _row_start(Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, B,
               pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride, ACC: tl.constexpr):
    """This program's (step, user) row: (row, s, b, pred row, state row, next state row, coef_pred,
    coef_x, log_var), the constants in ACC."""
    row = tl.program_id(0).to(tl.int64)
    s = row // B
    b = row % B
    x_row = Traj_ptr + s * traj_s_stride + b * traj_b_stride
    return (row, s, b, Pred_ptr + s * pred_s_stride + b * pred_b_stride, x_row, x_row + traj_s_stride,
            tl.load(CoefPred_ptr + s).to(ACC), tl.load(CoefX_ptr + s).to(ACC), tl.load(LogVar_ptr + s).to(ACC))


@triton.jit
def _residual_block(pred_row, x_row, x_next_row, start, I, cp, cx, ACC: tl.constexpr, BLOCK_I: tl.constexpr):
    """(offsets, mask, residuals) of the items [start, start + BLOCK_I) of a row, in ACC; the same fused
    form as csrc/include/refit/gaussian_logprob.h. Items past I have residual 0."""
    offs = start + tl.arange(0, BLOCK_I)
    mask = offs < I
    p = tl.load(pred_row + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
    xn = tl.load(x_next_row + offs, mask=mask, other=0.0).to(ACC)
    return offs, mask, tl.fma(-cp, p, tl.fma(-cx, x, xn))


@triton.jit
def _row_term(sum_sq, lv, n_items, MEAN: tl.constexpr):
    """A (step, user) row's log-likelihood from its sum of squared residuals; the normalising constant
    is added once per row, not once per item."""
    term = -0.5 * (sum_sq * tl.exp(-lv) + n_items * (_LOG_2PI + lv))
    if MEAN:
        term = term / n_items
    return term


@triton.jit
def _store_row(out_row, offs, mask, values, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        tl.store(out_row + offs, _to_bf16_rtne(values.to(tl.float32)), mask=mask)
    else:
        tl.store(out_row + offs, values.to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _gaussian_logprob_fwd_kernel(
    Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, Terms_ptr,
    B, I,
    pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride,
    MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr,
):
    row, s, b, pred_row, x_row, x_next_row, cp, cx, lv = _row_start(
        Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, B,
        pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride, ACC)

    acc = tl.zeros([BLOCK_I], dtype=ACC)
    for start in range(0, I, BLOCK_I):
        offs, mask, r = _residual_block(pred_row, x_row, x_next_row, start, I, cp, cx, ACC, BLOCK_I)
        acc += r * r
    term = _row_term(tl.sum(acc, axis=0), lv, I.to(ACC), MEAN)
    tl.store(Terms_ptr + row, term)


@triton.jit
def _gaussian_logprob_bwd_kernel(
    Grad_ptr, Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, Out_ptr,
    B, I,
    pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride,
    MEAN: tl.constexpr, PER_STEP: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row, s, b, pred_row, x_row, x_next_row, cp, cx, lv = _row_start(
        Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, B,
        pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride, ACC)
    out_row = Out_ptr + row * I
    if PER_STEP:
        g = tl.load(Grad_ptr + row).to(ACC)
    else:
        g = tl.load(Grad_ptr + b).to(ACC)
    factor = g * cp * tl.exp(-lv)
    if MEAN:
        factor = factor / I.to(ACC)
    for start in range(0, I, BLOCK_I):
        offs, mask, r = _residual_block(pred_row, x_row, x_next_row, start, I, cp, cx, ACC, BLOCK_I)
        g_pred = factor * r
        _store_row(out_row, offs, mask, g_pred, ROUND_BF16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(n_items: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(1, n_items))))


def _items_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[2] <= 1 or t.stride(2) == 1 else t.contiguous()


def forward(pred, traj, coef_pred, coef_x, log_var, mean: bool, per_step: bool) -> torch.Tensor:
    """(S, B, I) pred and (S+1, B, I) traj -> (B,) or (S, B) log-likelihood terms."""
    pred = _items_contiguous(pred)
    traj = _items_contiguous(traj)
    S, B, I = pred.shape
    acc = _acc_dtype(pred.dtype)
    terms = torch.empty((S, B), dtype=acc, device=pred.device)
    if S * B > 0:
        cp, cx, lv = (c.to(acc).contiguous() for c in (coef_pred, coef_x, log_var))
        _gaussian_logprob_fwd_kernel[(S * B,)](
            pred, traj, cp, cx, lv, terms,
            B, I,
            pred.stride(0), pred.stride(1), traj.stride(0), traj.stride(1),
            MEAN=mean, ACC=_tl_acc(pred.dtype), BLOCK_I=_block(I),
        )
    return terms if per_step else terms.sum(0)


def backward(grad, pred, traj, coef_pred, coef_x, log_var, mean: bool, per_step: bool) -> torch.Tensor:
    """Gradient of :func:`forward` with respect to pred: contiguous, pred's shape and dtype."""
    pred = _items_contiguous(pred)
    traj = _items_contiguous(traj)
    S, B, I = pred.shape
    acc = _acc_dtype(pred.dtype)
    out = torch.empty((S, B, I), dtype=pred.dtype, device=pred.device)
    if S * B * I > 0:
        g = grad.to(acc).contiguous()
        cp, cx, lv = (c.to(acc).contiguous() for c in (coef_pred, coef_x, log_var))
        _gaussian_logprob_bwd_kernel[(S * B,)](
            g, pred, traj, cp, cx, lv, out,
            B, I,
            pred.stride(0), pred.stride(1), traj.stride(0), traj.stride(1),
            MEAN=mean, PER_STEP=per_step, ACC=_tl_acc(pred.dtype), BLOCK_I=_block(I),
            ROUND_BF16=pred.dtype == torch.bfloat16 and interpret_mode(),
        )
    return out


# --- the fused policy loss (refit_kernels.policy_loss) --------------------------------------

@triton.jit
def _policy_loss_kernel(
    Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, Adv_ptr, Old_ptr,
    Terms_ptr, Shares_ptr, Out_ptr, Params_ptr,
    B, I,
    pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride,
    MEAN: tl.constexpr, HAS_OLD: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row, s, b, pred_row, x_row, x_next_row, cp, cx, lv = _row_start(
        Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, B,
        pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride, ACC)
    out_row = Out_ptr + row * I
    adv = tl.load(Adv_ptr + b).to(ACC)
    # (1 - clip, 1 + clip, 1 / normalizer) in the accumulation type: scalar arguments would
    # reach the kernel as float32.
    lo = tl.load(Params_ptr + 0)
    hi = tl.load(Params_ptr + 1)
    inv_n = tl.load(Params_ptr + 2)
    n_items = I.to(ACC)
    factor = cp * tl.exp(-lv)
    if MEAN:
        factor = factor / n_items
    acc = tl.zeros([BLOCK_I], dtype=ACC)
    if HAS_OLD:
        # PPO: the row's weight depends on its own term, so the sum comes first and the
        # gradient loop reads the row a second time.
        for start in range(0, I, BLOCK_I):
            offs, mask, r = _residual_block(pred_row, x_row, x_next_row, start, I, cp, cx, ACC, BLOCK_I)
            acc += r * r
        term = _row_term(tl.sum(acc, axis=0), lv, n_items, MEAN)
        old = tl.load(Old_ptr + row).to(ACC)
        rho = tl.exp(term - old)
        clamped = tl.minimum(tl.maximum(rho, lo), hi)
        plain = rho * adv
        cut = clamped * adv
        # As csrc/include/refit/policy_loss.h: both branches carry the gradient inside the clip
        # range, only the smaller plain branch outside it.
        live = ((rho >= lo) & (rho <= hi)) | (plain < cut)
        share = -tl.minimum(plain, cut) * inv_n
        weight = tl.where(live, -adv * rho * inv_n, 0.0)
        g = weight * factor
        for start in range(0, I, BLOCK_I):
            offs, mask, r = _residual_block(pred_row, x_row, x_next_row, start, I, cp, cx, ACC, BLOCK_I)
            _store_row(out_row, offs, mask, g * r, ROUND_BF16)
    else:
        # REINFORCE: the weight is known up front; one read of the row gives the sum and the gradient.
        g = -adv * inv_n * factor
        for start in range(0, I, BLOCK_I):
            offs, mask, r = _residual_block(pred_row, x_row, x_next_row, start, I, cp, cx, ACC, BLOCK_I)
            acc += r * r
            _store_row(out_row, offs, mask, g * r, ROUND_BF16)
        term = _row_term(tl.sum(acc, axis=0), lv, n_items, MEAN)
        share = -adv * term * inv_n
    tl.store(Terms_ptr + row, term)
    tl.store(Shares_ptr + row, share)


def policy_loss(pred, traj, coef_pred, coef_x, log_var, advantages, old_logprob, clip: float, mean: bool,
                normalizer: float):
    """The fused policy loss: ``(loss (), logprob (S, B), grad_pred (S, B, I))``.

    loss and logprob in float64 for float64 inputs, else float32; grad_pred
    contiguous in pred's dtype. See ``refit_kernels.policy_loss``.
    """
    pred = _items_contiguous(pred)
    traj = _items_contiguous(traj)
    S, B, I = pred.shape
    acc = _acc_dtype(pred.dtype)
    terms = torch.zeros((S, B), dtype=acc, device=pred.device)
    shares = torch.zeros((S, B), dtype=acc, device=pred.device)
    out = torch.empty((S, B, I), dtype=pred.dtype, device=pred.device)
    if S * B > 0:
        cp, cx, lv = (c.to(acc).contiguous() for c in (coef_pred, coef_x, log_var))
        adv = advantages.to(acc).contiguous()
        old = old_logprob.to(acc).contiguous() if old_logprob is not None else adv
        params = torch.tensor([1.0 - clip, 1.0 + clip, 1.0 / normalizer], dtype=acc, device=pred.device)
        _policy_loss_kernel[(S * B,)](
            pred, traj, cp, cx, lv, adv, old, terms, shares, out, params,
            B, I,
            pred.stride(0), pred.stride(1), traj.stride(0), traj.stride(1),
            MEAN=mean, HAS_OLD=old_logprob is not None, ACC=_tl_acc(pred.dtype), BLOCK_I=_block(I),
            ROUND_BF16=pred.dtype == torch.bfloat16 and interpret_mode(),
        )
    return shares.sum(), terms, out
