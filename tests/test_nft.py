"""Negative-aware fine-tuning (nft): the loss and its gradient, its limit cases, the weights, the old
policy, the update against a hand-built loss, the placebo, resume, the refusals, and both backbones
from the command line."""

import copy
import json
import math

import pytest
import torch

from _testing import TINY_SEQ, tiny_dreamrec
from refit.data import load_dataset
from refit.posttrain import METHOD_CLASSES, PostTrainingMethod
from refit.posttrain.nft import nft_loss, optimality
from refit.runtime.runs import load_checkpoint
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.run import finetune

SEQ = TINY_SEQ


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic-seq", **SEQ)


_policy = tiny_dreamrec


def _cfg(**kw):
    base = dict(method="nft", batch_size=16, group_size=4, reward="ndcg", lr=1e-2, grad_clip=1e9, seed=3,
                progress=False, plot=False, probe_size=0, nft_timesteps=3)
    base.update(kw)
    return FinetuneConfig(**base)


def _tensors(seed=0, S=3, B=5, D=7):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(S, B, D, generator=g, dtype=torch.float64)
    target = torch.randn(S, B, D, generator=g, dtype=torch.float64)
    r = torch.rand(B, generator=g, dtype=torch.float64)
    return old, target, r


def _grad(fn, pred):
    pred = pred.clone().requires_grad_(True)
    fn(pred).sum().backward()
    return pred.grad


def test_the_method_is_a_registered_strategy():
    assert issubclass(METHOD_CLASSES["nft"], PostTrainingMethod)
    from refit.posttrain.config import METHODS

    assert "nft" in METHODS


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_the_gradient_is_the_one_written_out(beta, adaptive):
    """d loss / d pred = [r * 2 (pos - y) / w_pos - (1 - r) * 2 (neg - y) / w_neg] / (S D): beta cancels."""
    old, y, r = _tensors()
    S, B, D = old.shape
    pred = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = _grad(lambda p: nft_loss(p, old, y, r, beta, adaptive=adaptive), pred)
    pos, neg = beta * pred + (1 - beta) * old, (1 + beta) * old - beta * pred
    w_pos = (pos - y).abs().mean(2, keepdim=True) if adaptive else 1.0
    w_neg = (neg - y).abs().mean(2, keepdim=True) if adaptive else 1.0
    want = (r[None, :, None] * 2 * (pos - y) / w_pos - (1 - r[None, :, None]) * 2 * (neg - y) / w_neg) / (S * D)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.1, 1e-3])
def test_at_the_old_policy_the_gradient_is_its_own_regression_signed_by_the_reward(beta):
    """pred = old: whatever beta, the gradient is that of the old policy's own regression loss toward the
    samples, each weighted by 2r - 1 (samples judged alike, r = 1/2, give nothing)."""
    old, y, r = _tensors(1)
    w = (old - y).abs().mean(2, keepdim=True)
    got = _grad(lambda p: nft_loss(p, old, y, r, beta), old)
    regression = _grad(lambda p: ((2 * r[None, :, None] - 1) * (p - y) ** 2 / w).mean(2).mean(0), old)
    torch.testing.assert_close(got, regression, rtol=1e-10, atol=1e-12)
    half = _grad(lambda p: nft_loss(p, old, y, torch.full_like(r, 0.5), beta), old)
    assert half.abs().max() < 1e-12


