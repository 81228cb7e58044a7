"""Reward-weighted fine-tuning: the weights, the loss, its limit, and that it climbs a reward."""

import math

import pytest
import torch

from refit.data import load_dataset
from refit.diffusion import GaussianDiffusion
from refit.families.dreamrec.network import DreamRec
from refit.reward import Reward
from refit.families.dreamrec.pretrain import DreamRecConfig
from refit.families.dreamrec.recommender import SeqRecommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.common import group_weights

SEQ = {"n_users": 60, "n_items": 40, "mean_length": 8, "seed": 5}


def test_weights_on_a_hand_computed_case():
    w = group_weights(torch.tensor([0.0, 1.0, 0.5, 0.5, 2.0, 0.0]), 2, 0.5)
    e2 = math.exp(2.0)
    want = [1 / (1 + e2), e2 / (1 + e2), 0.5, 0.5, math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)]
    assert w.tolist() == pytest.approx(want, rel=1e-6)
    assert w.view(3, 2).sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # Large lambda: uniform within a group; small lambda: the group's best takes all.
    assert group_weights(torch.tensor([0.0, 1.0, 3.0]), 3, 1e9).tolist() == pytest.approx([1 / 3] * 3)
    assert group_weights(torch.tensor([0.0, 1.0, 3.0]), 3, 1e-3).tolist() == pytest.approx([0, 0, 1], abs=1e-9)
    with pytest.raises(ValueError, match="groups of 4"):
        group_weights(torch.zeros(6), 4, 1.0)


def _policy(seed=0, hidden=8):
    data = load_dataset("synthetic-seq", **SEQ)
    cfg = DreamRecConfig(hidden=hidden, steps=8, detach_target=True)
    torch.manual_seed(seed)
    model = DreamRec(**cfg.model_config(data.n_items))
    return SeqRecommender(model, GaussianDiffusion(cfg.diffusion_config()), w=1.0), data


