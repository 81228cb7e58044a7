"""refit.runtime.cudagraph: the capture-safe reverse loop, checked on the CPU.

A CUDA graph can only be recorded and replayed on a GPU (benchmarks/gpu/gpu_check.sh
does both and times them). What a CPU can check is everything the capture
relies on, with the very loop a graph would record (``use_graph=False`` runs
it eagerly on the same static buffers):

- it gives the eager sampler's results, bit for bit, from the same noise
  (ReFiT trajectories, evaluation scores, DreamRec's sampler), and leaves
  the generator where the eager sampler leaves it;
- nothing inside the loop reads a tensor on the host (a guard turns every
  such call into an error) and the loop's own arithmetic allocates nothing
  (the profiler sees no allocation with a denoiser that allocates nothing);
- a last, smaller batch is padded to the capacity and trimmed back;
- ReFiT and evaluation run unchanged on a wrapped policy.
"""

import contextlib
import copy

import pytest
import torch

import refit_kernels as rk
from refit.runtime.cudagraph import CapturedLoop, ReverseSampler, reverse_loop, step_table
from refit.families import graphed
from refit.data import load_dataset
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.families.diffrec.denoisers import build_model
from refit.families.diffrec.mlp import DiffRecMLP
from refit.families.dreamrec.network import DreamRec
from refit.families.diffrec.recommender import RowRecommender
from refit.families.dreamrec.recommender import SeqRecommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT

N_USERS, N_ITEMS = 60, 40
# Noise large enough that the noise term of every step shows in the states.
NOISY = dict(steps=7, noise_scale=0.2, noise_min=0.01, noise_max=0.05)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_users=N_USERS, n_items=N_ITEMS, seed=1)


def make_rec(kind="diffrec", data=None, precision="fp32", **diffusion):
    torch.manual_seed(0)
    if kind == "diffrec":
        model = DiffRecMLP(N_ITEMS, dims=(24,), emb_size=6)
    else:
        model = build_model("cfdiff", {"n_items": N_ITEMS, "top_n": 4}, train=data.train)
    cfg = DiffusionConfig(**{**NOISY, **diffusion})
    return RowRecommender(kind, model.eval(), GaussianDiffusion(cfg), precision=precision)


def make_dreamrec(steps=9, eval_steps=None):
    torch.manual_seed(0)
    model = DreamRec(N_ITEMS, hidden=16, max_len=6, dropout=0.1).eval()
    diffusion = GaussianDiffusion(DiffusionConfig(mean_type="x0", steps=steps, noise_schedule="ddpm-linear",
                                                  timestep_sampling="uniform"))
    return SeqRecommender(model, diffusion, w=2.0, eval_steps=eval_steps)


def histories(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 7, (B,), generator=g)
    hist = torch.full((B, 6), N_ITEMS, dtype=torch.long)
    for b in range(B):
        hist[b, :lengths[b]] = torch.randperm(N_ITEMS, generator=g)[:lengths[b]]
    return hist, lengths


def batch(data, B, seed=0):
    users = torch.randperm(N_USERS, generator=torch.Generator().manual_seed(seed))[:B]
    return users, rk.gather_rows(data.train, users)


def gen(seed=5):
    return torch.Generator().manual_seed(seed)


def assert_same_trajectory(got, want):
    for name in want._fields:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differs: max {(a.double() - b.double()).abs().max().item():.3e}"


# --- the same results as the eager sampler ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["diffrec", "cfdiff"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_refit_sampling_equals_the_eager_sampler(data, kind, temperature):
    rec = make_rec(kind, data)
    users, rows = batch(data, 9)
    g1, g2 = gen(), gen()
    want = rec.sample(users, rows, generator=g1, temperature=temperature)
    fast = graphed(rec, batch_size=9, use_graph=False)
    got = fast.sample(users, rows, generator=g2, temperature=temperature)
    assert_same_trajectory(got, want)
    assert torch.equal(g1.get_state(), g2.get_state()), "the generator must end where the eager sampler leaves it"
    # A second batch through the same static buffers, and the temperature changed back and forth.
    users, rows = batch(data, 9, seed=1)
    assert_same_trajectory(fast.sample(users, rows, generator=g2), rec.sample(users, rows, generator=g1))
    assert_same_trajectory(fast.sample(users, rows, generator=g2, temperature=temperature),
                           rec.sample(users, rows, generator=g1, temperature=temperature))


def test_refit_sampling_with_a_slice_of_a_global_batch(data):
    """Under torchrun each rank samples its rows of the global batch's draws (``rows=(offset, total)``)."""
    rec = make_rec("diffrec", data)
    users, rows = batch(data, 5)
    want = rec.sample(users, rows, generator=gen(), rows=(3, 12))
    got = graphed(rec, batch_size=5, use_graph=False).sample(users, rows, generator=gen(), rows=(3, 12))
    assert_same_trajectory(got, want)


