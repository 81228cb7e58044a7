"""The CUDA gaussian_logprob, policy_loss, gather_rows and target_rank kernels, executed on the CPU against the
reference.

Without a GPU the CUDA sources still run: ``emulation.py`` compiles each
kernel file with its launches rewritten for the host emulation of the CUDA
features it uses (this folder's headers: a block's threads as std::threads,
barriers, shared memory, warp shuffles, atomics, half / bfloat16
conversions), under AddressSanitizer and UBSan where available, and a small
driver runs one case per process. The topk_hits kernel is emulated by
tests/test_topk_hits.py.

Coverage: every dtype each kernel takes; launch geometries with idle
threads, partial warps of data, block sizes of 32 to 256 threads, several
passes per thread with a tail, more rows than one block of the step-sum
kernel, several shared-memory tiles (the last one partial); strided inputs
and outputs; empty dimensions; and gather_rows' device-side validation;
for policy_loss, REINFORCE's one pass and PPO's two with rows inside, below
and above the clip range under advantages of both signs;
for target_rank, rows shorter and longer than a block, rows with more
positives than one pass counts, users, strided rows, and every per-row
refusal in the order the other backends report it.
The values are judged with the same criteria as the other backends'
(tests/test_gaussian_logprob.py, tests/test_gather_rows.py,
tests/test_target_rank.py).
"""

import math

import numpy as np
import pytest
import torch

import emulation
from refit_kernels import reference
from test_gather_rows import random_csr, random_segments, truth as gather_truth
from test_gaussian_logprob import assert_accurate, conditioning, make_trajectory, truth_and_baseline
from test_target_rank import BAD as TARGET_RANK_BAD, make_case as target_rank_case, plain_args as target_rank_args

pytestmark = pytest.mark.skipif(emulation.compiler() is None, reason="no C++ compiler for the CUDA emulation")


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    work = tmp_path_factory.mktemp("cuda_emu_drivers")
    return {op: emulation.build(op, work / op)
            for op in ("gaussian_logprob", "policy_loss", "gather_rows", "target_rank", "convert")}


# --- the host stand-ins of the CUDA 16-bit conversions ------------------------------------------