def _cfg(**kw):
    base = dict(method="reward-weighted", group_size=4, batch_size=16, rw_lambda=0.05, lr=1e-2, grad_clip=1e9,
                seed=3, progress=False, plot=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _direct_loss(trainer, lam):
    """The same update's loss written out: per user, sum_g softmax(r / lam)_g * L_g, averaged over users."""
    policy, cfg = trainer.policy, trainer.config
    episode, lo, n = trainer.draw()
    inputs, traj, reward = trainer.rollout(episode, lo, n)
    r = reward.reward.double().view(-1, cfg.group_size)
    w = torch.exp(r / lam) / torch.exp(r / lam).sum(1, keepdim=True)
    target = policy.training_target(episode.users, inputs, traj.final)
    per_row = policy.denoising_loss(episode.users, inputs, target, generator=trainer.generator)
    return (w.reshape(-1).float() * per_row).view(-1, cfg.group_size).sum(1).mean()


@pytest.mark.parametrize("lam", [0.05, 1e9])
def test_the_update_is_the_gradient_of_the_weighted_loss(lam):
    grads = []
    for direct in (False, True):
        policy, data = _policy()
        trainer = ReFiT(policy, data, _cfg(rw_lambda=lam))
        policy.module.zero_grad()
        if direct:
            _direct_loss(trainer, lam).backward()
            grads.append({n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None})
        else:
            seen = {}
            real_step = trainer.optimizer.step
            trainer.optimizer.step = lambda: seen.update(
                {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None})
            trainer.step()
            trainer.optimizer.step = real_step
            grads.append(seen)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_huge_lambda_is_plain_fine_tuning_on_the_samples():
    policy, data = _policy()
    trainer = ReFiT(policy, data, _cfg(rw_lambda=1e12))
    episode, lo, n = trainer.draw()
    inputs, traj, reward = trainer.rollout(episode, lo, n)
    w = group_weights(reward.reward, 4, 1e12)
    assert torch.allclose(w, torch.full_like(w, 0.25))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    target = policy.training_target(episode.users, inputs, traj.final)
    per_row = policy.denoising_loss(episode.users, inputs, target, generator=g1)
    plain = policy.denoising_loss(episode.users, inputs, target, generator=g2).mean()
    torch.testing.assert_close((w * per_row * 4).mean(), plain)


def test_the_placebo_permutes_rewards_within_each_group(monkeypatch):
    # The control must keep each group's weights (their spread sets the update's size) and only
    # break which trajectory gets which: a batch-wide shuffle would mix in the spread between users.
    import refit.posttrain.reward_weighted as trainer_module

    seen = {}
    real_weights = trainer_module.group_weights

    def spy(r, g, lam):
        seen.setdefault(arm, []).append(r.clone())
        return real_weights(r, g, lam)

    monkeypatch.setattr(trainer_module, "group_weights", spy)
    for arm in ("real", "placebo"):
        policy, data = _policy()
        ReFiT(policy, data, _cfg(placebo=arm == "placebo")).step()
    real, placebo = seen["real"][0].view(-1, 4), seen["placebo"][0].view(-1, 4)
    assert not torch.equal(real, placebo)
    torch.testing.assert_close(real.sort(1).values, placebo.sort(1).values, rtol=0, atol=0)


def _pretrained_policy():
    """A DreamRec briefly trained on the synthetic sequences (its samples mean something)."""
    from refit.families.dreamrec.losses import dreamrec_loss

    policy, data = _policy(seed=1)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
    batches = data.batches("train", 64, seed=0)
    g = torch.Generator().manual_seed(0)
    for epoch in range(8):
        batches.set_epoch(epoch)
        for history, lengths, targets, _ in batches:
            loss = dreamrec_loss(policy, history, lengths, targets, g).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return policy, data


def closeness(x, c):
    """exp(2 (cos(x, c) - 1)): 1 along c, e^-4 opposite it."""
    return torch.exp(2 * (torch.nn.functional.cosine_similarity(x, c.expand_as(x), dim=1) - 1))


def test_reward_weighted_fine_tuning_climbs_toward_a_known_optimum(monkeypatch):
    """Rewards with a known optimum: generated embeddings pointing along c (reward 1 there), for four c.
    Like every ranking reward (items are ranked by inner product) it ignores the embedding's norm.

    The same number of updates with uniform weights (lambda -> infinity: plain fine-tuning on the model's
    own samples) is the control: on its own samples the model drifts; what moves the expected reward up,
    and beyond the control, is the weighting.
    """
    import copy

    start, data = _pretrained_policy()
    g = torch.Generator().manual_seed(0)
    targets = [torch.tensor([3.0] + [0.0] * 7), torch.tensor([1.5, -1.5] * 4),
               torch.randn(8, generator=g) * 1.5, torch.randn(8, generator=g) * 1.5]
    gains = []
    for c in targets:
        def rollout(self, episode, lo, n, c=c):  # the reward of each sampled embedding: closeness to c
            traj = self.policy.sample(episode.users, episode.inputs, generator=self.generator)
            r = closeness(traj.final, c)
            return episode.inputs, traj, Reward(r, r, torch.zeros_like(r))

        monkeypatch.setattr(ReFiT, "rollout", rollout)
        outcome = {}
        for lam in (0.002, 1e9):
            policy = copy.deepcopy(start)

            def expected_reward():
                gen = torch.Generator().manual_seed(123)
                t = data.targets["train"][torch.arange(32)]
                h = policy.guidance(*data.windows(t.seq, t.pos))
                with torch.no_grad():
                    x = policy.sample_from(h, generator=gen)
                return float(closeness(x, c).mean())

            before = expected_reward()
            trainer = ReFiT(policy, data, _cfg(rw_lambda=lam, lr=3e-3, grad_clip=1.0, group_size=8, batch_size=32))
            for _ in range(40):
                trainer.step()
            outcome[lam] = (before, expected_reward())
        (before, weighted), (_, uniform) = outcome[0.002], outcome[1e9]
        assert weighted > uniform, (c, outcome)
        gains.append(weighted - before)
    assert sum(gains) / len(gains) > 0.05, gains


def test_a_diffrec_target_is_the_start_row_and_the_judged_list():
    import refit_kernels as rk
    from refit.diffusion import DiffusionConfig
    from refit.families.diffrec.denoisers import DiffRecMLP
    from refit.families.diffrec.recommender import RowRecommender

    rec = RowRecommender("diffrec", DiffRecMLP(12, dims=(8,)), GaussianDiffusion(DiffusionConfig(steps=4)))
    inputs = torch.zeros(2, 12)
    inputs[0, [1, 5]] = 1
    inputs[1, [0]] = 1
    exclude = rk.CSR(torch.tensor([0, 2, 3]), torch.tensor([1, 5, 0]), None, 12)
    final = torch.arange(12, dtype=torch.float32).flip(0).repeat(2, 1)  # item 0 best, then 1, 2, ...
    target = rec.training_target(torch.tensor([0, 1]), inputs, final, exclude=exclude, k=3)
    assert set(torch.nonzero(target[0]).flatten().tolist()) == {1, 5, 0, 2, 3}  # row + top 3 not excluded
    assert set(torch.nonzero(target[1]).flatten().tolist()) == {0, 1, 2, 3}
    assert set(target.unique().tolist()) == {0.0, 1.0}


def test_reward_weighted_runs_from_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    from refit.families.dreamrec.pretrain import pretrain_dreamrec

    pretrain_dreamrec(DreamRecConfig(data="synthetic-seq", data_options=SEQ, hidden=8, steps=8, epochs=1,
                                     eval_every=1, batch_size=64, eval_batch_size=64, progress=False, ks=(10, 20),
                                     detach_target=True, out=str(tmp_path / "pre")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", str(tmp_path / "pre" /
                          "best.pt"), "--method", "reward-weighted", "--group-size", "4", "--batch-size", "16",
                          "--iterations", "2", "--eval-every", "2", "--ks", "10,20", "--no-plot", "--out", str(tmp_path / "rw")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run([sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", str(tmp_path / "pre" /
                          "best.pt"), "--method", "reward-weighted", "--group-size", "1", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "group_size" in bad.stderr