def test_refit_sampling_in_bf16(data):
    rec = make_rec("diffrec", data, precision="bf16")
    users, rows = batch(data, 6)
    got = graphed(rec, batch_size=6, use_graph=False).sample(users, rows, generator=gen())
    assert_same_trajectory(got, rec.sample(users, rows, generator=gen()))


@pytest.mark.parametrize("kind", ["diffrec", "cfdiff"])
@pytest.mark.parametrize("latent", [True, False])
def test_evaluation_scores_equal_the_eager_pass(data, kind, latent):
    rec = make_rec(kind, data)
    users, rows = batch(data, 11)
    got = graphed(rec, eval_batch_size=11, use_graph=False).scores(users, rows, latent=latent)
    want = rec.scores(users, rows, latent=latent)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want), f"max difference {(got - want).abs().max().item():.3e}"


def test_evaluation_with_sampling_noise_and_a_noised_start(data):
    rec = make_rec("diffrec", data)
    rec.sampling_noise, rec.sampling_steps = True, 3
    users, rows = batch(data, 8)
    g1, g2 = gen(), gen()
    got = graphed(rec, eval_batch_size=8, use_graph=False).scores(users, rows, generator=g2)
    assert torch.equal(got, rec.scores(users, rows, generator=g1))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_dreamrec_sampling_and_generation_equal_the_eager_sampler():
    rec = make_dreamrec(eval_steps=4)
    hist, lengths = histories(7)
    fast = graphed(rec, batch_size=7, eval_batch_size=7, use_graph=False)
    assert_same_trajectory(fast.sample(None, (hist, lengths), generator=gen(), temperature=0.8),
                           rec.sample(None, (hist, lengths), generator=gen(), temperature=0.8))
    got = fast.generate(hist, lengths, gen())
    assert torch.equal(got, rec.generate(hist, lengths, gen(), fast=False))
    # The eager default folds mlp1's linear algebra: the same embeddings up to float32 rounding.
    torch.testing.assert_close(got, rec.generate(hist, lengths, gen()), rtol=1e-5, atol=1e-5)


# --- padding ---------------------------------------------------------------------------------------

