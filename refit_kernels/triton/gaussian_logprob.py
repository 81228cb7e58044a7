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
def _gaussian_logprob_fwd_kernel(
    Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, Terms_ptr,
    B, I,
    pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride,
    MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = row // B
    b = row % B
    pred_row = Pred_ptr + s * pred_s_stride + b * pred_b_stride
    x_row = Traj_ptr + s * traj_s_stride + b * traj_b_stride
    x_next_row = x_row + traj_s_stride
    cp = tl.load(CoefPred_ptr + s).to(ACC)
    cx = tl.load(CoefX_ptr + s).to(ACC)
    lv = tl.load(LogVar_ptr + s).to(ACC)

    acc = tl.zeros([BLOCK_I], dtype=ACC)
    for start in range(0, I, BLOCK_I):
        offs = start + tl.arange(0, BLOCK_I)
        mask = offs < I
        p = tl.load(pred_row + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
        xn = tl.load(x_next_row + offs, mask=mask, other=0.0).to(ACC)
        # Same fused form as csrc/include/refit/gaussian_logprob.h.
        r = tl.fma(-cp, p, tl.fma(-cx, x, xn))
        acc += r * r
    sum_sq = tl.sum(acc, axis=0)
    n_items = I.to(ACC)
    # The normalising constant is added once per row, not once per item.
    term = -0.5 * (sum_sq * tl.exp(-lv) + n_items * (_LOG_2PI + lv))
    if MEAN:
        term = term / n_items
    tl.store(Terms_ptr + row, term)


@triton.jit
def _gaussian_logprob_bwd_kernel(
    Grad_ptr, Pred_ptr, Traj_ptr, CoefPred_ptr, CoefX_ptr, LogVar_ptr, Out_ptr,
    B, I,
    pred_s_stride, pred_b_stride, traj_s_stride, traj_b_stride,
    MEAN: tl.constexpr, PER_STEP: tl.constexpr, ACC: tl.constexpr, BLOCK_I: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = row // B
    b = row % B
    pred_row = Pred_ptr + s * pred_s_stride + b * pred_b_stride
    x_row = Traj_ptr + s * traj_s_stride + b * traj_b_stride
    x_next_row = x_row + traj_s_stride
    out_row = Out_ptr + row * I
    cp = tl.load(CoefPred_ptr + s).to(ACC)
    cx = tl.load(CoefX_ptr + s).to(ACC)
    lv = tl.load(LogVar_ptr + s).to(ACC)
    if PER_STEP:
        g = tl.load(Grad_ptr + row).to(ACC)
    else:
        g = tl.load(Grad_ptr + b).to(ACC)
    factor = g * cp * tl.exp(-lv)
    if MEAN:
        factor = factor / I.to(ACC)
    for start in range(0, I, BLOCK_I):
        offs = start + tl.arange(0, BLOCK_I)
        mask = offs < I
        p = tl.load(pred_row + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
        xn = tl.load(x_next_row + offs, mask=mask, other=0.0).to(ACC)
        r = tl.fma(-cp, p, tl.fma(-cx, x, xn))
        g_pred = factor * r
        if ROUND_BF16:
            tl.store(out_row + offs, _to_bf16_rtne(g_pred.to(tl.float32)), mask=mask)
        else:
            tl.store(out_row + offs, g_pred.to(Out_ptr.dtype.element_ty), mask=mask)


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
