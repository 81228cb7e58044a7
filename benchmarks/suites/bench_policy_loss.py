"""policy_loss: the fused policy-gradient loss and its gradient against the two-op path.

Shapes (S, B, I): DiffRec's ReFiT setting on ML-1M (40, 400, 2810), a GRPO
batch of 1,024 trajectories over 20 exploring steps (20, 1024, 2810), and
DreamRec's latent trajectories (500 steps, 256 users, 64 dimensions). Each
call computes the loss and its gradient with respect to pred:

* ``cpu`` (``cuda``, ``triton``): ``rk.policy_loss`` on the kernel;
* ``two-op``: ``rk.gaussian_logprob`` on the same kernel backend, then the
  surrogate in PyTorch and autograd (what the trainer did before);
* ``reference`` / ``reference-compiled``: ``reference.policy_loss`` (autograd
  through the reference log-likelihood), eager and under torch.compile.

Both REINFORCE and PPO's clipped surrogate (old log-likelihoods near the new
ones, a fifth of the rows clipped) are timed. The hardware floor is the traffic
the fused op cannot avoid, reading pred (S planes) and traj (S+1 planes) and
writing the gradient (S planes), (3S + 1) * B * I * 4 bytes, at this machine's
measured copy bandwidth. Separate medians of small calls drift with the machine's
state from one test to the next, so the kernel is also timed in alternating pairs
against the two-op path and against torch.compile (the summary's "paired calls"
lines: the kernel's time over the other's, quartiles over the pairs).

    pytest benchmarks/suites/bench_policy_loss.py --benchmark-only
"""

import pytest
import torch

import refit_kernels as rk
from refit_kernels import reference

from benchmarks.suites._bench import QUICK, paired_ratios, record, record_ratio
from benchmarks.suites.bench_gaussian_logprob import trajectory as glp_trajectory

SHAPES = {"diffrec": (40, 400, 2810), "grpo": (20, 1024, 2810), "dreamrec": (500, 256, 64)}
if QUICK:
    SHAPES = {"quick": (4, 16, 300)}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_INPUTS = {}


def trajectory(shape, device):
    """bench_gaussian_logprob's float32 trajectory, its per-user weights as the advantages, and PPO's old
    per-step log-likelihoods near the new ones (cached per shape)."""
    key = (shape, device)
    if key not in _INPUTS:
        pred, traj, cp, cx, lv, adv = (t.cpu() for t in glp_trajectory(shape, "cpu"))
        terms = rk.gaussian_logprob(pred, traj, cp, cx, lv, per_step=True)
        g = torch.Generator().manual_seed(1)
        old = terms + 0.15 * torch.randn(terms.shape, generator=g)  # |log rho| > ~0.2 on about a fifth of rows
        _INPUTS.clear()  # keep one shape in memory at a time
        _INPUTS[key] = tuple(t.to(device) for t in (pred, traj, cp, cx, lv, adv, old))
    return _INPUTS[key]


def _two_op(backend):
    def loss(p, traj, cp, cx, lv, adv, old):
        L = rk.gaussian_logprob(p, traj, cp, cx, lv, per_step=True, backend=backend)
        if old is None:
            return -(adv * L.sum(0)).mean()
        ratio = torch.exp(L - old)
        return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    return loss


def _reference(p, traj, cp, cx, lv, adv, old):
    S, B = p.shape[:2]
    return reference.policy_loss(p, traj, cp, cx, lv, adv, old, 0.2, False, float(B if old is None else S * B))[0]


def _implementations(device):
    status = rk.available_backends()
    impls = {}
    kernel_backends = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    for name in kernel_backends:
        if status[name] is None and rk.dispatch.device_objection(name, torch.device(device)) is None:
            if name == "triton" and rk.triton.interpret_mode():
                continue  # the interpreter's speed means nothing
            impls[name] = lambda p, t, cp, cx, lv, a, o, _n=name: rk.policy_loss(
                p, t, cp, cx, lv, a, old_logprob=o, backend=_n).loss
            impls[f"two-op {name}"] = _two_op(name)
    impls["reference"] = _reference
    impls["reference-compiled"] = torch.compile(_reference, dynamic=False)
    return impls


IMPLS = ["cpu", "two-op cpu", "cuda", "two-op cuda", "triton", "two-op triton", "reference", "reference-compiled"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("method", ["reinforce", "ppo"])
@pytest.mark.parametrize("impl", IMPLS)
def test_policy_loss(benchmark, copy_bandwidth, device, shape_name, method, impl):
    impls = _implementations(device)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {device} here")
    fn = impls[impl]
    shape = SHAPES[shape_name]
    pred, traj, cp, cx, lv, adv, old = trajectory(shape, device)
    old = old if method == "ppo" else None
    p = pred.detach().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def loss_and_grad():
        (grad,) = torch.autograd.grad(fn(p, traj, cp, cx, lv, adv, old), p)
        sync()
        return grad

    loss_and_grad()  # compile / warm up outside the timing
    S, B, I = shape
    group = f"policy_loss {method} {shape_name} {shape} {device}"
    benchmark.group = group
    traffic = (3 * S + 1) * B * I * 4
    floor = traffic / copy_bandwidth if device == "cpu" else None
    benchmark.extra_info.update(shape=shape, device=device, method=method, floor_ms=floor and floor * 1e3)
    slow = impl.startswith("reference")
    benchmark.pedantic(loss_and_grad, rounds=(3 if QUICK else 7) if slow else (5 if QUICK else 21),
                       warmup_rounds=1)
    record(benchmark, group, impl, floor_s=floor,
           note=f"floor: {traffic / 1e6:.0f} MB at {copy_bandwidth / 1e9:.1f} GB/s" if floor else "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("method", ["reinforce", "ppo"])
def test_policy_loss_paired(benchmark, device, shape_name, method):
    """The kernel against the two-op path and against torch.compile, in alternating pairs of calls."""
    impls = _implementations(device)
    kernel = "cpu" if device == "cpu" else "cuda"
    if kernel not in impls:
        pytest.skip(f"{kernel} does not run on {device} here")
    shape = SHAPES[shape_name]
    pred, traj, cp, cx, lv, adv, old = trajectory(shape, device)
    old = old if method == "ppo" else None
    p = pred.detach().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(name):
        def call():
            torch.autograd.grad(impls[name](p, traj, cp, cx, lv, adv, old), p)
            sync()
        return call

    group = f"policy_loss {method} {shape_name} {shape} {device}"
    rounds = 5 if QUICK else 31
    record_ratio(group, f"{kernel} / two-op {kernel}", paired_ratios(timed(kernel), timed(f"two-op {kernel}"), rounds))
    record_ratio(group, f"{kernel} / reference-compiled",
                 paired_ratios(timed(kernel), timed("reference-compiled"), rounds))
    benchmark.pedantic(timed(kernel), rounds=1, warmup_rounds=0)