def test_half_and_bfloat16_conversions_round_like_cuda(drivers):
    """The stand-ins round to nearest even, as the CUDA intrinsics and torch do: compared bit for bit."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~torch.isnan(x)]
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e6, -1e6, 2.0**-14, 2.0**-24,
                            2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-25, 2.0**-26, 1e-8, 5.96e-8, 6.1e-5,
                            1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895314e38,
                            3.4028235e38, math.inf, -math.inf])
    scaled = torch.randn(50_000, generator=g) * torch.exp2(torch.randint(-30, 20, (50_000,), generator=g).float())
    x = torch.cat([special, -special, scaled, x])
    half, bf16, half_back, bf16_back = emulation.convert(drivers["convert"], x)
    want_half, want_bf16 = x.half(), x.bfloat16()
    assert torch.equal(half, want_half.view(torch.int16)), "float -> half differs from round-to-nearest-even"
    assert torch.equal(bf16, want_bf16.view(torch.int16)), "float -> bfloat16 differs from round-to-nearest-even"
    assert torch.equal(half_back, want_half.float()) and torch.equal(bf16_back, want_bf16.float())
    nan_half, nan_bf16, *_ = emulation.convert(drivers["convert"], torch.tensor([math.nan, -math.nan]))
    assert nan_half.tolist() == [0x7FFF, 0x7FFF] and nan_bf16.tolist() == [0x7FFF, 0x7FFF]  # CUDA's canonical NaN


# --- gaussian_logprob ----------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MODES = [("sum", False), ("sum", True), ("mean", False), ("mean", True)]

# (S, B, I) and what the launch geometry exercises (threads per row block: I rounded up to a
# multiple of 32, between 32 and 256; one block per (step, user) row; the step sum 256 users a block).
GEOMETRIES = {
    "1x1x1": ((1, 1, 1), "a single item: 31 idle threads in the only warp"),
    "2x3x31": ((2, 3, 31), "one warp, one idle lane"),
    "2x2x33": ((2, 2, 33), "two warps, the second with one item"),
    "3x2x256": ((3, 2, 256), "a full block of 256 threads, one item each"),
    "2x3x257": ((2, 3, 257), "256 threads, a second pass for one item (the tail)"),
    "2x2x1100": ((2, 2, 1100), "five passes, the last one partial"),
    "2x300x3": ((2, 300, 3), "600 row blocks; the step sum in two blocks, the second partial"),
}


def _emulated(drivers, pred, traj, cp, cx, lv, gw, reduction, per_step):
    return emulation.gaussian_logprob(drivers["gaussian_logprob"], pred, traj, cp, cx, lv, gw,
                                      mean=reduction == "mean", per_step=per_step)


def _check(val, grad, pred, traj, cp, cx, lv, gw, reduction, per_step, what):
    (t_val, t_grad), (b_val, b_grad) = truth_and_baseline(pred, traj, cp, cx, lv, reduction, per_step, gw)
    c_val, c_grad = conditioning(pred, traj, cp, cx, lv, reduction, per_step, gw)
    assert val.dtype == (torch.float64 if pred.dtype == torch.float64 else torch.float32)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert_accurate(val, t_val, b_val, c_val, f"cuda (emulated) value, {what}")
    assert_accurate(grad, t_grad, b_grad, c_grad, f"cuda (emulated) gradient, {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_gaussian_logprob_matches_reference(drivers, dtype, geometry):
    shape, why = GEOMETRIES[geometry]
    S, B, _ = shape
    # The many-block geometry is about the step sum, which runs without per_step: one mode is enough there.
    modes = MODES if geometry != "2x300x3" else [("sum", False)]
    for reduction, per_step in modes:
        seed = hash((shape, str(dtype), reduction, per_step)) % 2**31
        pred, traj, cp, cx, lv = make_trajectory(*shape, dtype=dtype, seed=seed)
        # Unequal upstream gradients, so a backward that mixes up users or steps fails.
        gw = torch.randn((S, B) if per_step else (B,), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
        val, grad = _emulated(drivers, pred, traj, cp, cx, lv, gw, reduction, per_step)
        _check(val, grad, pred, traj, cp, cx, lv, gw, reduction, per_step,
               f"{geometry} ({why}), {reduction}, per_step={per_step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["strided-users", "permuted", "offset"])
def test_gaussian_logprob_strided_inputs(drivers, dtype, layout):
    """The step and user strides the host glue passes through unchanged (items stay contiguous)."""
    S, B, I = 3, 5, 70
    pred, traj, cp, cx, lv = make_trajectory(S, B, I, dtype=dtype, seed=11)
    if layout == "strided-users":  # every other row of a bigger batch
        big_p, big_t = torch.zeros(S, 2 * B, I, dtype=dtype), torch.zeros(S + 1, 2 * B, I, dtype=dtype)
        big_p[:, ::2], big_t[:, ::2] = pred, traj
        p, t = big_p[:, ::2], big_t[:, ::2]
    elif layout == "permuted":  # stored user-major
        p = pred.permute(1, 0, 2).contiguous().permute(1, 0, 2)
        t = traj.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    else:  # inside a bigger allocation, with a storage offset and padded rows
        big_p, big_t = torch.zeros(S + 1, B, I + 9, dtype=dtype), torch.zeros(S + 2, B, I + 9, dtype=dtype)
        big_p[1:, :, 4:4 + I], big_t[1:, :, 4:4 + I] = pred, traj
        p, t = big_p[1:, :, 4:4 + I], big_t[1:, :, 4:4 + I]
    assert not p.is_contiguous() and not t.is_contiguous()
    gw = torch.randn(S, B, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    val, grad = _emulated(drivers, p, t, cp, cx, lv, gw, "sum", True)
    _check(val, grad, pred, traj, cp, cx, lv, gw, "sum", True, layout)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=str)
def test_gaussian_logprob_empty_dimensions(drivers, shape):
    S, B, _ = shape
    pred, traj, cp, cx, lv = make_trajectory(*shape)
    for per_step in (False, True):
        gw = torch.ones((S, B) if per_step else (B,), dtype=torch.float64)
        val, grad = _emulated(drivers, pred, traj, cp, cx, lv, gw, "sum", per_step)
        assert val.shape == ((S, B) if per_step else (B,)) and grad.shape == pred.shape
        assert torch.equal(val, torch.zeros_like(val))  # an empty sum is zero


def test_gaussian_logprob_float32_coefficients(drivers):
    """DiffRec's sampler hands float32 constants; the host glue converts them as it does float64 ones."""
    pred, traj, cp, cx, lv = make_trajectory(3, 4, 40, seed=5, coef_dtype=torch.float32)
    gw = torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    val, grad = _emulated(drivers, pred, traj, cp, cx, lv, gw, "sum", False)
    _check(val, grad, pred, traj, cp, cx, lv, gw, "sum", False, "float32 coefficients")


