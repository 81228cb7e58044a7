"""LatentScheduleDenoiser: an outside DreamRec-style model (its own encoder, denoiser and schedule object,
written here the way DreamRec's published code writes them, not with refit's classes) post-trained by
refit's trainer through the adapter."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from refit.data import load_dataset
from refit.latent_adapter import LatentScheduleDenoiser, kept_modes
from refit.policy import check_policy, episode_source, outside_state_dict
from refit.runtime.runs import load_checkpoint
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune

SEQ = {"n_users": 60, "n_items": 40, "mean_length": 8, "seed": 5}
HIDDEN, STATE, STEPS, W = 16, 6, 12, 2.0


# --- the outside model ------------------------------------------------------------------------------

class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=time.device) * -(math.log(10000) / (half - 1)))
        args = time[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class Tenc(nn.Module):
    """Right-padded windows of ``state_size`` items, padding id ``item_num``; the guidance is the
    block's output at position ``len_states - 1``; ``forward(x, h, step)`` predicts x0."""

    def __init__(self, hidden_size, item_num, state_size, dropout=0.1):
        super().__init__()
        self.hidden_size, self.item_num, self.state_size = hidden_size, item_num, state_size
        self.item_embeddings = nn.Embedding(item_num + 1, hidden_size)
        nn.init.normal_(self.item_embeddings.weight, 0, 1)
        self.none_embedding = nn.Embedding(1, hidden_size)
        nn.init.normal_(self.none_embedding.weight, 0, 1)
        self.positional_embeddings = nn.Embedding(state_size, hidden_size)
        self.emb_dropout = nn.Dropout(dropout)
        self.ln_1, self.ln_2, self.ln_3 = (nn.LayerNorm(hidden_size) for _ in range(3))
        self.q, self.k, self.v = (nn.Linear(hidden_size, hidden_size) for _ in range(3))
        self.feed_forward = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                          nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size))
        self.step_mlp = nn.Sequential(SinusoidalPositionEmbeddings(hidden_size),
                                      nn.Linear(hidden_size, hidden_size * 2), nn.GELU(),
                                      nn.Linear(hidden_size * 2, hidden_size))
        self.diffuser = nn.Sequential(nn.Linear(hidden_size * 3, hidden_size * 2), nn.GELU(),
                                      nn.Linear(hidden_size * 2, hidden_size))

    def forward(self, x, h, step):
        t = self.step_mlp(step)
        return self.diffuser(torch.cat((x, h, t), dim=1))

    def cacu_x(self, x):
        return self.item_embeddings(x)

    def block(self, emb, real):
        """Causal attention over the real items of (B, L, D) embeddings, (B, L) bool ``real``."""
        m = real.float().unsqueeze(-1)
        seq = self.emb_dropout(emb) * m
        seq_normalized = self.ln_1(seq)
        scores = self.q(seq_normalized) @ self.k(seq).transpose(1, 2) / math.sqrt(self.hidden_size)
        L = real.shape[1]
        allowed = torch.tril(torch.ones(L, L, dtype=torch.bool)) & real[:, None, :]
        att = torch.softmax(scores.masked_fill(~allowed, -1e9), -1) @ self.v(seq) + seq_normalized
        ff = self.feed_forward(self.ln_2(att)) + att
        return self.ln_3(ff * m)

    def cacu_h(self, states, len_states, p):
        emb = self.item_embeddings(states) + self.positional_embeddings(torch.arange(self.state_size))
        out = self.block(emb, states != self.item_num)
        h = out[torch.arange(states.shape[0]), len_states - 1]
        if p > 0:
            keep = (torch.rand(h.shape[0], 1) >= p).float()
            h = h * keep + self.none_embedding.weight * (1 - keep)
        return h


class LeftTenc(Tenc):
    """The same network over left-padded windows: id 0 pads, item i is id i + 1, positions count from
    the oldest real item and the guidance is read at the last slot."""

    def cacu_h(self, states, len_states, p):
        real = states != 0
        k = real.sum(1)
        pos = (torch.arange(self.state_size)[None, :] - (self.state_size - k)[:, None]).clamp(min=0)
        out = self.block(self.item_embeddings(states) + self.positional_embeddings(pos), real)
        return out[:, -1]