def test_as_beta_goes_to_zero_the_gradient_becomes_the_old_policys_regression():
    old, y, r = _tensors(2)
    pred = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = (old - y).abs().mean(2, keepdim=True)
    limit = ((2 * r[None, :, None] - 1) * 2 * (old - y) / w) / (old.shape[0] * old.shape[2])
    gaps = [float((_grad(lambda p: nft_loss(p, old, y, r, b), pred) - limit).abs().max()) for b in (1e-1, 1e-2, 1e-4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4 * gaps[0] * 1e2  # linear in beta
    assert gaps[2] < 1e-5
    # and beta is a trust region: with r = 1/2 the loss is beta |pred - old|^2 (mean) plus a constant
    flat = torch.full_like(r, 0.5)
    for beta in (0.5, 2.0):
        gap = nft_loss(pred, old, y, flat, beta, adaptive=False) - nft_loss(old, old, y, flat, beta, adaptive=False)
        torch.testing.assert_close(gap, beta * ((pred - old) ** 2).mean(2).mean(0), rtol=1e-10, atol=1e-12)


def test_rewards_become_weights_in_zero_one():
    reward = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0])
    r = optimality(reward, 4, "group", 5.0)
    assert r[:4].tolist() == [0.5] * 4  # a group judged alike
    centred = torch.tensor([0.0, 0, 0, 0, -1.5, -0.5, 0.5, 1.5], dtype=torch.float64)
    want = centred / centred.std(unbiased=False) / 5 / 2 + 0.5
    torch.testing.assert_close(r, want.float())
    clipped = optimality(reward, 4, "group", 0.5)
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    batch = optimality(reward, 4, "batch", 5.0)
    c = reward.double() - reward.double().mean()
    torch.testing.assert_close(batch, (c / c.std(unbiased=False) / 10 + 0.5).float())
    assert optimality(torch.ones(8), 4, "batch", 5.0).tolist() == [0.5] * 8


def test_the_update_is_the_gradient_of_the_loss_built_by_hand(data):
    """The same draws as the trainer's: the old policy (the start) samples, the rewards become weights,
    each sample is noised at the stratified timesteps, and the update follows nft_loss of the guided
    predictions."""
    policy = _policy(data)
    trainer = ReFiT(policy, data, _cfg())
    seen = {}
    trainer.optimizer.step = lambda: seen.update(
        {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None})
    stats = trainer.step()

    by_hand = _policy(data)
    twin = ReFiT(by_hand, data, _cfg())
    cfg = twin.config
    episode, lo, n = twin.draw()
    inputs, traj, reward = twin.rollout(episode, lo, n)  # the old policy is the start: the same samples
    assert float(reward.reward.mean()) == pytest.approx(stats["reward"])
    r = optimality(reward.reward, cfg.group_size, "group", cfg.nft_adv_clip)
    d = by_hand.diffusion
    S, T = cfg.nft_timesteps, d.steps
    u = torch.rand(S, generator=twin.generator, dtype=torch.float64)
    t = ((torch.arange(S) + u) * T / S).floor().long()
    assert all(s * T // S <= int(t[s]) < (s + 1) * T // S + 1 for s in range(S))
    x0 = traj.final
    h = by_hand.guidance(*inputs)
    preds, targets = [], []
    for s in range(S):
        noise = torch.randn(x0.shape, generator=twin.generator)
        ac = d.alphas_cumprod[t[s]]
        x_t = (ac.sqrt().float() * x0 + (1 - ac).sqrt().float() * noise)
        preds.append(by_hand.model.guided(x_t, h, torch.full((x0.shape[0],), int(t[s])), by_hand.w))
        targets.append(x0)
    pred = torch.stack(preds)
    loss = nft_loss(pred, pred.detach(), torch.stack(targets), r, cfg.nft_beta).mean()
    by_hand.module.zero_grad()
    loss.backward()
    assert seen and stats["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, p in by_hand.module.named_parameters():
        if name in seen:
            torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert seen["q.weight"].abs().sum() > 0  # the guidance encoder learns too


def test_the_old_policy_follows_by_its_moving_average(data):
    policy = _policy(data)
    start = copy.deepcopy(policy.module.state_dict())
    trainer = ReFiT(policy, data, _cfg(nft_ema=0.75))
    trainer.step()
    old = trainer.method.old.module.state_dict()
    moved = False
    for name, now in policy.module.state_dict().items():
        if now.is_floating_point():
            torch.testing.assert_close(old[name], 0.75 * start[name] + 0.25 * now, rtol=1e-6, atol=1e-7, msg=name)
            moved |= not torch.equal(now, start[name])
    assert moved
    # ema 0: the old policy is the trained one after every update
    trainer = ReFiT(_policy(data), data, _cfg(nft_ema=0.0))
    trainer.step()
    for name, now in trainer.policy.module.state_dict().items():
        assert torch.equal(trainer.method.old.module.state_dict()[name], now), name


def test_the_placebo_moves_the_weights_and_keeps_the_samples(data):
    stats = {}
    for placebo in (False, True):
        stats[placebo] = ReFiT(_policy(data), data, _cfg(placebo=placebo, batch_size=32)).step()
    assert stats[True]["reward"] == pytest.approx(stats[False]["reward"])  # the same samples and episodes
    assert stats[True]["r_std"] == pytest.approx(stats[False]["r_std"])  # the same weights, permuted
    # (at the start the loss's value does not depend on r: the positive and the negative are the old policy)
    assert stats[True]["grad_norm"] != pytest.approx(stats[False]["grad_norm"], rel=1e-3)


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(data, tmp_path):
    kw = dict(iterations=4, eval_every=2, checkpoint_every=2)
    finetune(_cfg(**kw, out=str(tmp_path / "a")), data, policy=_policy(data), max_iterations_this_run=2)
    resumed = _policy(data, seed=9)
    finetune(_cfg(**kw, out=str(tmp_path / "a")), data, policy=resumed, resume=True)
    whole = _policy(data)
    finetune(_cfg(**kw, out=str(tmp_path / "b")), data, policy=whole)
    for k, v in whole.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[k], v, rtol=0, atol=0, msg=k)
    state = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    assert set(state["trainer"]["method"]["old"]) == set(whole.module.state_dict())


@pytest.mark.parametrize("settings, message", [
    (dict(group_size=1), "group_size must be >= 2"),
    (dict(ppo_epochs=1), "ppo_epochs"),
    (dict(timestep_fraction=0.5), "timestep_fraction"),
    (dict(nft_beta=0.0), "nft_beta must be > 0"),
    (dict(nft_ema=1.0), r"nft_ema .* must be in \[0, 1\)"),
    (dict(nft_timesteps=0), "nft_timesteps must be an int >= 1"),
    (dict(nft_normalize="user"), "nft_normalize must be one of"),
    (dict(nft_adv_clip=-1.0), "nft_adv_clip must be > 0"),
    (dict(nft_beta=float("nan")), "nft_beta"),
])
def test_settings_that_do_not_apply_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**settings)