# --- policy_loss ---------------------------------------------------------------------------------

PL_CLIP = 0.2
PL_NORMALIZER = 7.5  # not a power of two, so 1 / normalizer rounds
# The ratios exp(L - old) PPO cases are built around, row after row: below, inside and above
# [1 - clip, 1 + clip], far enough from its ends (>= 0.13 in log) that rounding of a float32 or
# 16-bit term cannot move a row across one.
PL_RATIOS = [0.4, 0.95, 1.05, 2.0, 0.6, 1.0, 1.6]


def _pl_case(S, B, I, dtype, seed, ppo, mean):
    """A trajectory, (B,) advantages alternating in sign (float64 for float64 inputs, else float32) and,
    for PPO, float64 (S, B) old log-likelihoods that put each row's ratio on one of PL_RATIOS."""
    pred, traj, cp, cx, lv = make_trajectory(S, B, I, dtype=dtype, seed=seed)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).abs() + 0.1
    adv[1::2] = -adv[1::2]
    adv = adv.to(torch.float64 if dtype == torch.float64 else torch.float32)
    old = None
    if ppo:
        terms = reference.gaussian_logprob(pred.double(), traj.double(), cp, cx, lv, mean, per_step=True)
        ratios = torch.tensor(PL_RATIOS, dtype=torch.float64)[torch.arange(S * B) % len(PL_RATIOS)].view(S, B)
        old = terms - ratios.log()
    return pred, traj, cp, cx, lv, adv, old


def _pl_reference(pred, traj, cp, cx, lv, adv, old, mean):
    """(truth, baseline): the reference's (loss, logprob, grad_pred) in float64 and in the inputs' precision."""
    out = []
    for p, t in ((pred.double(), traj.double()), (pred, traj)):
        p = p.detach().clone().requires_grad_(True)
        loss, logprob = reference.policy_loss(p, t, cp, cx, lv, adv, old, PL_CLIP, mean, PL_NORMALIZER)
        (grad,) = torch.autograd.grad(loss, p)
        out.append((loss.detach(), logprob, grad))
    return out


def _pl_check(drivers, pred, traj, cp, cx, lv, adv, old, mean, what, truth_inputs=None):
    """The emulated kernel against the reference, judged like gaussian_logprob (assert_accurate).

    ``truth_inputs``: contiguous copies of (pred, traj) for the reference when ``pred`` and ``traj``
    are strided views. The conditioning of the loss and the gradient adds what the row weights
    carry: a term's rounding moves its share by |w| times as much (w = d share / d term, here the
    unclipped -adv * rho / normalizer, an upper bound), and under PPO a gradient row by its own size
    times as much (through rho = exp(term - old)).
    """
    loss, logprob, grad = emulation.policy_loss(drivers["policy_loss"], pred, traj, cp, cx, lv, adv, old,
                                                clip=PL_CLIP, mean=mean, normalizer=PL_NORMALIZER)
    ref_pred, ref_traj = truth_inputs or (pred, traj)
    (t_loss, t_lp, t_grad), (b_loss, b_lp, b_grad) = _pl_reference(ref_pred, ref_traj, cp, cx, lv, adv, old, mean)
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and loss.shape == () and logprob.dtype == acc
    assert grad.dtype == pred.dtype and grad.shape == pred.shape

    rho = torch.ones_like(t_lp) if old is None else torch.exp(t_lp - old.double())
    w = adv.double()[None, :] * rho / PL_NORMALIZER
    reduction = "mean" if mean else "sum"
    c_lp, c_grad = conditioning(ref_pred, ref_traj, cp, cx, lv, reduction, True, w)
    # |share| <= |adv| / n * |L| (REINFORCE) or |adv| / n * max(rho, 1 + clip) (PPO).
    share_mag = adv.double().abs()[None, :] / PL_NORMALIZER * (
        t_lp.abs() if old is None else rho.clamp(min=1.0 + PL_CLIP))
    c_loss = (w.abs() * c_lp).sum() + share_mag.sum()
    if old is not None:
        c_grad = c_grad + t_grad.abs() * c_lp[..., None]
    assert_accurate(logprob, t_lp, b_lp, c_lp, f"cuda (emulated) policy_loss logprob, {what}")
    assert_accurate(loss, t_loss, b_loss, c_loss, f"cuda (emulated) policy_loss loss, {what}")
    assert_accurate(grad, t_grad, b_grad, c_grad, f"cuda (emulated) policy_loss gradient, {what}")
    return rho


