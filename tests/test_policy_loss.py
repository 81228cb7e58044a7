"""policy_loss: every backend against autograd through the float64 reference.

The inputs are test_gaussian_logprob's sampled trajectories. For PPO the old
log-likelihoods are the float64 truth moved by +-0.05 (inside the clip range
of 0.2) or +-0.5 (outside it), so every case holds rows of each regime, with
advantages of both signs, and no row lies within rounding of a clip edge.

Accuracy criterion: test_gaussian_logprob's (twice the error of the reference
computed in the inputs' precision, plus rounding on the conditioning), with
each row's conditioning weighted by the loss's derivative with respect to the
row's log-likelihood.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import refit_kernels as rk
from refit_kernels import reference

from _testing import stable_seed, backend_params
from test_gaussian_logprob import assert_accurate, conditioning, make_trajectory

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 1, 1), (2, 6, 37), (3, 2, 1100)]
CLIP = 0.2


def case(S, B, I, dtype=torch.float32, seed=0, device="cpu", ppo=False, reduction="sum"):
    """(pred, traj, cp, cx, lv, adv, old): a trajectory, mixed-sign advantages, and PPO's old terms."""
    pred, traj, cp, cx, lv = make_trajectory(S, B, I, dtype=dtype, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    old = None
    if ppo:
        truth = reference.gaussian_logprob(pred.double(), traj.double(), cp, cx, lv, reduction == "mean", True)
        shift = torch.tensor([-0.5, -0.05, 0.05, 0.5], dtype=torch.float64)
        old = truth.cpu() + shift[torch.randint(0, 4, truth.shape, generator=g)]
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return pred, traj, cp, cx, lv, to(adv), to(old)


def run(backend, pred, traj, cp, cx, lv, adv, old, reduction="sum", upstream=1.0, **kw):
    p = pred.detach().clone().requires_grad_(True)
    loss, logprob = rk.policy_loss(p, traj, cp, cx, lv, adv, old_logprob=old, clip=CLIP, reduction=reduction,
                                   backend=backend, **kw)
    (loss * upstream).backward()
    return loss.detach(), logprob, p.grad


def truth_and_baseline(pred, traj, cp, cx, lv, adv, old, reduction):
    """((loss, logprob, grad) in float64, the same from the reference in the inputs' precision)."""
    out = []
    for p, t in ((pred.double(), traj.double()), (pred, traj)):
        p = p.detach().clone().requires_grad_(True)
        loss, logprob = rk.policy_loss(p, t, cp, cx, lv, adv, old_logprob=old, clip=CLIP, reduction=reduction,
                                       backend="reference")
        loss.backward()
        out.append((loss.detach(), logprob, p.grad))
    return out


def term_weights(logprob, adv, old, normalizer):
    """|d loss / d L[s, b]| at the truth: what each row's rounding error is multiplied by."""
    a = adv.double().cpu()
    if old is None:
        return (a.abs() / normalizer).expand(logprob.shape)
    rho = torch.exp(logprob.double().cpu() - old.double().cpu())
    return a.abs() * rho / normalizer


def check(got, truth, base, pred, traj, cp, cx, lv, adv, old, reduction, what):
    loss, logprob, grad = got
    (t_loss, t_lp, t_grad), (b_loss, b_lp, b_grad) = truth, base
    S, B, _ = pred.shape
    n = max(1, B if old is None else S * B)
    w = term_weights(t_lp, adv, old, n)
    c_row, c_grad = conditioning(pred, traj, cp, cx, lv, reduction, True, w)
    if old is not None:  # PPO: the ratio exp(L - old) carries the rounding of L into every entry of its row
        c_grad = c_grad + t_grad.double().cpu().abs() * c_row[..., None]
    out_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    assert loss.dtype == logprob.dtype == out_dtype and loss.shape == ()
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert_accurate(loss.cpu().reshape(1), t_loss.cpu().reshape(1), b_loss.cpu().reshape(1),
                    (w * c_row).sum().reshape(1), f"{what} loss")
    assert_accurate(logprob.cpu(), t_lp.cpu(), b_lp.cpu(), c_row, f"{what} logprob")
    assert_accurate(grad.cpu(), t_grad.cpu(), b_grad.cpu(), c_grad, f"{what} gradient")


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ppo", [False, True], ids=["reinforce", "ppo"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_reference(bd, dtype, shape, ppo, reduction):
    backend, device = bd
    seed = stable_seed(shape, str(dtype), ppo, reduction)
    args = case(*shape, dtype=dtype, seed=seed, device=device, ppo=ppo, reduction=reduction)
    got = run(backend, *args, reduction=reduction)
    truth, base = truth_and_baseline(*args, reduction)
    check(got, truth, base, *args, reduction, backend)


@pytest.mark.parametrize("bd", backend_params())
def test_is_autograd_through_gaussian_logprob(bd):
    """The contract, written out with the public gaussian_logprob: REINFORCE's and PPO's surrogates."""
    backend, device = bd
    pred, traj, cp, cx, lv, adv, old = case(3, 5, 40, dtype=torch.float64, seed=3, device=device, ppo=True)
    for old_lp in (None, old):
        p = pred.clone().requires_grad_(True)
        L = rk.gaussian_logprob(p, traj, cp, cx, lv, per_step=True, backend="reference")
        if old_lp is None:
            want = -(adv * L.sum(0)).mean()
        else:
            ratio = torch.exp(L - old_lp)
            want = -torch.minimum(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv).mean()
        (want_grad,) = torch.autograd.grad(want, p)
        got, got_lp, got_grad = run(backend, pred, traj, cp, cx, lv, adv, old_lp)
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_lp, L.detach(), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bd", backend_params())
def test_ppo_gradient_follows_the_clip(bd):
    """A row's gradient vanishes exactly where PPO clips it: ratio above 1 + clip with a positive
    advantage, below 1 - clip with a negative one; elsewhere it is a * rho times the row's."""
    backend, device = bd
    S, B, I = 4, 4, 30
    pred, traj, cp, cx, lv = make_trajectory(S, B, I, dtype=torch.float64, seed=8, device=device)
    L = reference.gaussian_logprob(pred, traj, cp, cx, lv, False, True)
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.float64, device=device)
    shift = torch.tensor([0.5, -0.5, 0.05, -0.05], dtype=torch.float64, device=device)  # log rho per step
    old = L - shift[:, None]
    _, _, grad = run(backend, pred, traj, cp, cx, lv, adv, old)
    rho = torch.exp(shift)
    dead = ((rho > 1 + CLIP)[:, None] & (adv > 0)[None]) | ((rho < 1 - CLIP)[:, None] & (adv < 0)[None])
    assert dead.any() and (~dead).any()
    row_norm = grad.abs().sum(-1)
    assert bool((row_norm[dead] == 0).all()) and bool((row_norm[~dead] > 0).all())
    p = pred.clone().requires_grad_(True)
    (g_step,) = torch.autograd.grad(reference.gaussian_logprob(p, traj, cp, cx, lv, False, True).sum(), p)
    want = (-(adv[None] * rho[:, None]) / (S * B) * (~dead))[..., None] * g_step
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("layout", ["strided-users", "permuted", "strided-items"])
def test_non_contiguous(bd, layout):
    backend, device = bd
    pred, traj, cp, cx, lv, adv, old = case(3, 8, 24, seed=4, device=device, ppo=True)
    if layout == "strided-users":
        pred, traj, adv, old = pred[:, ::2], traj[:, ::2], adv[::2], old[:, ::2]
    elif layout == "permuted":  # (B, S, I) storage viewed as (S, B, I)
        pred = pred.transpose(0, 1).contiguous().transpose(0, 1)
        traj = traj.transpose(0, 1).contiguous().transpose(0, 1)
        old = old.t().contiguous().t()
    else:
        pred, traj = pred[..., ::2], traj[..., ::2]
    assert not pred.is_contiguous()
    for old_lp in (None, old):
        got = run(backend, pred, traj, cp, cx, lv, adv, old_lp)
        truth, base = truth_and_baseline(pred, traj, cp, cx, lv, adv, old_lp, "sum")
        check(got, truth, base, pred, traj, cp, cx, lv, adv, old_lp, "sum", f"{backend} {layout}")


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)], ids=str)
@pytest.mark.parametrize("ppo", [False, True], ids=["reinforce", "ppo"])
def test_empty_dimensions(bd, shape, ppo):
    backend, device = bd
    S, B, I = shape
    pred, traj, cp, cx, lv = make_trajectory(*shape, device=device)
    adv = torch.randn(B, dtype=torch.float64).to(device)
    old = torch.zeros(S, B, dtype=torch.float64, device=device) if ppo else None
    loss, logprob, grad = run(backend, pred, traj, cp, cx, lv, adv, old)
    w_loss, w_lp = reference.policy_loss(pred, traj, cp, cx, lv, adv, old, CLIP, False,
                                         float(max(1, B if old is None else S * B)))
    assert logprob.shape == (S, B) and grad.shape == shape
    torch.testing.assert_close(loss, w_loss)
    torch.testing.assert_close(logprob, w_lp)
    assert bool((grad == 0).all())