class diffusion:
    """A schedule object in the published code's style: linear betas and the posterior's constants."""

    def __init__(self, timesteps, beta_start, beta_end, w):
        self.timesteps, self.w = timesteps, w
        self.betas = torch.linspace(beta_start, beta_end, timesteps)
        b = self.betas.double()
        ac = torch.cumprod(1 - b, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.alphas_cumprod = ac
        self.posterior_mean_coef1 = b * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - ac_prev) * (1 - b).sqrt() / (1 - ac)
        self.posterior_variance = b * (1 - ac_prev) / (1 - ac)

    def x_start(self, model, x, h, t):
        null = model.none_embedding.weight.expand_as(h)
        return (1 + self.w) * model(x, h, t) - self.w * model(x, null, t)


def parts(left=False):
    """The adapter's description of a Tenc (right) or LeftTenc (left padding, ids shifted by one)."""
    if left:
        return dict(encode=lambda m, s, n: m.cacu_h(s, n, 0.0), pad="left", pad_id=0, id_offset=1,
                    item_embeddings=lambda m: m.item_embeddings.weight[1:], null_embedding="none_embedding")
    return dict(encode=lambda m, s, n: m.cacu_h(s, n, 0.0),
                item_embeddings=lambda m: m.item_embeddings.weight[:m.item_num], null_embedding="none_embedding")


def make(n_items, seed=0, **kw):
    torch.manual_seed(seed)
    model = Tenc(HIDDEN, n_items, STATE)
    diff = diffusion(STEPS, 1e-4, 0.2, W)
    opts = {**parts(), "max_len": STATE, "w": diff.w, **kw}
    return model, diff, LatentScheduleDenoiser(model, diff.betas, n_items=n_items, **opts)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic-seq", **SEQ)


def episode(data, n=6, seed=0):
    return episode_source(data).sample(n, torch.Generator().manual_seed(seed))


def own_windows(data, ep):
    """The outside model's own right-padded windows of an episode: its last STATE items."""
    hist, n = ep.inputs
    keep = n.clamp(max=STATE)
    rows = []
    for r in range(hist.shape[0]):
        items = hist[r, n[r] - keep[r]:n[r]].tolist()
        rows.append(items + [data.n_items] * (STATE - len(items)))
    return torch.tensor(rows), keep.clamp(min=1)


def modes(module):
    return [m.training for m in module.modules()]


# --- 1, 2: the adapter computes the outside model's own quantities ----------------------------------

def test_outputs_and_final_scores_are_the_outside_models_guided_formula(data):
    model, diff, policy = make(data.n_items)
    check_policy(policy)
    model.eval()
    ep = episode(data)
    traj = policy.sample(ep.users, ep.inputs, generator=torch.Generator().manual_seed(1))
    assert traj.preds.shape == (STEPS - 1, 6, HIDDEN) and traj.timesteps.tolist() == list(range(STEPS - 1, 0, -1))
    got = policy.outputs(ep.users, ep.inputs, traj)
    assert got.requires_grad
    hist, n = own_windows(data, ep)
    with torch.no_grad():
        h = model.cacu_h(hist, n, 0.0)
        for s, t in enumerate(traj.timesteps.tolist()):
            want = diff.x_start(model, traj.states[s], h, torch.full((6,), t))
            torch.testing.assert_close(got[s], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traj.preds[s], want, rtol=1e-5, atol=1e-5)
        scores = policy.final_scores(ep.users, ep.inputs, traj.final)
    assert scores.shape == (6, data.n_items)  # the padding row is not an item
    torch.testing.assert_close(scores, traj.final @ model.item_embeddings.weight[:data.n_items].t())