# (algorithm, reduction, (S, B, I)): the 40-item rows take 64 threads (the second warp partial),
# the 300-item rows 256 threads with a second, partial pass, so each loop of the kernel runs
# with a tail under both geometries.
PL_MODES = [("reinforce", "sum", (2, 3, 300)), ("reinforce", "mean", (3, 5, 40)),
            ("ppo", "sum", (3, 5, 40)), ("ppo", "mean", (2, 3, 300))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_policy_loss_matches_reference(drivers, dtype):
    for algo, reduction, shape in PL_MODES:
        ppo, mean = algo == "ppo", reduction == "mean"
        seed = hash((shape, str(dtype), algo, reduction)) % 2**31
        pred, traj, cp, cx, lv, adv, old = _pl_case(*shape, dtype=dtype, seed=seed, ppo=ppo, mean=mean)
        rho = _pl_check(drivers, pred, traj, cp, cx, lv, adv, old, mean, f"{algo}, {reduction}, {shape}")
        if ppo:  # the case must hold every kind of row the clipped surrogate has
            inside = (rho >= 1 - PL_CLIP) & (rho <= 1 + PL_CLIP)
            a = adv.double()[None, :].expand_as(rho)
            outside_live = ~inside & (((rho < 1 - PL_CLIP) & (a > 0)) | ((rho > 1 + PL_CLIP) & (a < 0)))
            assert inside.any() and outside_live.any() and (~inside & ~outside_live).any()


def test_policy_loss_strided_inputs(drivers):
    """pred a view of every other user of a bigger batch, traj stored user-major: the host glue passes
    their step and user strides through (items stay contiguous)."""
    S, B, I = 3, 4, 50
    for dtype in (torch.float32, torch.bfloat16):
        for ppo in (False, True):
            pred, traj, cp, cx, lv, adv, old = _pl_case(S, B, I, dtype=dtype, seed=17, ppo=ppo, mean=False)
            big = torch.zeros(S, 2 * B, I, dtype=dtype)
            big[:, ::2] = pred
            p = big[:, ::2]
            t = traj.permute(1, 0, 2).contiguous().permute(1, 0, 2)
            assert not p.is_contiguous() and not t.is_contiguous()
            _pl_check(drivers, p, t, cp, cx, lv, adv, old, False, f"strided, {dtype}, ppo={ppo}",
                      truth_inputs=(pred, traj))


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=str)
def test_policy_loss_empty_dimensions(drivers, shape):
    """No rows: nothing is launched and the loss is 0; no items (sum only): every term is 0 and the
    rows still carry PPO's ratios exp(0 - old)."""
    for ppo in (False, True):
        pred, traj, cp, cx, lv, adv, old = _pl_case(*shape, dtype=torch.float32, seed=23, ppo=ppo, mean=False)
        _pl_check(drivers, pred, traj, cp, cx, lv, adv, old, False, f"{shape}, ppo={ppo}")


# --- gather_rows ----------------------------------------------------------------------------------

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = {torch.float32: -12345.0, torch.float16: -1234.0, torch.bfloat16: -1232.0}