@pytest.mark.parametrize("bd", backend_params())
def test_upstream_gradient_scales_the_result(bd):
    """A loss that is not the last one (scaled, or one term of a sum) still gets the right gradient."""
    backend, device = bd
    args = case(2, 3, 17, dtype=torch.float64, seed=6, device=device, ppo=True)
    _, _, g1 = run(backend, *args)
    _, _, g3 = run(backend, *args, upstream=-2.5)
    torch.testing.assert_close(g3, -2.5 * g1, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("ppo", [False, True], ids=["reinforce", "ppo"])
def test_gradcheck_and_gradgradcheck_float64(backend, ppo):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    pred, traj, cp, cx, lv, adv, old = case(2, 3, 5, dtype=torch.float64, seed=7, ppo=ppo)
    # Unit variances keep finite differences meaningful (1e-7 variances make the loss ~1e7).
    lv = torch.zeros_like(lv)
    if ppo:
        L = reference.gaussian_logprob(pred, traj, cp, cx, lv, False, True)
        old = L - torch.tensor([[0.5, -0.05, 0.05], [-0.5, 0.5, 0.05]], dtype=torch.float64)

    def f(p):
        return rk.policy_loss(p, traj, cp, cx, lv, adv, old_logprob=old, clip=CLIP, backend=backend).loss

    p = pred.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (p,), eps=1e-6, atol=1e-7)


