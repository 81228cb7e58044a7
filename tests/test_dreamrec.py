"""DreamRec: the encoder, guidance, the sampler and its log-probability, against step-by-step references."""

import math

import pytest
import torch

import refit_kernels as rk
from refit.diffusion import DiffusionConfig, GaussianDiffusion, betas_for
from refit.families.dreamrec.network import DreamRec
from refit.families.dreamrec.pretrain import DreamRecConfig
from refit.families.dreamrec.recommender import SeqRecommender

N_ITEMS, D, L = 30, 16, 6


def make(steps=12, schedule="ddpm-linear", w=2.0, diffuser="mlp1", seed=0, heads=1):
    torch.manual_seed(seed)
    model = DreamRec(N_ITEMS, hidden=D, max_len=L, dropout=0.1, heads=heads, diffuser=diffuser).eval()
    # Non-trivial layer-norm biases and weights, as after training.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    diffusion = GaussianDiffusion(DiffusionConfig(mean_type="x0", steps=steps, noise_schedule=schedule,
                                                  timestep_sampling="uniform"))
    return SeqRecommender(model, diffusion, w=w)


def histories(B=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, L
    hist = torch.full((B, L), N_ITEMS, dtype=torch.long)
    for b in range(B):
        hist[b, :lengths[b]] = torch.randperm(N_ITEMS, generator=g)[:lengths[b]]
    return hist, lengths


def reference_encode(m: DreamRec, states, lengths):
    """DreamRec's published encoder, operation by operation (eval mode: no dropout)."""
    n = m.n_items
    seq = m.item_embeddings(states) + m.positions(torch.arange(states.shape[1]))
    mask = torch.ne(states, n).float().unsqueeze(-1)
    seq = seq * mask
    queries = m.ln_1(seq)
    keys = seq
    Q, K, V = m.q(queries), m.k(keys), m.v(keys)
    h = m.heads
    split = m.hidden // h
    Q_ = torch.cat(torch.split(Q, split, dim=2), dim=0)
    K_ = torch.cat(torch.split(K, split, dim=2), dim=0)
    V_ = torch.cat(torch.split(V, split, dim=2), dim=0)
    out = torch.bmm(Q_, K_.transpose(1, 2)) / m.hidden ** 0.5
    key_mask = torch.sign(torch.abs(keys.sum(dim=-1))).repeat(h, 1).unsqueeze(1).repeat(1, queries.shape[1], 1)
    out = torch.where(torch.eq(key_mask, 0), torch.ones_like(out) * (-2 ** 32 + 1), out)
    tril = torch.tril(torch.ones_like(out[0])).unsqueeze(0).repeat(out.shape[0], 1, 1)
    out = torch.where(torch.eq(tril, 0), torch.ones_like(out) * (-2 ** 32 + 1), out)
    out = torch.softmax(out, dim=-1)
    query_mask = torch.sign(torch.abs(queries.sum(dim=-1))).repeat(h, 1).unsqueeze(-1).repeat(1, 1, keys.shape[1])
    out = torch.bmm(out * query_mask, V_)
    att = torch.cat(torch.split(out, out.shape[0] // h, dim=0), dim=2) + queries
    x = m.ln_2(att)
    ff = m.ff_norm(m.ff_2(torch.relu(m.ff_1(x))) + x)
    ff = m.ln_3(ff * mask)
    idx = (lengths.clamp(min=1) - 1)
    return ff[torch.arange(states.shape[0]), idx]


@pytest.mark.parametrize("heads", [1, 2])
def test_encoder_matches_dreamrecs_operations(heads):
    rec = make(heads=heads)
    hist, lengths = histories()
    with torch.no_grad():
        torch.testing.assert_close(rec.model.encode(hist, lengths), reference_encode(rec.model, hist, lengths),
                                   rtol=1e-5, atol=1e-5)


def test_padding_and_later_items_do_not_change_the_guidance():
    rec = make()
    hist, lengths = histories()
    with torch.no_grad():
        h = rec.model.encode(hist, lengths)
        shorter = hist.clone()
        b = 1  # a full window: drop its last item; the guidance of the prefix is the position before
        shorter[b, L - 1] = N_ITEMS
        h_short = rec.model.encode(shorter, lengths - (torch.arange(len(lengths)) == b).long())
        full_out = rec.model.encode(hist[b:b + 1], torch.tensor([L - 1]))  # the causal output at L-2
        torch.testing.assert_close(h_short[b], full_out[0], rtol=1e-5, atol=1e-5)
        others = torch.arange(len(lengths)) != b
        torch.testing.assert_close(h_short[others], h[others])


def test_guidance_at_w_zero_is_the_conditional_model():
    rec = make(w=0.0)
    hist, lengths = histories()
    with torch.no_grad():
        h = rec.guidance(hist, lengths)
        x, t = torch.randn(len(lengths), D), torch.randint(0, 12, (len(lengths),))
        torch.testing.assert_close(rec.denoiser(h)(x, t), rec.model.denoise(x, h, t))
        w2 = SeqRecommender(rec.model, rec.diffusion, w=2.0)
        null = rec.model.none_embedding.expand_as(h)
        want = 3.0 * rec.model.denoise(x, h, t) - 2.0 * rec.model.denoise(x, null, t)
        torch.testing.assert_close(w2.denoiser(h)(x, t), want, rtol=1e-5, atol=1e-5)


def reference_sample(rec: SeqRecommender, h, generator):
    """DreamRec's p_sample loop with float64 schedule constants."""
    betas = torch.tensor(betas_for(rec.diffusion.config), dtype=torch.float64)
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    coef1 = betas * ac_prev.sqrt() / (1 - ac)
    coef2 = (1 - ac_prev) * alphas.sqrt() / (1 - ac)
    var = betas * (1 - ac_prev) / (1 - ac)
    m, w = rec.model, rec.w
    x = torch.randn(h.shape, generator=generator)
    for n in reversed(range(rec.diffusion.steps)):
        t = torch.full((h.shape[0],), n, dtype=torch.long)
        x0 = (1 + w) * m.denoise(x, h, t) - w * m.denoise(x, m.none_embedding.expand_as(h), t)
        mean = float(coef1[n]) * x0 + float(coef2[n]) * x
        x = mean if n == 0 else mean + math.sqrt(float(var[n])) * torch.randn(x.shape, generator=generator)
    return x


@pytest.mark.parametrize("schedule", ["ddpm-linear", "ddpm-cosine", "exp"])
@pytest.mark.parametrize("diffuser", ["mlp1", "mlp2"])
def test_sampler_matches_the_step_by_step_reference(schedule, diffuser):
    rec = make(schedule=schedule, diffuser=diffuser)
    hist, lengths = histories()
    with torch.no_grad():
        h = rec.guidance(hist, lengths)
        want = reference_sample(rec, h, torch.Generator().manual_seed(5))
        got = rec.sample_from(h, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # generate() folds the linear denoiser's algebra (mlp1) or samples step by step (mlp2).
        gen = rec.generate(hist, lengths, torch.Generator().manual_seed(5))
        torch.testing.assert_close(gen, want, rtol=1e-4, atol=1e-4)
        traj = rec.sample_from(h, generator=torch.Generator().manual_seed(5), return_trajectory=True)
        torch.testing.assert_close(traj.final, got)
        assert traj.states.shape == (rec.diffusion.steps, len(lengths), D)


def test_trajectory_log_probability_equals_gaussian_logprob():
    rec = make(steps=9)
    hist, lengths = histories()
    with torch.no_grad():
        h = rec.guidance(hist, lengths)
        traj = rec.sample_from(h, generator=torch.Generator().manual_seed(3), return_trajectory=True)
    S = traj.preds.shape[0]
    want = torch.zeros(len(lengths), dtype=torch.float64)
    for s in range(S):
        mean = traj.coef_pred[s].double() * traj.preds[s].double() + traj.coef_x[s].double() * traj.states[s].double()
        var = math.exp(float(traj.log_var[s]))
        want += (-0.5 * ((traj.states[s + 1].double() - mean) ** 2 / var + math.log(2 * math.pi * var))).sum(1)
    for backend in ("reference", None):
        got = rk.gaussian_logprob(traj.preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var,
                                  backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    # The preds are the guided predictions along the path: re-evaluating them with gradient gives the same.
    again = torch.stack([rec.denoiser(h)(traj.states[s], traj.timesteps[s].expand(len(lengths))) for s in range(S)])
    torch.testing.assert_close(again, traj.preds, rtol=1e-5, atol=1e-5)


def test_state_round_trip_and_bad_settings():
    rec = make()
    again = SeqRecommender.from_state(rec.state())
    hist, lengths = histories()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(again.scores(hist, lengths, g1), rec.scores(hist, lengths, g2))
    with pytest.raises(ValueError, match="diffuser"):
        DreamRec(10, diffuser="mlp9")
    with pytest.raises(ValueError, match="max_len"):
        rec.model.encode(torch.zeros(2, L + 1, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="noise_schedule"):
        DreamRecConfig(noise_schedule="linear-var")
    with pytest.raises(ValueError, match="w"):
        SeqRecommender(rec.model, rec.diffusion, w=-1.0)


def test_respaced_sampling_is_the_exact_coarse_posterior():
    rec = make(steps=20)
    hist, lengths = histories()
    # All steps kept: the same process.
    full = SeqRecommender(rec.model, rec.diffusion, w=rec.w, eval_steps=20)
    assert full.eval_steps is None
    torch.testing.assert_close(full.generate(hist, lengths, torch.Generator().manual_seed(2)),
                               rec.generate(hist, lengths, torch.Generator().manual_seed(2)))
    coarse = rec.diffusion.respaced(5)
    assert coarse.steps == 5 and coarse.timestep_map.tolist() == [0, 5, 10, 14, 19]
    # Same cumulative alphas at the kept timesteps, so q(x_tau | x0) is unchanged.
    torch.testing.assert_close(coarse.alphas_cumprod, rec.diffusion.alphas_cumprod[coarse.timestep_map])
    fast = SeqRecommender(rec.model, rec.diffusion, w=rec.w, eval_steps=5)
    with torch.no_grad():
        a = fast.generate(hist, lengths, torch.Generator().manual_seed(4), fast=True)
        b = fast.generate(hist, lengths, torch.Generator().manual_seed(4), fast=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The coarse trajectory calls the model with the original timesteps.
    h = rec.guidance(hist, lengths)
    seen = []
    coarse.sample(lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x), torch.zeros(2, D), noise=True)
    assert seen == [19, 14, 10, 5, 0]
    with pytest.raises(ValueError, match="steps"):
        rec.diffusion.respaced(0)
    del h


@pytest.mark.parametrize("detach", [False, True])
def test_the_target_embedding_is_trained_only_without_detach_target(detach):
    from refit.families.dreamrec.losses import dreamrec_loss

    rec = make()
    rec.model.detach_target = detach
    hist = torch.full((3, L), N_ITEMS, dtype=torch.long)
    hist[:, :2] = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lengths = torch.full((3,), 2)
    targets = torch.tensor([10, 11, 12])  # in no history
    rec.model.zero_grad()
    dreamrec_loss(rec, hist, lengths, targets, torch.Generator().manual_seed(0)).sum().backward()
    grad = rec.model.item_embeddings.weight.grad
    assert float(grad[:6].abs().sum()) > 0  # the histories' embeddings learn through the guidance
    assert (float(grad[10:13].abs().sum()) == 0) == detach
    assert rec.model.config()["detach_target"] == detach