def _gather(drivers, indptr, indices, values, rows, segments, weights, n_cols, dtype, layout="contiguous"):
    """The emulated kernel into an ``out`` of ``layout``; checks that nothing outside the view was written."""
    B = rows.shape[0] if segments is None else segments.shape[0] - 1
    if layout == "contiguous":
        shape, view = (B, n_cols), lambda t: t  # noqa: E731
    elif layout == "column-major":
        shape, view = (n_cols, B), lambda t: t.t()  # noqa: E731
    else:  # every other column of a wider buffer, inside padded rows
        shape, view = (B, 2 * n_cols + 3), lambda t: t[:, 1:1 + 2 * n_cols:2]  # noqa: E731
    base = torch.full(shape, SENTINEL[dtype], dtype=dtype)
    out = view(base)
    status = emulation.gather_rows(drivers["gather_rows"], indptr, indices, values, rows, segments, weights, n_cols,
                                   out)
    covered = torch.zeros(shape, dtype=torch.bool)
    view(covered)[...] = True
    assert bool((base[~covered] == SENTINEL[dtype]).all()), "the kernel wrote outside the output view"
    return status, out


def _assert_same(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual, expected), f"{what}: results differ"


# (n_rows, n_cols, what the geometry exercises): 256 threads a block, one block per output row,
# a float32 shared-memory tile of at most 12288 columns.
GATHER_GEOMETRIES = {
    "narrow": (23, 37, "fewer columns than threads"),
    "wide": (19, 300, "more columns than threads: two passes to zero, round and write the tile"),
    "one-tile": (7, 12288, "exactly one full shared-memory tile (48 KiB)"),
    "two-tiles": (7, 12288 + 45, "a full tile and a partial second one"),
}


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [np.int64, np.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("geometry", list(GATHER_GEOMETRIES))
def test_gather_rows_plain_matches_reference(drivers, dtype, index_dtype, geometry):
    n_rows, n_cols, why = GATHER_GEOMETRIES[geometry]
    density = 0.2 if n_cols < 1000 else 0.01
    indptr, indices, values = random_csr(n_rows, n_cols, density=density, seed=n_cols, index_dtype=index_dtype)
    rows = torch.tensor([0, 1, 5, 5, n_rows - 1, 3, 1, 2]) % n_rows  # repeats; rows 1 and 5 are empty
    for vals in (values, None):
        status, got = _gather(drivers, indptr, indices, vals, rows, None, None, n_cols, dtype)
        assert status == (0, 0, 0), status
        _assert_same(got, gather_truth(indptr, indices, vals, rows, None, None, n_cols, dtype),
                     f"{geometry} ({why}), values={'yes' if vals is not None else 'implicit'}")


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "unweighted"])
@pytest.mark.parametrize("geometry", ["narrow", "two-tiles"])
def test_gather_rows_segmented_matches_reference(drivers, dtype, with_weights, geometry):
    n_rows, n_cols, why = GATHER_GEOMETRIES[geometry]
    density = 0.2 if n_cols < 1000 else 0.01
    indptr, indices, values = random_csr(n_rows, n_cols, density=density, seed=2)
    rows, seg, weights = random_segments(n_rows, B=12 if n_cols < 1000 else 4, seed=3)
    weights = weights if with_weights else None
    assert (seg[1:] == seg[:-1]).any(), "the case must include empty segments"
    status, got = _gather(drivers, indptr, indices, values, rows, seg, weights, n_cols, dtype)
    assert status == (0, 0, 0), status
    _assert_same(got, gather_truth(indptr, indices, values, rows, seg, weights, n_cols, dtype), f"{geometry} ({why})")


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_gather_rows_duplicate_columns_add_up(drivers, dtype):
    """Repeated columns in one row: threads of the block add to one shared element (the atomic path)."""
    indptr, indices, values = random_csr(40, 64, density=0.5, seed=4, dup_cols=True)
    assert (indices[1:] == indices[:-1]).any()
    rows, seg, weights = random_segments(40, B=9, seed=5)
    status, got = _gather(drivers, indptr, indices, values, rows, seg, weights, 64, dtype)
    assert status == (0, 0, 0)
    _assert_same(got, gather_truth(indptr, indices, values, rows, seg, weights, 64, dtype), "duplicate columns")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["column-major", "gaps"])
def test_gather_rows_strided_out(drivers, dtype, layout):
    indptr, indices, values = random_csr(30, 300, seed=6)
    rows, seg, weights = random_segments(30, B=7, seed=7)
    status, got = _gather(drivers, indptr, indices, values, rows, seg, weights, 300, dtype, layout)
    assert status == (0, 0, 0)
    _assert_same(got, gather_truth(indptr, indices, values, rows, seg, weights, 300, dtype), layout)