def test_cpu_threads_give_identical_results():
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    args = case(6, 64, 900, seed=10, ppo=True)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run("cpu", *args))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_only_pred_gets_a_gradient():
    pred, traj, cp, cx, lv, adv, old = case(2, 3, 6, dtype=torch.float64, seed=11, ppo=True)
    for backend in ("reference", "cpu"):
        if rk.available_backends()[backend] is not None:
            continue
        p, t = pred.clone().requires_grad_(True), traj.clone().requires_grad_(True)
        a, o = adv.clone().requires_grad_(True), old.clone().requires_grad_(True)
        loss, logprob = rk.policy_loss(p, t, cp, cx, lv, a, old_logprob=o, backend=backend)
        assert not logprob.requires_grad
        loss.backward()
        assert p.grad is not None and t.grad is None and a.grad is None and o.grad is None


def test_default_normalizers():
    """The batch mean for REINFORCE, the mean over steps and trajectories for PPO."""
    pred, traj, cp, cx, lv, adv, old = case(3, 4, 8, dtype=torch.float64, seed=12, ppo=True)
    for old_lp, n in ((None, 4.0), (old, 12.0)):
        got = rk.policy_loss(pred, traj, cp, cx, lv, adv, old_logprob=old_lp, backend="reference").loss
        want = rk.policy_loss(pred, traj, cp, cx, lv, adv, old_logprob=old_lp, normalizer=n,
                              backend="reference").loss
        half = rk.policy_loss(pred, traj, cp, cx, lv, adv, old_logprob=old_lp, normalizer=2 * n,
                              backend="reference").loss
        assert float(got) == float(want)
        torch.testing.assert_close(half, got / 2, rtol=1e-15, atol=0)