def test_sampling_is_the_outside_models_reverse_loop(data):
    model, diff, policy = make(data.n_items)
    model.eval()
    ep = episode(data, n=5, seed=2)
    got = policy.generate(*ep.inputs, generator=torch.Generator().manual_seed(7))
    # The published sampler's loop, with the noise drawn from one generator in the same order.
    g = torch.Generator().manual_seed(7)
    hist, n = own_windows(data, ep)
    with torch.no_grad():
        h = model.cacu_h(hist, n, 0.0)
        x = torch.randn((5, HIDDEN), generator=g)
        for i in reversed(range(STEPS)):
            x0 = diff.x_start(model, x, h, torch.full((5,), i))
            mean = diff.posterior_mean_coef1[i] * x0.double() + diff.posterior_mean_coef2[i] * x.double()
            if i > 0:
                x = (mean + diff.posterior_variance[i].sqrt() * torch.randn((5, HIDDEN), generator=g)).float()
            else:
                x = mean.float()
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    scores = policy.scores(*ep.inputs, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(scores, x @ model.item_embeddings.weight[:data.n_items].t().detach(),
                               rtol=1e-4, atol=1e-3)


def test_pretraining_loss_is_dreamrecs_objective(data):
    model, diff, policy = make(data.n_items, p_uncond=0.5)
    model.eval()
    ep = episode(data, n=8, seed=3)
    got = policy.pretraining_loss(ep, generator=torch.Generator().manual_seed(4))
    assert got.shape == (8,)
    # keep-or-null draw, a uniform timestep, q_sample noise, x0 MSE toward the target item's embedding
    g = torch.Generator().manual_seed(4)
    keep = torch.rand((8, 1), generator=g) >= 0.5
    t = torch.randint(0, STEPS, (8,), generator=g)
    noise = torch.randn((8, HIDDEN), generator=g)
    hist, n = own_windows(data, ep)
    with torch.no_grad():
        h = torch.where(keep, model.cacu_h(hist, n, 0.0), model.none_embedding.weight.expand(8, -1))
        x0 = model.cacu_x(ep.positives.indices)
        ac = diff.alphas_cumprod[t].float()[:, None]
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        want = ((x0 - model(x_t, h, t)) ** 2).mean(1)
    assert not keep.all() and keep.any()  # both branches of the guidance drop are exercised
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)


# --- 3: the outside model's padding convention ------------------------------------------------------