def test_gather_rows_many_rows_span_several_validation_blocks(drivers):
    """100 gathered rows: 3200 validating threads in 13 blocks, one warp a row."""
    indptr, indices, values = random_csr(50, 40, seed=8)
    rows = torch.from_numpy(np.random.default_rng(9).integers(0, 50, size=100))
    status, got = _gather(drivers, indptr, indices, values, rows, None, None, 40, torch.float32)
    assert status == (0, 0, 0)
    _assert_same(got, gather_truth(indptr, indices, values, rows, None, None, 40, torch.float32), "100 rows")
    bad_rows = rows.clone()
    bad_rows[-1] = 50  # the last row, handled by the last validation block
    assert _gather(drivers, indptr, indices, values, bad_rows, None, None, 40, torch.float32)[0] == (0, 1, -1)


@pytest.mark.parametrize("case", [(0, 5, False), (0, 5, True), (3, 0, False), (0, 0, True)],
                         ids=["no-rows", "empty-segments-only", "no-columns", "nothing"])
def test_gather_rows_empty_shapes(drivers, case):
    n, n_cols, segmented = case
    indptr, indices, values = random_csr(6, n_cols, seed=10)
    rows = torch.arange(n, dtype=torch.int64) % 6
    seg = torch.zeros(4, dtype=torch.int64) if segmented else None
    if segmented and n:
        seg[-1] = n
    status, got = _gather(drivers, indptr, indices, values, rows, seg, None, n_cols, torch.float32)
    assert status == (0, 0, 0), status
    _assert_same(got, torch.zeros_like(got), "empty")


def _valid_case():
    indptr, indices, values = random_csr(10, 20, seed=12, empty_every=0)
    rows, seg, weights = random_segments(10, B=5, seed=13)
    return dict(indptr=indptr, indices=indices, values=values, rows=rows, segments=seg, weights=weights)


def _with(case, **changes):
    out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    for k, fn in changes.items():
        fn(out)
    return out


BAD = {
    "row-id-too-large": lambda c: c["rows"].__setitem__(2, 10),
    "row-id-negative": lambda c: c["rows"].__setitem__(0, -1),
    "indptr-decreasing": lambda c: c["indptr"].__setitem__(slice(3, 4), c["indptr"][2] - 1),
    "indptr-past-nnz": lambda c: c["indptr"].__setitem__(-1, c["indices"].shape[0] + 1),
    "column-too-large": lambda c: c["indices"].__setitem__(int(c["indptr"][int(c["rows"][0])]), 20),
    "column-negative": lambda c: c["indices"].__setitem__(int(c["indptr"][int(c["rows"][0])]), -3),
    "segments-start": lambda c: c["segments"].__setitem__(0, 1),
    "segments-end": lambda c: c["segments"].__setitem__(-1, c["rows"].shape[0] - 1),
    "segments-decreasing": lambda c: c["segments"].__setitem__(2, c["segments"][1] - 1),
}


@pytest.mark.parametrize("name", list(BAD))
def test_gather_rows_device_validation_flags_bad_input(drivers, name):
    """The validation kernel flags what the host checks name; the gather then does not run."""
    case = _valid_case()
    assert int(case["segments"][2]) > 0 or name != "segments-decreasing"
    bad = _with(case, mutate=BAD[name])
    if name == "indptr-decreasing":  # the row whose extent became invalid must be one that is gathered
        bad["rows"][0] = 2
    B = bad["segments"].shape[0] - 1
    out = torch.full((B, 20), SENTINEL[torch.float32])
    status = emulation.gather_rows(drivers["gather_rows"], bad["indptr"], bad["indices"], bad["values"], bad["rows"],
                                   bad["segments"], bad["weights"], 20, out)
    assert status == (0, 1, -1), f"{name}: status {status}"
    assert bool((out == SENTINEL[torch.float32]).all()), "nothing is written before the validation passed"
    good = emulation.gather_rows(drivers["gather_rows"], case["indptr"], case["indices"], case["values"],
                                 case["rows"], case["segments"], case["weights"], 20, out)
    assert good == (0, 0, 0)


