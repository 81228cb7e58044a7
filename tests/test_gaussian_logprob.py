"""gaussian_logprob: every backend against the float64 reference.

Inputs look like real reverse trajectories: step variances between 1e-7 and
1e-5 and traj[s+1] drawn from step s's Gaussian, so the residuals are 1e-4 to
1e-2 of the states, which is where float32 arithmetic loses digits.

Accuracy criterion for a backend working in a lower precision (after
flash-attention): its error against the float64 truth, in the 2-norm, is at
most twice the error of plain PyTorch (the reference) computing in that same
precision, plus a few units of rounding of the result.
"""

import math
import warnings

import pytest
import torch

import refit_kernels as rk
from refit_kernels import reference

from _testing import stable_seed, backend_params, describe_mismatch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 1, 1), (1, 3, 5), (4, 6, 37), (3, 2, 1100)]
MODES = [("sum", False), ("sum", True), ("mean", False), ("mean", True)]


def make_trajectory(S, B, I, dtype=torch.float32, seed=0, device="cpu",
                    var_range=(1e-7, 1e-5), coef_dtype=torch.float64):
    """A trajectory sampled from the model it is scored under.

    coef_pred, coef_x in (0, 1) like DiffRec's posterior mean coefficients;
    traj[0] a noisy binary interaction row; pred in (0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    log_var = torch.empty(S, dtype=f64).uniform_(math.log(var_range[0]), math.log(var_range[1]), generator=g)
    coef_pred = torch.empty(S, dtype=f64).uniform_(0.01, 1.0, generator=g)
    coef_x = torch.empty(S, dtype=f64).uniform_(0.0, 1.0, generator=g)
    pred = torch.rand(S, B, I, dtype=f64, generator=g)
    traj = torch.empty(S + 1, B, I, dtype=f64)
    traj[0] = (torch.rand(B, I, dtype=f64, generator=g) < 0.1).to(f64) + 0.01 * torch.randn(B, I, dtype=f64, generator=g)
    for s in range(S):
        mu = coef_pred[s] * pred[s] + coef_x[s] * traj[s]
        traj[s + 1] = mu + torch.exp(0.5 * log_var[s]) * torch.randn(B, I, dtype=f64, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    coefs = [c.to(device=device, dtype=coef_dtype) for c in (coef_pred, coef_x, log_var)]
    return cast(pred), cast(traj), *coefs


def truth_and_baseline(pred, traj, cp, cx, lv, reduction, per_step, grad_weights=None):
    """(truth, baseline) values and gradients: reference in float64 and in the inputs' precision."""
    out = []
    for p, t in ((pred.double(), traj.double()), (pred, traj)):
        p = p.detach().clone().requires_grad_(True)
        val = rk.gaussian_logprob(p, t, cp, cx, lv, reduction=reduction, per_step=per_step, backend="reference")
        w = torch.ones_like(val) if grad_weights is None else grad_weights.to(val)
        (val * w).sum().backward()
        out.append((val.detach(), p.grad))
    return out


def conditioning(pred, traj, cp, cx, lv, reduction, per_step, grad_weights=None):
    """Magnitudes that rounding errors scale with, for the value and the gradient.

    The residual r = traj[s+1] - coef_x*traj[s] - coef_pred*pred is a small
    difference of O(1) numbers, so even in float64 it carries an absolute
    error of eps * (|traj[s+1]| + |coef_x traj[s]| + |coef_pred pred|); r^2/v
    and coef_pred*r/v inherit it, amplified by 1/v.
    """
    p, t = pred.double().cpu(), traj.double().cpu()
    cp, cx, lv = cp.double().cpu(), cx.double().cpu(), lv.double().cpu()
    I = p.shape[-1]
    mag = t[1:].abs() + (cx[:, None, None] * t[:-1]).abs() + (cp[:, None, None] * p).abs()
    r = t[1:] - cx[:, None, None] * t[:-1] - cp[:, None, None] * p
    inv_v = torch.exp(-lv)[:, None, None]
    row = 0.5 * ((2 * r.abs() * mag + r * r) * inv_v).sum(-1) + 0.5 * I * (reference.LOG_2PI + lv).abs()[:, None]
    w = torch.ones(row.shape if per_step else row.shape[1:], dtype=torch.float64) if grad_weights is None else grad_weights.double().cpu()
    w = w.expand(row.shape)
    grad = w.abs()[..., None] * (cp.abs()[:, None, None] * inv_v) * mag
    if reduction == "mean" and I > 0:
        row, grad = row / I, grad / I
    return (row if per_step else row.sum(0)), grad