# --- bad input ---------------------------------------------------------------

def _bad_cases():
    pred, traj, cp, cx, lv, adv, old = case(2, 3, 4, ppo=True)
    meta = torch.device("meta")
    glp = [
        ("pred-not-tensor", dict(pred=pred.tolist()), TypeError, "pred"),
        ("int-pred", dict(pred=pred.long(), traj=traj.long()), TypeError, "pred"),
        ("dtype-mismatch", dict(traj=traj.double()), TypeError, "traj"),
        ("traj-not-S+1", dict(traj=traj[:-1]), ValueError, "traj"),
        ("coef_x-2d", dict(cx=cx[None]), ValueError, "coef_x"),
        ("half-log-var", dict(lv=lv.half()), TypeError, "log_var"),
    ]
    own = [
        ("adv-not-tensor", dict(adv=adv.tolist()), TypeError, "advantages"),
        ("adv-int", dict(adv=adv.long()), TypeError, "advantages"),
        ("adv-half", dict(adv=adv.half()), TypeError, "advantages"),
        ("adv-wrong-B", dict(adv=adv[:2]), ValueError, "advantages"),
        ("adv-2d", dict(adv=adv[None]), ValueError, "advantages"),
        ("adv-other-device", dict(adv=adv.to(meta)), ValueError, "advantages"),
        ("old-not-tensor", dict(old=old.tolist()), TypeError, "old_logprob"),
        ("old-int", dict(old=old.long()), TypeError, "old_logprob"),
        ("old-per-trajectory", dict(old=old[0]), ValueError, "old_logprob"),
        ("old-transposed", dict(old=old.t()), ValueError, "old_logprob"),
        ("old-other-device", dict(old=old.to(meta)), ValueError, "old_logprob"),
        ("clip-zero", dict(clip=0.0), ValueError, "clip"),
        ("clip-negative", dict(clip=-0.2), ValueError, "clip"),
        ("clip-nan", dict(clip=math.nan), ValueError, "clip"),
        ("clip-inf", dict(clip=math.inf), ValueError, "clip"),
        ("clip-string", dict(clip="0.2"), ValueError, "clip"),
        ("normalizer-zero", dict(normalizer=0.0), ValueError, "normalizer"),
        ("normalizer-negative", dict(normalizer=-3.0), ValueError, "normalizer"),
        ("normalizer-nan", dict(normalizer=math.nan), ValueError, "normalizer"),
        ("normalizer-bool", dict(normalizer=True), ValueError, "normalizer"),
    ]
    base = dict(pred=pred, traj=traj, cp=cp, cx=cx, lv=lv, adv=adv, old=old, clip=CLIP, normalizer=6.0)
    return [(name, {**base, **change}, exc, arg) for name, change, exc, arg in glp + own]


BAD = _bad_cases()


def _call(backend, a):
    return rk.policy_loss(a["pred"], a["traj"], a["cp"], a["cx"], a["lv"], a["adv"], old_logprob=a["old"],
                          clip=a["clip"], normalizer=a["normalizer"], backend=backend)


