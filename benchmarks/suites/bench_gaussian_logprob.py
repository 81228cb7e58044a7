"""gaussian_logprob, forward + backward: kernels vs the PyTorch reference.

Shapes (S, B, I): DiffRec's ML-1M setting (40, 400, 2810) and a Yelp-sized
catalogue (5, 400, 34395). Every implementation runs on the same float32
inputs in one session: the CPU kernel, the reference in eager mode, and
torch.compile of the reference (and the CUDA and Triton kernels on a GPU).

The hardware floor is the traffic the op cannot avoid, divided by this
machine's measured copy bandwidth: the forward reads pred (S planes) and traj
(S+1 planes); the backward reads both again and writes the (S, B, I) gradient:
(5S + 2) * B * I * 4 bytes.

    pytest benchmarks/suites/bench_gaussian_logprob.py --benchmark-only
"""

import math

import pytest
import torch

import refit_kernels as rk
from refit_kernels import reference

from benchmarks.suites._bench import QUICK, record

SHAPES = {"ml-1m": (40, 400, 2810), "yelp": (5, 400, 34395)}
if QUICK:
    SHAPES = {"quick": (4, 16, 300)}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_INPUTS = {}


def trajectory(shape, device):
    """A float32 trajectory sampled from the Gaussians it is scored under (cached per shape)."""
    key = (shape, device)
    if key not in _INPUTS:
        S, B, I = shape
        g = torch.Generator().manual_seed(0)
        lv = torch.empty(S, dtype=torch.float64).uniform_(math.log(1e-7), math.log(1e-5), generator=g)
        cp = torch.empty(S, dtype=torch.float64).uniform_(0.01, 1.0, generator=g)
        cx = torch.empty(S, dtype=torch.float64).uniform_(0.0, 1.0, generator=g)
        pred = torch.rand(S, B, I, generator=g)
        traj = torch.empty(S + 1, B, I)
        traj[0] = (torch.rand(B, I, generator=g) < 0.02).float()
        for s in range(S):
            noise = torch.randn(B, I, generator=g).mul_(math.exp(0.5 * lv[s].item()))
            traj[s + 1] = (cp[s] * pred[s] + cx[s] * traj[s]).float() + noise
        weights = torch.randn(B, generator=g)
        _INPUTS.clear()  # keep one shape in memory at a time
        _INPUTS[key] = tuple(t.to(device) for t in (pred, traj, cp, cx, lv, weights))
    return _INPUTS[key]


def _implementations(device):
    status = rk.available_backends()
    impls = {}
    kernel_backends = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    for name in kernel_backends:
        if status[name] is None and rk.dispatch.device_objection(name, torch.device(device)) is None:
            if name == "triton" and rk.triton.interpret_mode():
                continue  # the interpreter's speed means nothing
            impls[name] = lambda *a, _n=name: rk.gaussian_logprob(*a, backend=_n)
    impls["reference"] = reference.gaussian_logprob
    impls["reference-compiled"] = torch.compile(reference.gaussian_logprob, dynamic=False)
    return impls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", ["cpu", "cuda", "triton", "reference", "reference-compiled"])
def test_gaussian_logprob_fwd_bwd(benchmark, copy_bandwidth, device, shape_name, impl):
    impls = _implementations(device)
    if impl not in impls:
        pytest.skip(f"{impl} does not run on {device} here")
    fn = impls[impl]
    shape = SHAPES[shape_name]
    pred, traj, cp, cx, lv, weights = trajectory(shape, device)
    p = pred.detach().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd_bwd():
        out = fn(p, traj, cp, cx, lv)
        (grad,) = torch.autograd.grad(out, p, weights)
        sync()
        return grad

    fwd_bwd()  # compile / warm up outside the timing
    S, B, I = shape
    group = f"gaussian_logprob fwd+bwd {shape_name} {shape} {device}"
    benchmark.group = group
    floor = (5 * S + 2) * B * I * 4 / copy_bandwidth if device == "cpu" else None
    benchmark.extra_info.update(shape=shape, device=device, floor_ms=floor and floor * 1e3)
    slow = impl.startswith("reference")
    benchmark.pedantic(fwd_bwd, rounds=(3 if QUICK else 7) if slow else (5 if QUICK else 21), warmup_rounds=1)
    record(benchmark, group, impl, floor_s=floor,
           note=f"floor: {(5 * S + 2) * B * I * 4 / 1e6:.0f} MB at {copy_bandwidth / 1e9:.1f} GB/s" if floor else "")