def assert_accurate(actual, truth, baseline, cond, what):
    """Error (2-norm) within twice the baseline's, plus rounding.

    Rounding allowed: 8 units of the working precision (float32, or float64
    for float64 inputs) on the conditioning, and 2 units of the result's own
    dtype on the result (a float16 gradient is stored in float16).
    """
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    work = torch.float64 if actual.dtype == torch.float64 else torch.float32
    err = (actual.double() - truth).norm().item()
    base = (baseline.double() - truth).norm().item()
    tol = (2.0 * base + 8.0 * torch.finfo(work).eps * cond.norm().item()
           + 2.0 * torch.finfo(actual.dtype).eps * truth.norm().item())
    assert err <= tol, (f"{what}: error {err:.3e} > tolerance {tol:.3e} (reference in the same "
                        f"precision: {base:.3e})\n{describe_mismatch(actual, truth)}")


def run(backend, pred, traj, cp, cx, lv, reduction, per_step, grad_weights=None):
    p = pred.detach().clone().requires_grad_(True)
    val = rk.gaussian_logprob(p, traj, cp, cx, lv, reduction=reduction, per_step=per_step, backend=backend)
    w = torch.ones_like(val) if grad_weights is None else grad_weights.to(val)
    (val * w).sum().backward()
    return val.detach(), p.grad


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction,per_step", MODES, ids=lambda m: str(m))
def test_matches_reference(bd, dtype, shape, reduction, per_step):
    backend, device = bd
    seed = stable_seed(shape, str(dtype), reduction, per_step)
    pred, traj, cp, cx, lv = make_trajectory(*shape, dtype=dtype, seed=seed, device=device)
    S, B, _ = shape
    # Unequal upstream gradients, so a backward that mixes up users or steps fails.
    gw = torch.randn((S, B) if per_step else (B,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gw = gw.to(device)
    val, grad = run(backend, pred, traj, cp, cx, lv, reduction, per_step, gw)
    (t_val, t_grad), (b_val, b_grad) = truth_and_baseline(pred, traj, cp, cx, lv, reduction, per_step, gw)
    c_val, c_grad = conditioning(pred, traj, cp, cx, lv, reduction, per_step, gw)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert val.dtype == out_dtype
    assert grad.dtype == dtype and grad.shape == pred.shape
    assert_accurate(val.cpu(), t_val.cpu(), b_val.cpu(), c_val, f"{backend} value")
    assert_accurate(grad.cpu(), t_grad.cpu(), b_grad.cpu(), c_grad, f"{backend} gradient")


@pytest.mark.parametrize("bd", backend_params())
def test_coefficients_in_float32(bd):
    backend, device = bd
    pred, traj, cp, cx, lv = make_trajectory(3, 4, 20, seed=1, device=device, coef_dtype=torch.float32)
    val, grad = run(backend, pred, traj, cp, cx, lv, "sum", False)
    (t_val, t_grad), (b_val, b_grad) = truth_and_baseline(pred, traj, cp, cx, lv, "sum", False)
    c_val, c_grad = conditioning(pred, traj, cp, cx, lv, "sum", False)
    assert_accurate(val.cpu(), t_val.cpu(), b_val.cpu(), c_val, "value")
    assert_accurate(grad.cpu(), t_grad.cpu(), b_grad.cpu(), c_grad, "gradient")


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("layout", ["strided-users", "permuted", "strided-items"])
def test_non_contiguous(bd, layout):
    backend, device = bd
    S, B, I = 3, 5, 33
    pred, traj, cp, cx, lv = make_trajectory(S, B, I, seed=7, device=device)
    if layout == "strided-users":  # rows of a bigger batch
        big_p = torch.zeros(S, 2 * B, I, device=device)
        big_t = torch.zeros(S + 1, 2 * B, I, device=device)
        big_p[:, ::2] = pred
        big_t[:, ::2] = traj
        p_nc, t_nc = big_p[:, ::2], big_t[:, ::2]
    elif layout == "permuted":  # stored user-major
        p_nc = pred.permute(1, 0, 2).contiguous().permute(1, 0, 2)
        t_nc = traj.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    else:  # every other item of a wider tensor
        big_p = torch.zeros(S, B, 2 * I, device=device)
        big_t = torch.zeros(S + 1, B, 2 * I, device=device)
        big_p[..., ::2] = pred
        big_t[..., ::2] = traj
        p_nc, t_nc = big_p[..., ::2], big_t[..., ::2]
    assert not p_nc.is_contiguous() and not t_nc.is_contiguous()
    val, grad = run(backend, p_nc, t_nc, cp, cx, lv, "sum", True)
    (t_val, t_grad), (b_val, b_grad) = truth_and_baseline(pred, traj, cp, cx, lv, "sum", True)
    c_val, c_grad = conditioning(pred, traj, cp, cx, lv, "sum", True)
    assert_accurate(val.cpu(), t_val.cpu(), b_val.cpu(), c_val, "value")
    assert_accurate(grad.cpu(), t_grad.cpu(), b_grad.cpu(), c_grad, "gradient")


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=str)
def test_empty_dimensions(bd, shape):
    backend, device = bd
    pred, traj, cp, cx, lv = make_trajectory(*shape, device=device)
    for per_step in (False, True):
        val, grad = run(backend, pred, traj, cp, cx, lv, "sum", per_step)
        S, B, _ = shape
        assert val.shape == ((S, B) if per_step else (B,))
        # An empty sum is zero: no steps or no items leave nothing to score.
        assert torch.equal(val, torch.zeros_like(val))
        assert grad.shape == pred.shape


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction,per_step", MODES, ids=str)
def test_gradcheck_float64(backend, reduction, per_step):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    # Variances of 1e-3..1e-2 keep the finite differences of gradcheck well
    # conditioned; the tiny-variance regime is covered by the tests above.
    pred, traj, cp, cx, lv = make_trajectory(3, 4, 6, dtype=torch.float64, seed=3, var_range=(1e-3, 1e-2))
    pred.requires_grad_(True)
    fn = lambda p: rk.gaussian_logprob(p, traj, cp, cx, lv, reduction=reduction, per_step=per_step, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred,))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("reduction,per_step", MODES, ids=str)