@pytest.mark.parametrize("backend", list(rk.BACKENDS))
@pytest.mark.parametrize("case_", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(backend, case_):
    _, a, exc, name = case_
    with pytest.raises(exc, match=f"policy_loss: {name}"):
        _call(backend, a)


_OP_BAD = [c for c in BAD if not c[0].endswith("not-tensor") and c[0] not in ("clip-string", "normalizer-bool")]


@pytest.mark.parametrize("op_name", ["policy_loss", "policy_loss_triton"])
@pytest.mark.parametrize("case_", _OP_BAD, ids=[c[0] for c in _OP_BAD])
def test_ops_check_their_arguments(op_name, case_):
    """The registered ops check too, so calling them directly is as safe as the API."""
    if op_name == "policy_loss" and rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    _, a, exc, name = case_
    op = getattr(torch.ops.refit, op_name)
    with pytest.raises(exc, match=f"policy_loss: {name}"):
        op(a["pred"], a["traj"], a["cp"], a["cx"], a["lv"], a["adv"], a["old"], a["clip"], False, a["normalizer"])


def test_bad_options_and_layouts():
    pred, traj, cp, cx, lv, adv, old = case(2, 3, 4, ppo=True)
    with pytest.raises(ValueError, match="reduction"):
        rk.policy_loss(pred, traj, cp, cx, lv, adv, reduction="max")
    with pytest.raises(ValueError, match="backend"):
        rk.policy_loss(pred, traj, cp, cx, lv, adv, backend="fortran")
    with pytest.raises(TypeError, match="advantages must be a dense"):
        rk.policy_loss(pred, traj, cp, cx, lv, adv.to_sparse())
    with pytest.raises(ValueError, match="old_logprob is a meta tensor"):
        rk.policy_loss(pred, traj, cp, cx, lv, adv, old_logprob=old.to("meta"))
    p0, t0, cp0, cx0, lv0 = make_trajectory(2, 3, 0)
    with pytest.raises(ValueError, match="at least one item"):
        rk.policy_loss(p0, t0, cp0, cx0, lv0, adv, reduction="mean")


# --- torch.library integration -------------------------------------------------

@pytest.mark.parametrize("op_name", ["policy_loss", "policy_loss_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("ppo", [False, True], ids=["reinforce", "ppo"])
def test_opcheck(op_name, dtype, ppo):
    backend = "cpu" if op_name == "policy_loss" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    pred, traj, cp, cx, lv, adv, old = case(2, 3, 9, dtype=dtype, seed=2, ppo=ppo)
    op = getattr(torch.ops.refit, op_name).default
    torch.library.opcheck(op, (pred.requires_grad_(True), traj, cp, cx, lv, adv, old, CLIP, False, 6.0))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_torch_compile_fullgraph(backend):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    pred, traj, cp, cx, lv, adv, old = case(3, 4, 16, seed=9, ppo=True)

    def loss_fn(p, t):
        return rk.policy_loss(p, t, cp, cx, lv, adv, old_logprob=old, reduction="mean", backend=backend).loss

    compiled = torch.compile(loss_fn, fullgraph=True)
    p_eager = pred.clone().requires_grad_(True)
    p_comp = pred.clone().requires_grad_(True)
    eager = loss_fn(p_eager, traj)
    eager.backward()
    got = compiled(p_comp, traj)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(p_comp.grad, p_eager.grad)


# --- property-based: any shape, layout and regime ---------------------------------

@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(S=st.integers(1, 4), B=st.integers(1, 6), I=st.integers(1, 70), stride=st.integers(1, 3),
       ppo=st.booleans(), mean=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference_on_any_shape(S, B, I, stride, ppo, mean, seed):
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    reduction = "mean" if mean else "sum"
    pred, traj, cp, cx, lv, adv, old = case(S, B * stride, I, dtype=torch.float64, seed=seed, ppo=ppo,
                                            reduction=reduction)
    pred, traj, adv = pred[:, ::stride], traj[:, ::stride], adv[::stride]
    old = None if old is None else old[:, ::stride]
    got = run("cpu", pred, traj, cp, cx, lv, adv, old, reduction)
    truth, _ = truth_and_baseline(pred, traj, cp, cx, lv, adv, old, reduction)
    check(got, truth, truth, pred, traj, cp, cx, lv, adv, old, reduction, "cpu")