def test_a_smaller_batch_is_padded_and_trimmed(data):
    rec = make_rec("diffrec", data)
    fast = graphed(rec, batch_size=16, eval_batch_size=16, use_graph=False)
    users, rows = batch(data, 5)
    traj = fast.sample(users, rows, generator=gen())
    assert traj.states.shape == (NOISY["steps"], 5, N_ITEMS) and traj.final.shape == (5, N_ITEMS)
    assert traj.states.is_contiguous() and traj.preds.is_contiguous()
    sampler = next(iter(fast.samplers.values()))
    assert sampler.capacity == 16
    # Padded rows repeat the last real row, so they are valid inputs; the real rows are the eager ones
    # (a padded batch runs the denoiser's products at another size: equal up to float32 rounding).
    assert torch.equal(sampler.x_start[5:], rows[4:5].expand(11, N_ITEMS))
    want = rec.sample(users, rows, generator=gen())
    for name in ("states", "preds", "final"):
        torch.testing.assert_close(getattr(traj, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    scores = fast.scores(users, rows)
    assert scores.shape == (5, N_ITEMS)
    torch.testing.assert_close(scores, rec.scores(users, rows), rtol=1e-5, atol=1e-6)


def test_results_are_copies_not_the_static_buffers(data):
    rec = make_rec("diffrec", data)
    fast = graphed(rec, batch_size=4, use_graph=False)
    users, rows = batch(data, 4)
    first = fast.sample(users, rows, generator=gen())
    kept = first.final.clone()
    fast.sample(*batch(data, 4, seed=3), generator=gen(9))
    assert torch.equal(first.final, kept)


def test_a_bigger_batch_builds_a_bigger_sampler(data):
    rec = make_rec("diffrec", data)
    fast = graphed(rec, eval_batch_size=4, use_graph=False)
    users, rows = batch(data, 10)
    assert torch.equal(fast.scores(users, rows), rec.scores(users, rows))
    assert max(s.capacity for s in fast.samplers.values()) == 10


def test_evaluation_of_all_users_with_a_padded_last_batch(data):
    """60 users in batches of 16: the last batch (12 users) is padded; the metrics are the eager ones."""
    rec = make_rec("diffrec", data)
    got = graphed(rec, eval_batch_size=16, use_graph=False).evaluate(data, ks=(5, 20), batch_size=16)
    want = rec.evaluate(data, ks=(5, 20), batch_size=16)
    for split in ("valid", "test"):
        for key, value in want[split].items():
            assert got[split][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (split, key)


# --- capture safety: no host sync, no allocation inside the loop -------------------------------------

class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_sync():
    """Every way a tensor's value reaches the host becomes an error (a GPU would sync there)."""
    names = ["item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__complex__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(*args, **kwargs):
            raise HostSync(f"Tensor.{name} called inside the capture-safe loop")
        return f

    saved_sync = torch.cuda.synchronize
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        torch.cuda.synchronize = refuse("synchronize (torch.cuda)")
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.cuda.synchronize = saved_sync


def test_the_guard_catches_host_reads():
    t = torch.ones(2)
    with pytest.raises(HostSync):
        with forbid_host_sync():
            float(t.sum())
    with pytest.raises(HostSync):
        with forbid_host_sync():
            if t.sum() > 0:
                pass
    assert float(t.sum()) == 2.0  # restored


@pytest.mark.parametrize("kind", ["diffrec", "cfdiff", "dreamrec"])
def test_no_host_sync_inside_the_loop(data, kind):
    if kind == "dreamrec":
        rec = make_dreamrec()
        fast = graphed(rec, batch_size=5, eval_batch_size=5, use_graph=False)
        hist, lengths = histories(5)
        fast.sample(None, (hist, lengths), generator=gen())
        fast.generate(hist, lengths, gen())
    else:
        rec = make_rec(kind, data)
        fast = graphed(rec, batch_size=5, eval_batch_size=5, use_graph=False)
        users, rows = batch(data, 5)
        fast.sample(users, rows, generator=gen())
        fast.scores(users, rows, latent=True)
        fast.scores(users, rows, latent=False)
    assert len(fast.samplers) >= 2
    for sampler in fast.samplers.values():  # the buffers are loaded; run what a graph would record
        with forbid_host_sync():
            sampler.loop.replay()


class _NoAllocDenoiser:
    """out = 0.5 * x + t (t as float), written into preallocated buffers: a denoiser that allocates nothing
    (a Python scalar operand would be wrapped into a fresh 0-d tensor, hence the tensor constant)."""

    def __init__(self, C, D):
        self.out, self.t = torch.empty(C, D), torch.empty(C, 1)
        self.half = torch.tensor(0.5)
        self.calls = 0

    def __call__(self, x, t, cond):
        self.calls += 1
        self.t.copy_(t[:, None])
        torch.mul(x, self.half, out=self.out)
        self.out.add_(self.t)
        return self.out


@pytest.mark.parametrize("trajectory", [True, False])
def test_the_loop_allocates_nothing_per_step(trajectory):
    diffusion = GaussianDiffusion(DiffusionConfig(**NOISY))
    C, D = 6, 33
    f = _NoAllocDenoiser(C, D)
    sampler = ReverseSampler(diffusion, f, C, D, device="cpu", noise=True, trajectory=trajectory)
    sampler.load(torch.rand(C, D), generator=gen())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sampler.loop.replay()
    allocations = [e for e in prof.events() if e.name == "[memory]"]
    assert f.calls == diffusion.steps
    assert not allocations, f"{len(allocations)} allocations inside the loop"


def test_the_loop_is_the_eager_step_arithmetic():
    """reverse_loop on its own, against the eager recursion written out, with a toy denoiser."""
    diffusion = GaussianDiffusion(DiffusionConfig(**NOISY))
    T, C, D = diffusion.steps, 4, 9
    table = step_table(diffusion, C, "cpu", temperature=1.3)
    x0 = torch.rand(C, D)
    noise = torch.randn(T - 1, C, D, generator=gen())
    model = lambda x, t, cond: torch.sin(x) + 0.1 * t[:, None]  # noqa: E731
    final, scratch = torch.empty(C, D), torch.empty(3, C, D)
    states, preds = torch.empty(T, C, D), torch.empty(T - 1, C, D)
    reverse_loop(model, x0, table, final, scratch, noise=noise, states=states, preds=preds)
    cp, cx, lv = diffusion.step_constants()
    lv = lv + 2.0 * torch.log(torch.tensor(1.3)).item()
    x = x0
    for s, i in enumerate(reversed(range(T))):
        out = model(x, torch.full((C,), i), ())
        mean = cp[i] * out + cx[i] * x
        if i > 0:
            assert torch.equal(preds[s], out)
            x = mean + torch.exp(0.5 * lv[i]) * noise[s]
            torch.testing.assert_close(states[s + 1], x, rtol=0, atol=1e-6)
            x = states[s + 1]
        else:
            x = mean
    torch.testing.assert_close(final, x, rtol=0, atol=1e-6)


def test_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedLoop(lambda: None, "cpu", use_graph=True)


# --- ReFiT on a wrapped policy ---------------------------------------------------------------------------

def test_a_refit_step_on_the_wrapped_policy_equals_the_plain_one(data):
    rec_a, rec_b = make_rec("diffrec", data), make_rec("diffrec", data)
    cfg = FinetuneConfig(checkpoint="", batch_size=8, seed=3, lr=1e-3)
    plain = ReFiT(rec_a, data, cfg)
    fast = ReFiT(graphed(rec_b, batch_size=8, use_graph=False), data, cfg)
    for _ in range(2):  # the second step samples with the weights the first step updated
        a, b = plain.step(), fast.step()
        for key in ("reward", "n_k", "n_sim_k", "loss", "grad_norm"):
            assert a[key] == b[key], key
    for p, q in zip(rec_a.model.parameters(), rec_b.model.parameters()):
        assert torch.equal(p, q)


def test_the_kl_anchor_copies_the_plain_policy(data):
    rec = make_rec("diffrec", data)
    cfg = FinetuneConfig(checkpoint="", batch_size=4, seed=3, anchor="kl", anchor_weight=0.1)
    trainer = ReFiT(graphed(rec, batch_size=4, use_graph=False), data, cfg)
    assert isinstance(trainer.reference, RowRecommender)
    trainer.step()


def test_wrapping_is_idempotent_and_refuses_other_objects(data):
    rec = make_rec("diffrec", data)
    fast = graphed(rec)
    assert graphed(fast) is fast
    assert fast.device == rec.device and fast.precision == rec.precision
    assert copy.deepcopy(fast).model is not rec.model
    with pytest.raises(TypeError, match="RowRecommender"):
        graphed(object())


# --- on a GPU: the graphs themselves (run by benchmarks/gpu/gpu_check.sh) ------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _on_cuda(rec):
    rec.model.to("cuda")
    rec.diffusion = GaussianDiffusion(rec.diffusion.config, device="cuda")
    return rec


def _cuda_gen(seed=5):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replays_the_eager_sampler(data, precision):
    rec = _on_cuda(make_rec("diffrec", data, precision=precision))
    users, rows = batch(data, 9)
    rows = rows.cuda()
    fast = graphed(rec, batch_size=12)
    for seed in (5, 6):  # the second call replays the graph recorded by the first
        got = fast.sample(users, rows, generator=_cuda_gen(seed), temperature=0.8)
        want = rec.sample(users, rows, generator=_cuda_gen(seed), temperature=0.8)
        for name in ("states", "preds", "final"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    sampler = next(iter(fast.samplers.values()))
    assert sampler.loop.graph is not None, "no graph was captured"
    # An optimiser step between replays changes the weights in place: the next replay sees them.
    with torch.no_grad():
        for p in rec.model.parameters():
            p.mul_(1.01)
    got = fast.sample(users, rows, generator=_cuda_gen(7))
    want = rec.sample(users, rows, generator=_cuda_gen(7))
    torch.testing.assert_close(got.final, want.final, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@CUDA
def test_cuda_graph_loop_has_no_host_sync(data):
    rec = _on_cuda(make_rec("diffrec", data))
    users, rows = batch(data, 6)
    fast = graphed(rec, batch_size=6, eval_batch_size=6)
    fast.sample(users, rows.cuda(), generator=_cuda_gen())
    fast.scores(users.cuda(), rows.cuda(), latent=True)
    fast.scores(users.cuda(), rows.cuda(), latent=False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for sampler in fast.samplers.values():
            sampler.run_loop()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("kind", ["diffrec", "cfdiff"])
def test_cuda_graph_evaluation_scores(data, kind):
    rec = _on_cuda(make_rec(kind, data))  # CF-Diff's hop tables stay on the host; its inputs follow the rows
    fast = graphed(rec, eval_batch_size=16)
    for B in (16, 7):  # the second batch is padded
        users, rows = batch(data, B, seed=B)
        users, rows = users.cuda(), rows.cuda()
        for latent in (True, False):
            torch.testing.assert_close(fast.scores(users, rows, latent=latent), rec.scores(users, rows, latent=latent),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@CUDA
def test_cuda_graph_dreamrec_generation():
    rec = make_dreamrec(eval_steps=5)
    rec.model.to("cuda")
    rec.diffusion = GaussianDiffusion(rec.diffusion.config, device="cuda")
    rec.set_eval_steps(5)
    hist, lengths = (t.cuda() for t in histories(7))
    fast = graphed(rec, eval_batch_size=8)
    for seed in (1, 2):
        got = fast.generate(hist, lengths, torch.Generator().manual_seed(seed))
        want = rec.generate(hist, lengths, torch.Generator().manual_seed(seed), fast=False)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
