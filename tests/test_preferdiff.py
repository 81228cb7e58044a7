"""PreferDiff: its loss by hand and against its published code's operations, the encoder and denoiser
against that code's step-by-step forward, the DDIM sampler's limits, checkpoints, resume, and fine-tuning
through the diffusion-policy protocol (library and command line)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from _testing import TINY_SEQ, benchmark_module
from refit.data import load_dataset
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.families.dreamrec.network import step_embedding
from refit.families.dreamrec.preferdiff import PreferDiff
from refit.runtime.runs import load_checkpoint
from refit.families.dreamrec.pretrain import PreferDiffConfig, load_seq_recommender, pretrain_dreamrec
from refit.families.dreamrec.recommender import SeqRecommender
from refit.families.dreamrec.losses import preference_term, preferdiff_loss, reconstruction_error

N_ITEMS, D, L = 30, 16, 6
SEQ = TINY_SEQ
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(data="synthetic-seq", data_options=SEQ, hidden=16, steps=30, eval_steps=6, batch_size=32,
             eval_every=1, eval_batch_size=64, progress=False, lr=1e-3, ks=(10, 20))


def make(steps=40, w=2.0, heads=2, seed=0, **loss):
    torch.manual_seed(seed)
    model = PreferDiff(N_ITEMS, hidden=D, max_len=L, dropout=0.1, heads=heads, **loss).eval()
    with torch.no_grad():  # non-trivial layer-norm weights and biases, as after training
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    diffusion = GaussianDiffusion(DiffusionConfig(mean_type="x0", steps=steps, noise_schedule="ddpm-linear",
                                                  timestep_sampling="uniform"))
    return SeqRecommender(model, diffusion, w=w)


def histories(B=7, seed=1, min_len=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(min_len, 0), L + 1, (B,), generator=g)
    lengths[0], lengths[1] = max(min_len, 0), L
    hist = torch.full((B, L), N_ITEMS, dtype=torch.long)
    for b in range(B):
        hist[b, :lengths[b]] = torch.randperm(N_ITEMS, generator=g)[:lengths[b]]
    return hist, lengths


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# --- the loss, by hand ----------------------------------------------------------------------------

def test_cosine_reconstruction_by_hand():
    pred = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 2.0]])
    x0 = torch.tensor([[1.0, 1.0], [-3.0, 0.0], [0.0, 0.5], [2.0, 4.0]])
    # cos = 1/sqrt(2), -1, 1, 1: (cos - 1)^2, whatever the norms
    want = [(1 / math.sqrt(2) - 1) ** 2, 4.0, 0.0, 0.0]
    assert reconstruction_error(pred, x0, "cosine").tolist() == pytest.approx(want, abs=1e-6)
    # mse: the mean over the dimensions
    assert reconstruction_error(pred, x0, "mse").tolist() == pytest.approx([0.5, 12.5, 3.125, 2.5])
    # PreferDiff's cosine_loss (diffusion.py l. 196-210) is the batch mean of the same rows
    pn, gn = F.normalize(pred, p=2, dim=1), F.normalize(x0, p=2, dim=1)
    assert float(torch.mean(((pn * gn).sum(1) - 1) ** 2)) == pytest.approx(sum(want) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="reconstruction"):
        reconstruction_error(pred, x0, "l1")


def test_preference_term_by_hand():
    pos = torch.tensor([0.2, 0.5], requires_grad=True)
    neg = torch.tensor([0.6, 0.1], requires_grad=True)
    # row pairing: softplus(5 (pos - neg)) = -log sigmoid(-5 (pos - neg)): softplus(-2), softplus(2)
    row = preference_term(pos, neg, 5.0, "row")
    assert row.tolist() == pytest.approx([math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))], rel=1e-6)
    assert row.tolist() == pytest.approx([0.126928, 2.126928], abs=1e-6)
    # batch pairing: the batch means 0.35 and 0.35 differ by 0: every row carries softplus(0) = log 2,
    # and the mean's gradient is gamma * sigmoid(0) / B = 1.25 toward pos, -1.25 toward neg
    batch = preference_term(pos, neg, 5.0, "batch")
    assert batch.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-6)
    batch.mean().backward()
    assert pos.grad.tolist() == pytest.approx([1.25, 1.25]) and neg.grad.tolist() == pytest.approx([-1.25, -1.25])
    # ... exactly the gradient of PreferDiff's scalar -log sigmoid(-gamma (mean(pos) - mean(neg)))
    p2, n2 = torch.tensor([0.3, 0.9, 0.1], requires_grad=True), torch.tensor([0.2, 0.4, 0.8], requires_grad=True)
    preference_term(p2, n2, 5.0, "batch").mean().backward()
    p3, n3 = p2.detach().clone().requires_grad_(), n2.detach().clone().requires_grad_()
    want = -F.logsigmoid(-5.0 * (p3.mean() - n3.mean()))
    want.backward()
    got = preference_term(p2.detach(), n2.detach(), 5.0, "batch")
    assert got.tolist() == pytest.approx([want.item()] * 3, rel=1e-6)
    torch.testing.assert_close(p2.grad, p3.grad)
    torch.testing.assert_close(n2.grad, n3.grad)
    with pytest.raises(ValueError, match="pairing"):
        preference_term(pos, neg, 5.0, "pairs")


def test_negatives_are_the_other_targets_of_the_batch():
    from refit.families.dreamrec.losses import _negative_embeddings

    rec = make()
    E = rec.model.item_embeddings.weight
    targets = torch.tensor([3, 7, 3, 11])
    neg = _negative_embeddings(rec.model, targets, None, detach=True)
    for i in range(4):  # by position, as PreferDiff's in_batch_negative_sampling: a repeated item stays
        others = [targets[j] for j in range(4) if j != i]
        torch.testing.assert_close(neg[i], E[torch.stack(others)].mean(0))
    rec.model.negatives = 2  # k of the others, drawn per row without replacement
    big = torch.arange(12)
    got = _negative_embeddings(rec.model, big, torch.Generator().manual_seed(0), detach=True)
    pick = torch.rand((12, 11), generator=torch.Generator().manual_seed(0)).argsort(dim=1)[:, :2]
    pick = pick + (pick >= torch.arange(12)[:, None]).long()
    assert not (pick == torch.arange(12)[:, None]).any() and (pick[:, 0] != pick[:, 1]).all()
    torch.testing.assert_close(got, E[big[pick]].mean(1))
    assert _negative_embeddings(rec.model, torch.tensor([3]), None, detach=True) is None


def test_a_hand_made_loss():
    """A 2-row batch with a denoiser that predicts fixed embeddings: every term by hand."""
    rec = make(steps=10, lamda=0.4, gamma=5.0)
    m = rec.model
    m.p_uncond = 0.0
    with torch.no_grad():
        m.item_embeddings.weight.zero_()
        m.item_embeddings.weight[1] = torch.tensor([1.0, 0.0] + [0.0] * (D - 2))  # target of row 0
        m.item_embeddings.weight[2] = torch.tensor([0.0, 1.0] + [0.0] * (D - 2))  # target of row 1
        m.diffuser[0].weight.zero_()
        m.diffuser[0].bias.copy_(torch.tensor([1.0, 1.0] + [0.0] * (D - 2)))  # x0_hat = (1, 1, 0, ..) always
    hist, lengths = histories(B=2, min_len=1)
    loss = preferdiff_loss(rec, hist, lengths, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    # pos errors: (cos45 - 1)^2 for both rows; each row's negative is the other's target: the same error,
    # so the preference term is softplus(0) = log 2 (batch and row pairing alike)
    e = (1 / math.sqrt(2) - 1) ** 2
    assert loss.tolist() == pytest.approx([0.4 * e + 0.6 * math.log(2)] * 2, rel=1e-5)
    m.pairing, m.lamda = "row", 1.0  # lamda 1: the reconstruction alone
    loss = preferdiff_loss(rec, hist, lengths, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert loss.tolist() == pytest.approx([e, e], rel=1e-5)


# --- the network and the loss against PreferDiff's published operations -----------------------------

def reference_encode(m: PreferDiff, states, lengths):
    """PreferDiff's SASRec.get_representation with one TransformerEncoder (modules.py l. 40-147), op by op
    (eval mode; padding is the id n_items here, 0 there; its FFN is a 1x1 Conv1d)."""
    n, hidden, h = m.n_items, m.hidden, m.heads
    inputs_emb = m.item_embeddings(states) + m.positions(torch.arange(states.shape[1]))
    seq = inputs_emb  # emb_dropout
    mask = torch.ne(states, n).float().unsqueeze(-1)
    # TransformerEncoder.forward
    seq = seq * mask
    queries = m.ln_1(seq)
    keys = seq
    Q, K, V = m.q(queries), m.k(keys), m.v(keys)
    split = hidden // h
    Q_ = torch.cat(torch.split(Q, split, dim=2), dim=0)
    K_ = torch.cat(torch.split(K, split, dim=2), dim=0)
    V_ = torch.cat(torch.split(V, split, dim=2), dim=0)
    out = torch.bmm(Q_, K_.transpose(1, 2)) / hidden ** 0.5
    key_mask = torch.sign(torch.abs(keys.sum(dim=-1))).repeat(h, 1).unsqueeze(1).repeat(1, queries.shape[1], 1)
    out = torch.where(torch.eq(key_mask, 0), torch.ones_like(out) * (-2 ** 32 + 1), out)
    tril = torch.tril(torch.ones_like(out[0, :, :])).unsqueeze(0).repeat(out.shape[0], 1, 1)
    out = torch.where(torch.eq(tril, 0), torch.ones_like(tril) * (-2 ** 32 + 1), out)
    out = torch.softmax(out, dim=-1)
    query_mask = torch.sign(torch.abs(queries.sum(dim=-1))).repeat(h, 1).unsqueeze(-1).repeat(1, 1, keys.shape[1])
    out = torch.bmm(out * query_mask, V_)
    mh_attn_out = torch.cat(torch.split(out, out.shape[0] // h, dim=0), dim=2) + queries
    seq = seq + mh_attn_out
    x = m.ln_2(seq)  # PositionwiseFeedForward(ln_2(seq))
    ff = F.conv1d(x.transpose(1, 2), m.ff_1.weight.unsqueeze(-1), m.ff_1.bias)
    ff = F.conv1d(F.relu(ff), m.ff_2.weight.unsqueeze(-1), m.ff_2.bias).transpose(1, 2)
    ff_out = m.ff_norm(ff + x)
    ff_out = ff_out * mask
    seq = seq + ff_out
    seq = m.ln_3(seq)
    idx = lengths - 1  # extract_axis_1(seq, seq_lengths - 1)
    return torch.stack([seq[i, idx[i], :] for i in range(seq.shape[0])], dim=0)


def reference_denoise(m: PreferDiff, x, h, t):
    """PreferDiff.denoise (_model.py l. 95-98): step_nn = Sinusoidal, Linear, GELU, Linear; denoise_nn one Linear."""
    half = m.hidden // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    emb = t[:, None] * freqs[None, :]
    emb = torch.cat((emb.sin(), emb.cos()), dim=-1)
    step = m.step_mlp[2](F.gelu(m.step_mlp[0](emb)))
    return F.linear(torch.cat((x, h, step), dim=1), m.diffuser[0].weight, m.diffuser[0].bias)


@pytest.mark.parametrize("heads", [1, 2])
def test_encoder_and_denoiser_match_preferdiffs_operations(heads):
    rec = make(heads=heads)
    m = rec.model
    hist, lengths = histories(min_len=1)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(hist, lengths), reference_encode(m, hist, lengths), rtol=1e-5, atol=1e-5)
        x, h = torch.randn(len(lengths), D), m.encode(hist, lengths)
        t = torch.randint(0, 40, (len(lengths),))
        torch.testing.assert_close(m.denoise(x, h, t), reference_denoise(m, x, h, t), rtol=1e-5, atol=1e-5)
        # guidance: (1 + w) denoise(x, h, t) - w denoise_uncon(x, t) (diffusion.py l. 65)
        null = m.none_embedding.expand_as(h)
        want = 3.0 * reference_denoise(m, x, h, t) - 2.0 * reference_denoise(m, x, null, t)
        torch.testing.assert_close(rec.denoiser(h)(x, t), want, rtol=1e-5, atol=1e-5)
        # items are scored by the inner product (PreferDiff.predict, l. 122), the padding row left out
        torch.testing.assert_close(m.item_scores(x), x @ m.item_embeddings.weight[:N_ITEMS].t())
    assert step_embedding(t, D).shape == (len(lengths), D)


def test_preferdiff_wiring_differs_from_dreamrecs_and_its_init_is_xavier():
    from refit.families.dreamrec.network import DreamRec

    rec = make()
    twin = DreamRec(N_ITEMS, hidden=D, max_len=L, heads=2).eval()
    twin.load_state_dict(rec.model.state_dict())  # the same parameters by name and shape ...
    hist, lengths = histories(min_len=1)
    with torch.no_grad():  # ... wired differently (two more residuals)
        assert not torch.allclose(twin.encode(hist, lengths), rec.model.encode(hist, lengths), atol=1e-3)
    torch.manual_seed(3)
    fresh = PreferDiff(N_ITEMS, hidden=64)
    bound = math.sqrt(6.0 / (64 + 64))
    for lin in (fresh.q, fresh.k, fresh.v):
        top = float(lin.weight.detach().abs().max())
        assert 0.9 * bound < top <= bound and float(lin.bias.detach().abs().max()) == 0.0


def reference_p_losses(rec: SeqRecommender, hist, lengths, labels, generator):
    """PreferDiff.forward + PreferenceDiffusion.p_losses (mode 'neg', sample_func 'batch'), op by op, with
    the random draws taken from ``generator`` in refit's order (guidance drop, t, noise, negative's noise)."""
    m, d, cfg = rec.model, rec.diffusion, rec.model
    B = labels.shape[0]
    state_hidden = reference_encode(m, hist, lengths)
    # _generate_negative_samples: in_batch_negative_sampling
    expanded = labels.unsqueeze(0).repeat(B, 1)
    labels_neg = expanded[~torch.eye(B, dtype=torch.bool)].view(B, B - 1)
    x_start = m.item_embeddings(labels)
    x_start_neg = m.item_embeddings(labels_neg)
    # calcu_h: keep where rand > p (refit keeps rand >= p; equal with probability 0)
    keep = (torch.rand((B, 1), generator=generator) >= cfg.p_uncond).float()
    h = state_hidden * keep + m.none_embedding[None, :] * (1 - keep)
    t = torch.randint(0, d.steps, (B,), generator=generator)
    noise = torch.randn((B, m.hidden), generator=generator)
    x_start_neg = torch.mean(x_start_neg, dim=1)
    sa = d.sqrt_alphas_cumprod.float()[t][:, None]
    s1 = d.sqrt_one_minus_alphas_cumprod.float()[t][:, None]
    x_noisy_pos = sa * x_start + s1 * noise
    x_noisy_neg = sa * x_start_neg + s1 * torch.randn((B, m.hidden), generator=generator)
    predicted_x_pos = reference_denoise(m, x_noisy_pos, h, t)
    predicted_x_neg = reference_denoise(m, x_noisy_neg, h, t)

    def cosine_loss(pred_matrix, gt_matrix):
        dot = torch.sum(F.normalize(pred_matrix, p=2, dim=1) * F.normalize(gt_matrix, p=2, dim=1), dim=1)
        return torch.mean((dot - 1) ** 2)

    loss_pos = cosine_loss(x_start, predicted_x_pos)
    loss_neg = cosine_loss(x_start_neg, predicted_x_neg)
    model_diff = loss_pos - loss_neg
    return -(1 - cfg.lamda) * F.logsigmoid(-cfg.gamma * model_diff + 1e-8) + loss_pos * cfg.lamda


def test_loss_matches_preferdiffs_p_losses_value_and_gradient():
    rec = make(steps=50)
    hist, lengths = histories(B=9, seed=4, min_len=1)
    labels = torch.tensor([3, 7, 11, 3, 20, 25, 1, 0, 14])
    ours = preferdiff_loss(rec, hist, lengths, labels, torch.Generator().manual_seed(7)).mean()
    ours.backward()
    got = {n: p.grad.clone() for n, p in rec.model.named_parameters() if p.grad is not None}
    rec.model.zero_grad()
    want = reference_p_losses(rec, hist, lengths, labels, torch.Generator().manual_seed(7))
    want.backward()
    assert ours.item() == pytest.approx(want.item(), rel=1e-5)
    for n, p in rec.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert float(got["item_embeddings.weight"][labels].abs().sum()) > 0  # the targets train (detach_target off)


def test_row_pairing_rows_are_slices_of_the_global_batch():
    rec = make(steps=50, pairing="row", negatives=3)
    hist, lengths = histories(B=8, seed=2, min_len=1)
    labels = torch.tensor([3, 7, 11, 3, 20, 25, 1, 0])
    with torch.no_grad():
        full = preferdiff_loss(rec, hist, lengths, labels, torch.Generator().manual_seed(1))
        part = preferdiff_loss(rec, hist[3:6], lengths[3:6], labels[3:6], torch.Generator().manual_seed(1),
                               rows=(3, 8), batch_targets=labels)
    torch.testing.assert_close(part, full[3:6])
    with pytest.raises(ValueError, match="batch_targets"):
        preferdiff_loss(rec, hist[3:6], lengths[3:6], labels[3:6], rows=(3, 8))


# --- DDIM -----------------------------------------------------------------------------------------------

def test_ddim_eta0_is_deterministic_and_is_preferdiffs_sampler():
    rec = make(steps=2000)
    d = rec.diffusion.respaced(21)
    # PreferDiff's 21 steps of ddim_step 100 read the cumulative alphas at 0, 99, 199, .., 1999 and call the
    # model with 0, 100, .., 2000; refit's even respacing keeps (and calls the model with) these:
    assert d.timestep_map.tolist() == list(range(0, 1001, 100)) + list(range(1099, 2000, 100))
    hist, lengths = histories(min_len=1)
    with torch.no_grad():
        h = rec.guidance(hist, lengths)
        x_T = torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
        f = rec.denoiser(h)
        a = d.sample(f, x_T, noise=True, eta=0.0, generator=torch.Generator().manual_seed(1))
        b = d.sample(f, x_T, noise=True, eta=0.0, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)  # eta 0: the noise is never used
        # PreferDiff's i_sample loop (diffusion.py l. 43-79) over the same cumulative alphas
        ac = d.alphas_cumprod
        ac_prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
        coef1 = torch.sqrt(ac_prev) - torch.sqrt(1. - ac_prev) / torch.sqrt(1. / ac - 1)
        coef2 = torch.sqrt(1. - ac_prev) / torch.sqrt(1. - ac)
        x = x_T
        for n in reversed(range(21)):
            t = torch.full((h.shape[0],), int(d.timestep_map[n]), dtype=torch.long)
            x_start = (1 + rec.w) * rec.model.denoise(x, h, t) - rec.w * rec.model.denoise(
                x, rec.model.none_embedding.expand_as(h), t)
            x = float(coef1[n]) * x_start + float(coef2[n]) * x
        torch.testing.assert_close(a, x, rtol=1e-4, atol=1e-4)
        # the recommender's evaluation sampler: the folded one and the step-by-step one agree
        rec.set_eval_steps(21)
        rec.set_eval_eta(0.0)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        fast, slow = rec.generate(hist, lengths, g1, fast=True), rec.generate(hist, lengths, g2, fast=False)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
        assert torch.equal(g1.get_state(), g2.get_state())  # both drew x_T only
        want = d.sample(f, rec.start_noise(h.shape[0], torch.Generator().manual_seed(5)), noise=False, eta=0.0)
        torch.testing.assert_close(slow, want)


def test_ddim_at_all_steps_and_eta1_is_the_ancestral_sampler():
    rec = make(steps=30)
    d = rec.diffusion
    # the DDIM formula at eta = 1 gives the posterior's constants (step 0 has no noise either way)
    cp, cx, lv = d.step_constants(eta=1.0 + 1e-12)
    pcp, pcx, plv = d.step_constants()
    torch.testing.assert_close(cp, pcp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cx, pcx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lv[1:], plv[1:], rtol=1e-5, atol=1e-5)
    hist, lengths = histories()
    ancestral = SeqRecommender(rec.model, d, w=rec.w)  # DreamRec's evaluation: all T steps, posterior noise
    ddim1 = SeqRecommender(rec.model, d, w=rec.w, eval_steps=30, eval_eta=1.0)
    assert ddim1.eval_steps is None  # steps = T: the full schedule
    for fast in (True, False):
        torch.testing.assert_close(ddim1.generate(hist, lengths, torch.Generator().manual_seed(3), fast=fast),
                                   ancestral.generate(hist, lengths, torch.Generator().manual_seed(3), fast=fast))
    near = SeqRecommender(rec.model, d, w=rec.w, eval_eta=1.0 + 1e-12)
    torch.testing.assert_close(near.generate(hist, lengths, torch.Generator().manual_seed(3)),
                               ancestral.generate(hist, lengths, torch.Generator().manual_seed(3)),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval_eta"):
        rec.set_eval_eta(-0.5)


# --- configuration, checkpoints, resume -------------------------------------------------------------------

def test_defaults_are_preferdiffs_published_settings_and_bad_ones_are_refused():
    c = PreferDiffConfig()
    assert (c.hidden, c.heads, c.max_len, c.dropout, c.p_uncond, c.diffuser) == (3072, 2, 10, 0.1, 0.1, "mlp1")
    assert (c.steps, c.noise_schedule, c.beta_start, c.beta_end) == (2000, "ddpm-linear", 1e-4, 0.02)
    assert (c.lamda, c.gamma, c.reconstruction, c.pairing, c.negatives, c.detach_target) == (
        0.4, 5.0, "cosine", "batch", None, False)
    assert (c.w, c.eval_steps, c.eval_eta) == (2.0, 21, 0.0)
    assert (c.lr, c.weight_decay, c.batch_size, c.epochs, c.eval_every, c.patience) == (1e-4, 0.0, 256, 150, 1, 10)
    for kw, match in [(dict(lamda=1.5), "lamda"), (dict(gamma=0.0), "gamma"), (dict(gamma=math.nan), "gamma"),
                      (dict(reconstruction="l1"), "reconstruction"), (dict(pairing="pair"), "pairing"),
                      (dict(negatives=0), "negatives"), (dict(eval_eta=-1.0), "eval_eta"),
                      (dict(eval_steps=3000), "eval_steps"), (dict(model="dreamrec"), "model")]:
        with pytest.raises(ValueError, match=match):
            PreferDiffConfig(**kw)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic-seq", **SEQ)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("preferdiff") / "run"
    summary = pretrain_dreamrec(PreferDiffConfig(**SMALL, epochs=3, out=str(out)), data)
    return str(out / "best.pt"), summary


def test_checkpoint_loads_as_a_policy_through_the_dreamrec_path(pretrained, data):
    from refit.families.dreamrec.recommender import evaluate_dreamrec
    from refit.posttrain.run import load_policy

    path, s = pretrained
    state = load_checkpoint(path)
    assert state["recommender"]["model"]["name"] == "dreamrec"  # the family every loader dispatches on
    assert state["recommender"]["model"]["network"] == "preferdiff"
    assert state["recommender"]["inference"]["eval_eta"] == 0.0
    rec, _, _ = load_seq_recommender(path, data)
    assert isinstance(rec.model, PreferDiff) and rec.network == "preferdiff"
    assert (rec.eval_steps, rec.eval_eta) == (6, 0.0) and rec.model.config()["pairing"] == "batch"
    again = evaluate_dreamrec(rec, data, ks=(10, 20), batch_size=64, seed=1)
    assert again["valid"] == s["valid"] and again["test"] == s["test"]
    policy, _, _ = load_policy(path, data)
    assert isinstance(policy.model, PreferDiff)


def test_resume_continues_to_the_same_parameters(tmp_path, data):
    cfg = dict(SMALL, epochs=3)
    pretrain_dreamrec(PreferDiffConfig(**cfg, out=str(tmp_path / "full")), data)
    pretrain_dreamrec(PreferDiffConfig(**{**cfg, "epochs": 1}, out=str(tmp_path / "part")), data)
    pretrain_dreamrec(PreferDiffConfig(**cfg, out=str(tmp_path / "part")), data, resume=True)
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "part" / "last.pt"))
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["recommender"]["model"]["state_dict"].items():
        assert torch.equal(v, b["recommender"]["model"]["state_dict"][k]), k
    with pytest.raises(ValueError, match="other settings"):
        pretrain_dreamrec(PreferDiffConfig(**{**cfg, "lamda": 0.5}, out=str(tmp_path / "part")), data, resume=True)


# --- fine-tuning through the protocol ------------------------------------------------------------------

def test_the_backbone_passes_check_policy_and_its_protocol_losses(pretrained, data):
    from refit.policy import check_policy
    from refit.reward import sequence_episode

    rec, _, _ = load_seq_recommender(pretrained[0], data)
    check_policy(rec, data)
    rec.model.eval()  # dropout off: two calls with the same generator draw the same
    ep = sequence_episode(data, data.targets["train"][torch.arange(6)])
    per_row = rec.pretraining_loss(ep, generator=torch.Generator().manual_seed(0))
    hist, lengths = ep.inputs
    want = preferdiff_loss(rec, hist, lengths, ep.positives.indices, torch.Generator().manual_seed(0))
    assert per_row.shape == (6,) and torch.isfinite(per_row).all()
    torch.testing.assert_close(per_row, want)
    x0 = torch.randn(6, rec.model.hidden)
    loss = rec.denoising_loss(ep.users, ep.inputs, x0, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and (loss >= 0).all() and (loss <= 4).all()  # a cosine error
    # the cosine error does not see the target's norm (the noisy state does: compare at the same draws)
    d = rec.diffusion
    g = torch.Generator().manual_seed(0)
    h = rec.guidance(hist, lengths)
    t, _ = d.sample_timesteps(6, generator=g)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    pred = rec.model.guided(x_t, h, t, rec.w)
    torch.testing.assert_close(loss, reconstruction_error(pred, x0, "cosine"))


@pytest.mark.parametrize("method", ["reward-weighted", "nft"])
def test_other_methods_fine_tune_it_from_the_library(pretrained, data, tmp_path, method):
    from refit.posttrain.config import FinetuneConfig
    from refit.posttrain.run import finetune

    s = finetune(FinetuneConfig(checkpoint=pretrained[0], method=method, group_size=2, iterations=2, batch_size=8,
                                eval_every=2, out=str(tmp_path / "ft"), progress=False, plot=False, probe_size=0,
                                eval_batch_size=64, ks=(10, 20)), data)
    assert s["status"] == "finished"
    state = load_checkpoint(str(tmp_path / "ft" / "last.pt"))
    assert state["recommender"]["model"]["network"] == "preferdiff"


def test_cli_pretrains_and_fine_tunes_preferdiff(tmp_path):
    pre = subprocess.run([sys.executable, "-m", "refit", "-q", "pretrain", "--model", "preferdiff", "--data",
                          "synthetic-seq", "--epochs", "1", "--hidden", "16", "--steps", "30", "--eval-steps", "5",
                          "--batch-size", "128", "--lamda", "0.5", "--pairing", "row", "--out", "run"],
                         capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert pre.returncode == 0, pre.stderr
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert (config["model"], config["hidden"], config["heads"], config["lamda"], config["pairing"]) == (
        "preferdiff", 16, 2, 0.5, "row")
    assert (config["w"], config["lr"], config["eval_eta"], config["detach_target"]) == (2.0, 1e-4, 0.0, False)
    ev = subprocess.run([sys.executable, "-m", "refit", "-q", "evaluate", "--checkpoint", "run/best.pt",
                         "--protocol", "preferdiff", "--no-baselines"], capture_output=True, text=True, cwd=tmp_path,
                        env=_env(), timeout=600)
    assert ev.returncode == 0, ev.stderr
    assert "preferdiff on synthetic-seq" in ev.stdout and "DDIM, eta 0" in ev.stdout and "recall@5" in ev.stdout
    for method in (["--method", "reward-backprop"], ["--method", "grpo", "--group-size", "2"]):
        ft = subprocess.run([sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", "run/best.pt", *method,
                             "--iterations", "2", "--batch-size", "16", "--eval-every", "2", "--no-plot", "--out",
                             "ft-" + method[1]], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
        assert ft.returncode == 0, ft.stderr
        summary = json.load(open(tmp_path / ("ft-" + method[1]) / "summary.json"))
        assert summary["status"] == "finished"


def test_the_studys_continued_pretraining_continues_a_preferdiff_checkpoint(tmp_path):
    """benchmarks/studies/post_training_study.py's continued arm: the checkpoint's own network, loss and sampler
    settings (which --init must match) and its guidance weight, for a run made with non-default ones."""

    pre = subprocess.run([sys.executable, "-m", "refit", "-q", "pretrain", "--model", "preferdiff", "--data",
                          "synthetic-seq", "--epochs", "1", "--hidden", "16", "--heads", "1", "--steps", "30",
                          "--eval-steps", "5", "--batch-size", "128", "--lamda", "0.5", "--negatives", "1",
                          "--detach-target", "--lr", "1e-3", "--w-grid", "0,1", "--out", "run"],
                         capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert pre.returncode == 0, pre.stderr
    study = benchmark_module("studies.post_training_study")
    ckpt = str(tmp_path / "run" / "best.pt")
    state = study._load(ckpt)
    w = state["recommender"]["inference"]["w"]
    flags = study._loss_flags(state)
    cont = subprocess.run([sys.executable, "-m", "refit", "-q", "pretrain", "--model", "preferdiff",
                           *study._data_flags(state, ckpt), "--init", ckpt, "--epochs", "1", "--out", "cont", *flags],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert cont.returncode == 0, cont.stderr
    config = json.load(open(tmp_path / "cont" / "config.json"))
    assert (config["hidden"], config["heads"], config["lamda"], config["negatives"], config["detach_target"],
            config["lr"], config["eval_steps"]) == (16, 1, 0.5, 1, True, 1e-3, 5)
    assert config["w"] == w and config["w_grid"] is None
    assert load_checkpoint(str(tmp_path / "cont" / "best.pt"))["recommender"]["inference"]["w"] == w