def test_batch_normalisation_takes_one_sample_per_episode(data):
    stats = ReFiT(_policy(data), data, _cfg(group_size=1, nft_normalize="batch")).step()
    assert math.isfinite(stats["loss"]) and stats["r_std"] > 0


def test_a_policy_without_a_noise_schedule_is_refused(data):
    class NoSchedule:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name in ("_inner", "diffusion"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    with pytest.raises(TypeError, match=r"nft needs NoSchedule.diffusion"):
        ReFiT(NoSchedule(_policy(data)), data, _cfg())
    with pytest.raises(ValueError, match="nft_timesteps is 9, more than the 8 timesteps"):
        ReFiT(_policy(data), data, _cfg(nft_timesteps=9))


@pytest.mark.parametrize("mean_type", ["x0", "eps"])
def test_a_row_model_fine_tunes_from_the_command_line(tmp_path, mean_type):
    """DiffRec, x0 and eps models (an eps model regresses its noise prediction toward the drawn noise)."""
    from refit.cli import main
    from refit.families.diffrec.pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(data="synthetic", data_options={"n_users": 120, "n_items": 80}, epochs=2, dims=(32,),
                            ks=(10, 20), mean_type=mean_type, progress=False, out=str(tmp_path / "pre")))
    code = main(["-q", "finetune", "--checkpoint", str(tmp_path / "pre" / "best.pt"), "--method", "nft",
                 "--nft-beta", "0.5", "--nft-ema", "0.25", "--nft-timesteps", "2", "--nft-adv-clip", "2",
                 "--group-size", "4", "--iterations", "6", "--eval-every", "3", "--batch-size", "16", "--lr", "1e-3",
                 "--probe-size", "32", "--ks", "10,20", "--no-plot", "--out", str(tmp_path / "ft")])
    assert code == 0
    state = load_checkpoint(str(tmp_path / "ft" / "last.pt"))
    assert state["config"]["method"] == "nft" and state["config"]["nft_beta"] == 0.5
    assert state["config"]["nft_ema"] == 0.25 and state["config"]["nft_timesteps"] == 2
    records = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    deviation = [r["old_deviation"] for r in records if "old_deviation" in r]
    assert len(deviation) == 6 and all(math.isfinite(v) and v >= 0 for v in deviation) and max(deviation) > 0
    summary = json.load(open(tmp_path / "ft" / "summary.json"))
    assert "old_deviation" in summary["diagnostics"] and "probe" in summary