def test_gradgradcheck_float64(backend, reduction, per_step):
    """Double backward is implemented on every backend (it used to return None on cpu, with a warning)."""
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    shape = (2, 2, 3) if backend == "triton" else (3, 4, 6)  # the Triton interpreter is slow
    pred, traj, cp, cx, lv = make_trajectory(*shape, dtype=torch.float64, seed=4, var_range=(1e-3, 1e-2))
    pred.requires_grad_(True)
    fn = lambda p: rk.gaussian_logprob(p, traj, cp, cx, lv, reduction=reduction, per_step=per_step, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (pred,))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction,per_step", MODES, ids=str)
def test_double_backward_matches_the_reference(backend, dtype, reduction, per_step):
    """The gradient of a function of the gradient, as autograd gives it through the reference; no warning."""
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    pred, traj, cp, cx, lv = make_trajectory(2, 3, 5, dtype=dtype, seed=6, var_range=(1e-3, 1e-2))
    g = torch.Generator().manual_seed(7)
    results = []
    for b in (backend, "reference"):
        p = pred.detach().clone().requires_grad_(True)
        val = rk.gaussian_logprob(p, traj, cp, cx, lv, reduction=reduction, per_step=per_step, backend=b)
        w = torch.randn(val.shape, generator=torch.Generator().manual_seed(1), dtype=val.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "autograd kernel was not registered"
            (grad,) = torch.autograd.grad((val * w).sum(), p, create_graph=True)
            assert grad.requires_grad, f"{b}: the gradient is not differentiable"
            v = torch.randn(grad.shape, generator=g.manual_seed(2), dtype=torch.float64).to(dtype)
            (gg,) = torch.autograd.grad((grad * grad * v).sum(), p)
        assert gg is not None and gg.dtype == dtype
        results.append(gg.double())
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(results[0], results[1], rtol=tol, atol=tol * results[1].abs().max().item())


def test_double_backward_through_the_gradient_weights():
    """d/dg of the backward op, i.e. of <grad_pred, v> with respect to the output's weights."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    pred, traj, cp, cx, lv = make_trajectory(2, 3, 4, dtype=torch.float64, seed=8, var_range=(1e-3, 1e-2))
    for per_step in (False, True):
        grad = torch.randn((2, 3) if per_step else (3,), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        bwd = lambda gr, p: torch.ops.refit.gaussian_logprob_backward(gr, p, traj, cp, cx, lv, True, per_step)  # noqa: E731
        assert torch.autograd.gradcheck(bwd, (grad, pred.clone().requires_grad_(True)))
        assert torch.autograd.gradgradcheck(bwd, (grad, pred.clone().requires_grad_(True)))
        torch.library.opcheck(torch.ops.refit.gaussian_logprob_backward.default,
                              (grad, pred.clone().requires_grad_(True), traj, cp, cx, lv, True, per_step))


def test_cpu_threads_give_identical_results(monkeypatch):
    # Tasks of a thousandth of the usual work, so this small input takes the threaded path (a region
    # runs on one thread below about 1 ms of work; see csrc/cpu/common.h).
    monkeypatch.setenv("REFIT_CPU_GRAIN_SCALE", "0.001")
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    pred, traj, cp, cx, lv = make_trajectory(6, 40, 700, seed=11)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rk.gaussian_logprob(pred, traj, cp, cx, lv, backend="cpu")
        torch.set_num_threads(max(2, old))
        many = rk.gaussian_logprob(pred, traj, cp, cx, lv, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


def test_traj_and_constants_get_no_gradient():
    pred, traj, cp, cx, lv = make_trajectory(2, 3, 4)
    traj.requires_grad_(True)
    for backend in ("reference", "cpu"):
        if rk.available_backends()[backend] is not None:
            continue
        p = pred.clone().requires_grad_(True)
        rk.gaussian_logprob(p, traj, cp, cx, lv, backend=backend).sum().backward()
        assert p.grad is not None and traj.grad is None


def test_result_is_the_log_density():
    """Independent check of the contract: the sum of torch.distributions log-densities."""
    pred, traj, cp, cx, lv = make_trajectory(3, 2, 7, dtype=torch.float64, seed=5)
    want = torch.zeros(2, dtype=torch.float64)
    for s in range(3):
        mu = cp[s] * pred[s] + cx[s] * traj[s]
        dist = torch.distributions.Normal(mu, torch.exp(0.5 * lv[s]))
        want += dist.log_prob(traj[s + 1]).sum(-1)
    for backend in ("reference", "cpu"):
        if rk.available_backends()[backend] is None:
            got = rk.gaussian_logprob(pred, traj, cp, cx, lv, backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


# --- bad input ---------------------------------------------------------------

def _bad_cases():
    pred, traj, cp, cx, lv = make_trajectory(2, 3, 4)
    meta_lv = lv.to("meta")
    return [
        ("pred-not-tensor", (pred.tolist(), traj, cp, cx, lv), TypeError, "pred"),
        ("int-pred", (pred.long(), traj.long(), cp, cx, lv), TypeError, "pred"),
        ("int-traj", (pred, traj.int(), cp, cx, lv), TypeError, "traj"),
        ("dtype-mismatch", (pred, traj.double(), cp, cx, lv), TypeError, "traj"),
        ("pred-2d", (pred[0], traj, cp, cx, lv), ValueError, "pred"),
        ("traj-not-S+1", (pred, traj[:-1], cp, cx, lv), ValueError, "traj"),
        ("traj-wrong-B", (pred, traj[:, :2], cp, cx, lv), ValueError, "traj"),
        ("traj-wrong-I", (pred, traj[..., :3], cp, cx, lv), ValueError, "traj"),
        ("coef_pred-length", (pred, traj, cp[:1], cx, lv), ValueError, "coef_pred"),
        ("coef_x-2d", (pred, traj, cp, cx[None], lv), ValueError, "coef_x"),
        ("log_var-length", (pred, traj, cp, cx, torch.cat([lv, lv])), ValueError, "log_var"),
        ("int-coef", (pred, traj, cp.long(), cx, lv), TypeError, "coef_pred"),
        ("half-coef", (pred, traj, cp, cx.half(), lv), TypeError, "coef_x"),
        ("other-device", (pred, traj, cp, cx, meta_lv), ValueError, "log_var"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("backend", list(rk.BACKENDS))
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(backend, case):
    _, args, exc, name = case
    with pytest.raises(exc, match=name):
        rk.gaussian_logprob(*args, backend=backend)


@pytest.mark.parametrize("op_name", ["gaussian_logprob", "gaussian_logprob_triton"])
@pytest.mark.parametrize("case", [c for c in BAD if c[0] != "pred-not-tensor"], ids=[c[0] for c in BAD if c[0] != "pred-not-tensor"])
def test_ops_check_their_arguments(op_name, case):
    """The registered ops check too, so calling them directly is as safe as the API."""
    if op_name == "gaussian_logprob" and rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    _, args, exc, name = case
    op = getattr(torch.ops.refit, op_name)
    with pytest.raises(exc, match=name):
        op(*args, False, False)


def _api_only_bad_cases():
    """Bad input the public function refuses before any backend runs (the registered ops take meta tensors)."""
    pred, traj, cp, cx, lv = make_trajectory(2, 3, 4)
    meta = torch.device("meta")
    return [
        ("meta-pred", (pred.to(meta), traj.to(meta), cp.to(meta), cx.to(meta), lv.to(meta)), ValueError,
         "pred is a meta tensor"),
        ("meta-traj", (pred, traj.to(meta), cp, cx, lv), ValueError, "traj is a meta tensor"),
        ("sparse-pred", (pred.to_sparse(), traj, cp, cx, lv), TypeError, "pred must be a dense"),
        ("sparse-csr-traj", (pred, traj.to_sparse_csr(dense_dim=1), cp, cx, lv), TypeError, "traj must be a dense"),
        ("sparse-coef", (pred, traj, cp.to_sparse(), cx, lv), TypeError, "coef_pred must be a dense"),
        ("complex-pred", (pred.to(torch.complex64), traj.to(torch.complex64), cp, cx, lv), TypeError, "pred"),
        ("complex-log-var", (pred, traj, cp, cx, lv.to(torch.complex128)), TypeError, "log_var"),
    ]


API_BAD = _api_only_bad_cases()


@pytest.mark.parametrize("backend", list(rk.BACKENDS))
@pytest.mark.parametrize("case", API_BAD, ids=[c[0] for c in API_BAD])
def test_bad_layouts_and_meta_tensors_name_the_argument(backend, case):
    _, args, exc, name = case
    with pytest.raises(exc, match=name):
        rk.gaussian_logprob(*args, backend=backend)


def test_bad_options():
    pred, traj, cp, cx, lv = make_trajectory(2, 3, 4)
    with pytest.raises(ValueError, match="reduction"):
        rk.gaussian_logprob(pred, traj, cp, cx, lv, reduction="max")
    with pytest.raises(TypeError, match="per_step"):
        rk.gaussian_logprob(pred, traj, cp, cx, lv, per_step="yes")
    with pytest.raises(ValueError, match="backend"):
        rk.gaussian_logprob(pred, traj, cp, cx, lv, backend="fortran")
    p0, t0, cp0, cx0, lv0 = make_trajectory(2, 3, 0)
    with pytest.raises(ValueError, match="at least one item"):
        rk.gaussian_logprob(p0, t0, cp0, cx0, lv0, reduction="mean")


# --- torch.library integration -------------------------------------------------

@pytest.mark.parametrize("op_name", ["gaussian_logprob", "gaussian_logprob_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction,per_step", MODES, ids=str)
def test_opcheck(op_name, dtype, reduction, per_step):
    backend = "cpu" if op_name == "gaussian_logprob" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    pred, traj, cp, cx, lv = make_trajectory(2, 3, 9, dtype=dtype, seed=2)
    mean = reduction == "mean"
    op = getattr(torch.ops.refit, op_name).default
    torch.library.opcheck(op, (pred.requires_grad_(True), traj, cp, cx, lv, mean, per_step))
    grad = torch.randn((2, 3) if per_step else (3,), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    bwd = getattr(torch.ops.refit, op_name.replace("gaussian_logprob", "gaussian_logprob_backward")).default
    torch.library.opcheck(bwd, (grad, pred.detach(), traj, cp, cx, lv, mean, per_step))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_torch_compile_fullgraph(backend):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    pred, traj, cp, cx, lv = make_trajectory(3, 4, 16, seed=9)
    adv = torch.randn(4, generator=torch.Generator().manual_seed(0))

    def reinforce_loss(p, t):
        return -(adv * rk.gaussian_logprob(p, t, cp, cx, lv, reduction="mean", backend=backend)).mean()

    compiled = torch.compile(reinforce_loss, fullgraph=True)
    p_eager = pred.clone().requires_grad_(True)
    p_comp = pred.clone().requires_grad_(True)
    eager = reinforce_loss(p_eager, traj)
    eager.backward()
    got = compiled(p_comp, traj)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(p_comp.grad, p_eager.grad)


# --- property-based: any shape, any layout of the batch ----------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(S=st.integers(1, 5), B=st.integers(1, 6), I=st.integers(1, 70), stride=st.integers(1, 3),
       mean=st.booleans(), per_step=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference_on_any_shape(S, B, I, stride, mean, per_step, seed):
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    pred, traj, cp, cx, lv = make_trajectory(S, B * stride, I, dtype=torch.float64, seed=seed)
    pred, traj = pred[:, ::stride], traj[:, ::stride]  # users spread out in memory
    reduction = "mean" if mean else "sum"
    got, got_grad = run("cpu", pred, traj, cp, cx, lv, reduction, per_step)
    (want, want_grad), _ = truth_and_baseline(pred, traj, cp, cx, lv, reduction, per_step)
    c_val, c_grad = conditioning(pred, traj, cp, cx, lv, reduction, per_step)
    assert_accurate(got, want, want, c_val, "value")
    assert_accurate(got_grad, want_grad, want_grad, c_grad, "gradient")