def test_left_padding_with_shifted_ids_scores_as_the_right_padded_model(data):
    right, _, p_right = make(data.n_items)
    torch.manual_seed(0)
    left = LeftTenc(HIDDEN, data.n_items, STATE)
    sd = right.state_dict()
    table = torch.empty_like(sd["item_embeddings.weight"])
    table[1:], table[0] = sd["item_embeddings.weight"][:-1], 0.0  # item i -> id i + 1, id 0 pads
    left.load_state_dict({**sd, "item_embeddings.weight": table})
    seen = []

    def encode(m, states, lengths):
        seen.append((states.clone(), lengths.clone()))
        return m.cacu_h(states, lengths, 0.0)

    diff = diffusion(STEPS, 1e-4, 0.2, W)
    p_left = LatentScheduleDenoiser(left, diff.betas, n_items=data.n_items, max_len=STATE, w=W,
                                    **{**parts(left=True), "encode": encode})
    ep = episode(data, n=7, seed=5)
    hist, n = ep.inputs
    a = p_right.scores(hist, n, generator=torch.Generator().manual_seed(3))
    b = p_left.scores(hist, n, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # What the encoder received: the last STATE items, shifted by one, left-padded with 0.
    states, lengths = seen[-1]
    assert states.shape == (7, STATE)
    for r in range(7):
        k = min(int(n[r]), STATE)
        want = [0] * (STATE - k) + (hist[r, int(n[r]) - k:int(n[r])] + 1).tolist()
        assert states[r].tolist() == want
        assert int(lengths[r]) == max(k, 1)
    assert (n > STATE).any()  # some windows were cut to the model's length


# --- 4, 5: fine-tuning, checkpoints, resume ---------------------------------------------------------

def _cfg(tmp_path, name, **kw):
    base = dict(iterations=2, batch_size=16, eval_every=2, checkpoint_every=1, lr=1e-2, probe_size=8,
                eval_batch_size=256, ks=(10, 20), seed=1, progress=False, plot=False, out=str(tmp_path / name))
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize("method,extra", [
    ("reinforce", {"anchor": "elbo", "anchor_weight": 0.5}),
    ("grpo", {"group_size": 4, "anchor": "kl", "anchor_weight": 0.1}),
    ("reward-weighted", {"group_size": 4}),
])
def test_finetune_trains_the_outside_module(data, tmp_path, method, extra):
    model, _, policy = make(data.n_items)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = finetune(_cfg(tmp_path, method, method=method, **extra), data, policy=policy)
    assert summary["status"] == "finished" and summary["iterations"] == 2
    assert {"hr@20", "ndcg@20"} <= set(summary["test"])
    moved = max(float((model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 1e-4
    for ckpt in ("best.pt", "last.pt"):
        state = load_checkpoint(str(tmp_path / method / ckpt))
        assert state["recommender"]["model"]["name"] == "external-latent"
        fresh = Tenc(HIDDEN, data.n_items, STATE)
        fresh.load_state_dict(outside_state_dict(state), strict=True)
    for k, v in model.state_dict().items():  # last.pt holds the trained weights
        assert torch.equal(fresh.state_dict()[k], v), k


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(data, tmp_path):
    cfg = lambda out: _cfg(tmp_path, out, iterations=4, method="reinforce")  # noqa: E731
    full, _, p_full = make(data.n_items)
    finetune(cfg("full"), data, policy=p_full)
    _, _, p_cut = make(data.n_items)
    assert finetune(cfg("cut"), data, policy=p_cut, max_iterations_this_run=2) == {"stopped_at": 2}
    # A new process: the module rebuilt (other initial weights, so only last.pt's can give the same end).
    resumed, _, p_resumed = make(data.n_items, seed=99)
    finetune(cfg("cut"), data, policy=p_resumed, resume=True)
    logged = [json.loads(line)["iteration"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert logged == [0, 1, 2, 3, 4]
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert a["iteration"] == b["iteration"] == 4
    for k, v in a["recommender"]["model"]["state_dict"].items():
        assert torch.equal(v, b["recommender"]["model"]["state_dict"][k]), k
    start = make(data.n_items)[0].state_dict()
    assert any(not torch.equal(start[k], v) for k, v in full.state_dict().items())
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.parametrize("how", ["default", "bound method", "function"])
def test_the_frozen_copy_keeps_its_own_weights(data, how):
    model = Tenc(HIDDEN, data.n_items, STATE).eval()
    denoise = {"default": None, "bound method": model.forward, "function": lambda m, x, h, t: m(x, h, t)}[how]
    policy = LatentScheduleDenoiser(model, diffusion(STEPS, 1e-4, 0.2, W).betas, n_items=data.n_items,
                                    max_len=STATE, w=W, denoise=denoise, **parts())
    reference = copy.deepcopy(policy)  # what the trainer keeps for the KL anchor
    ep = episode(data, n=4)
    traj = policy.sample(ep.users, ep.inputs, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.diffuser[-1].bias.add_(1.0)
        moved = policy.outputs(ep.users, ep.inputs, traj) - reference.outputs(ep.users, ep.inputs, traj)
    torch.testing.assert_close(moved, torch.full_like(moved, 1.0), rtol=0, atol=1e-4)  # (1 + w) - w


# --- 6: train/eval modes ----------------------------------------------------------------------------

def test_modes_are_kept_after_evaluation_and_sampling(data):
    model, _, policy = make(data.n_items)
    model.train()
    model.feed_forward.eval()  # a mixed state: module.train(was) would lose it
    found = modes(model)
    assert policy.module.training
    metrics = policy.evaluate(data, ks=(10, 20), batch_size=256)
    assert metrics["valid"]["n"] > 0
    assert modes(model) == found
    policy.scores(*episode(data).inputs, generator=torch.Generator().manual_seed(0))
    assert modes(model) == found
    model.eval()
    assert not policy.module.training  # the wrapper reports the outside module's mode
    policy.evaluate(data, ks=(10, 20), batch_size=256)
    assert modes(model) == [False] * len(found)
    with kept_modes(model, eval_mode=True):
        model.train()
    assert modes(model) == [False] * len(found)


def test_modes_are_kept_by_a_finetune_runs_evaluations(data, tmp_path):
    model, _, policy = make(data.n_items)
    model.train()
    model.emb_dropout.eval()
    found = modes(model)
    calls, evaluate = [], policy.evaluate

    def spy(*args, **kwargs):
        before = modes(model)
        out = evaluate(*args, **kwargs)
        calls.append((before, modes(model)))
        return out

    policy.evaluate = spy
    finetune(_cfg(tmp_path, "modes", method="reinforce"), data, policy=policy)
    assert len(calls) == 2  # iteration 0 and the last
    assert all(before == after for before, after in calls)
    assert calls[0][0] == found  # iteration 0 sees the modes the user left
    assert modes(model) == found  # and the run gives them back, the frozen part included


def test_eval_then_train_puts_each_flag_back(data):
    model, _, policy = make(data.n_items)
    model.train()
    model.feed_forward.eval()
    found = modes(model)
    was = policy.module.training
    policy.module.eval()  # what the trainer does around sampling
    assert not any(modes(model))
    policy.module.train(was)
    assert modes(model) == found
    # Switched in between by the user: train() is plain.
    policy.module.eval()
    model.ln_1.train()
    policy.module.train()
    assert all(modes(model))


# --- 7: refusals ------------------------------------------------------------------------------------

def test_clear_errors_for_wrong_parts(data):
    n = data.n_items
    model = Tenc(HIDDEN, n, STATE)
    betas = diffusion(STEPS, 1e-4, 0.2, W).betas
    build = lambda **kw: LatentScheduleDenoiser(model, kw.pop("betas", betas), n_items=n,  # noqa: E731
                                                **{**parts(), "max_len": STATE, **kw})
    with pytest.raises(ValueError, match="denoise must return"):
        build(denoise=lambda m, x, h, t: m(x, h, t)[:, :-1])
    with pytest.raises(ValueError, match=r"item_embeddings must give .*\(40, D\).*shape \(41, 16\)"):
        build(item_embeddings="item_embeddings")  # the whole table, padding row included
    with pytest.raises(ValueError, match="null_embedding"):
        build(null_embedding=lambda m: m.none_embedding.weight[:, :3])
    with pytest.raises(ValueError, match="betas must be 1-D"):
        build(betas=betas.view(3, 4))
    with pytest.raises(ValueError, match=r"betas must all lie in \(0, 1\)"):
        build(betas=torch.cat([betas, torch.ones(1)]))
    with pytest.raises(ValueError, match=r"betas must all lie in \(0, 1\)"):
        build(betas=[0.0] + betas.tolist())
    with pytest.raises(TypeError, match="encode must take the module as its first argument"):
        build(encode=lambda s, k: model.cacu_h(s, k, 0.0))  # would pin the live module into the frozen copy
    with pytest.raises(ValueError, match="pad must be"):
        build(pad="middle")
    with pytest.raises(ValueError, match="pad_id 3 is an item's id"):
        build(pad_id=3)
    with pytest.raises(ValueError, match="has no attribute 'encoder'"):
        build(encode="encoder")
    policy = build(encode=lambda m, s, k: m.cacu_h(s, k, 0.0)[:, :4])
    ep = episode(data)
    with pytest.raises(ValueError, match=r"encode must return the \(6, 16\) guidance"):
        policy.sample(ep.users, ep.inputs)


def test_checkpoints_name_the_outside_model_and_refuse_to_rebuild_it(data):
    _, _, policy = make(data.n_items, denoise="forward")
    state = policy.state()
    cfg = state["model"]["config"]
    assert cfg["outside"].endswith("Tenc") and cfg["max_len"] == STATE and cfg["pad"] == "right"
    assert cfg["parts"]["denoise"] == "module.forward" and cfg["parts"]["null_embedding"] == "module.none_embedding"
    assert set(state["model"]["state_dict"]) == {"denoiser." + k for k in policy.outside.state_dict()}
    assert state["diffusion"]["custom_betas"] == pytest.approx(diffusion(STEPS, 1e-4, 0.2, W).betas.tolist())
    with pytest.raises(ValueError, match="outside_state_dict"):
        type(policy).from_state(state)