def test_gather_rows_validation_reads_only_gathered_rows(drivers):
    """A bad column in a row that is not gathered is not looked at (as on every backend)."""
    indptr, indices, values = random_csr(10, 20, seed=14, empty_every=0)
    indices[int(indptr[7])] = 99  # row 7 is broken
    rows = torch.tensor([0, 1, 2, 3])
    status, got = _gather(drivers, indptr, indices, values, rows, None, None, 20, torch.float32)
    assert status == (0, 0, 0)
    _assert_same(got, gather_truth(indptr, indices, values, rows, None, None, 20, torch.float32), "unread bad row")


# --- target_rank ----------------------------------------------------------------------------------

TR_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (B, I, share of positives, what the geometry exercises): 256 threads a block, one block per row,
# 8 positives counted per pass over the row.
TR_GEOMETRIES = {
    "5x9": (5, 9, 0.25, "fewer items than threads"),
    "4x300": (4, 300, 0.01, "more items than threads: a second pass per thread, a partial one"),
    "3x700-chunks": (3, 700, 0.03, "about 21 positives a row: three passes of 8 (the last partial)"),
}


def _target_rank_emulated(drivers, case):
    return emulation.target_rank(drivers["target_rank"], *target_rank_args(**case))


@pytest.mark.parametrize("dtype", TR_DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(TR_GEOMETRIES))
def test_target_rank_matches_reference(drivers, dtype, geometry):
    B, I, p_pos, why = TR_GEOMETRIES[geometry]
    for with_users in (False, True):
        case = target_rank_case(B, I, seed=hash((geometry, str(dtype), with_users)) % 2**31, dtype=dtype,
                                with_users=with_users, p_pos=p_pos, p_excl=0.3 if I < 100 else 0.05,
                                continuous=I > 100)
        want = reference.target_rank(*target_rank_args(**case))
        _assert_same(_target_rank_emulated(drivers, case), want, f"{geometry} ({why}), users={with_users}")


def test_target_rank_strided_rows_and_no_exclusions(drivers):
    """Rows spread out in memory (the host glue passes the row stride), and no exclude argument."""
    case = target_rank_case(4, 40, seed=21, p_pos=0.2)
    big = torch.zeros(8, 40)
    big[::2] = case["scores"]
    case = {"scores": big[::2], "positives": case["positives"]}
    want = reference.target_rank(*target_rank_args(**case))
    _assert_same(_target_rank_emulated(drivers, case), want, "strided rows")


TR_EMU_BAD = [c for c in TARGET_RANK_BAD if c[0] in (
    "nan", "nan-in-excluded-item", "nan-in-row-without-positives", "nan-before-positives", "exclude-before-nan",
    "exclude-column-range", "exclude-negative-column", "exclude-unsorted", "positives-column-range",
    "positives-unsorted", "positives-duplicate", "users-range", "users-negative")] + [
    ("indptr-past-nnz", dict(scores=torch.zeros(2, 3), positives=(torch.tensor([0, 1, 2]), torch.tensor([0, 1])),
                             exclude=(torch.tensor([0, 1, 5]), torch.tensor([0, 2]))),
     ValueError, r"exclude row 1 \(scores row 1\) has an invalid indptr range"),
    ("positives-indptr-past-nnz", dict(scores=torch.zeros(2, 3), positives=(torch.tensor([0, 1, 5]),
                                                                             torch.tensor([0, 1]))),
     ValueError, r"positives row 1 \(scores row 1\) has an invalid indptr range"),
]


def _unchecked_args(scores, positives, exclude=None, users=None):
    """The registered op's arguments without the front end's checks (the kernel must make them)."""
    split = lambda c: (None, None) if c is None else (c[0].to(torch.int64), c[1].to(torch.int64))  # noqa: E731
    return (scores, None if users is None else users.to(torch.int64), *split(exclude), *split(positives))


@pytest.mark.parametrize("case", TR_EMU_BAD, ids=[c[0] for c in TR_EMU_BAD])
def test_target_rank_reports_bad_input(drivers, case):
    """The kernel's per-row report gives the error every other backend raises, first problem first."""
    _, kwargs, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        emulation.target_rank(drivers["target_rank"], *_unchecked_args(**kwargs))
