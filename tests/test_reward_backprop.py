"""Reward backpropagation: the differentiable reward, the gradient through the last K steps, the
placebo, resume, the refusals, and both backbones from the command line."""

import math

import pytest
import torch

import refit_kernels as rk
from _testing import TINY_SEQ, tiny_dreamrec
from refit.data import load_dataset
from refit.posttrain import METHOD_CLASSES, PostTrainingMethod
from refit.posttrain.reward_backprop import listwise_logprob, smooth_metric, soft_ranks
from refit.reward import rank_metrics
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
    base = dict(method="reward-backprop", batch_size=8, lr=1e-2, grad_clip=1e9, seed=3, progress=False, plot=False,
                probe_size=0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_the_reward_is_the_targets_log_softmax_over_the_rankable_items():
    s = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, 0.5, 0.5, 0.5], [4.0, 1.0, 0.0, 2.0]], requires_grad=True)
    pos = rk.as_csr((torch.tensor([0, 2, 3, 3]), torch.tensor([0, 2, 1])), n_cols=4)
    excl = rk.as_csr((torch.tensor([0, 1, 1, 2]), torch.tensor([3, 0])), n_cols=4)
    got = listwise_logprob(s, pos, excl)
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))  # item 3 excluded
    want = [((1 - lse0) + (3 - lse0)) / 2, 0.5 - math.log(4 * math.exp(0.5)), 0.0]  # row 2: no positive
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    got.sum().backward()
    assert s.grad[2].abs().sum() == 0 and s.grad[0, 3] == 0  # no positive, an excluded item: no gradient


def _ranking_case(seed=0, B=4, I=30):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, I, generator=g, dtype=torch.float64).float() * 3
    pos = rk.as_csr((torch.tensor([0, 3, 4, 4, 9]), torch.tensor([1, 5, 7, 2, 0, 3, 4, 11, 20])), n_cols=I)
    excl = rk.as_csr((torch.tensor([0, 2, 2, 3, 5]), torch.tensor([0, 5, 3, 4, 29])), n_cols=I)
    return scores, pos, excl


def test_soft_ranks_tend_to_the_exact_ranks():
    """Row 0's positive 5 is excluded: never ranked (nan); row 2 has no positive; row 3's 4 is excluded."""
    scores, pos, excl = _ranking_case()
    exact = rk.target_rank(scores, pos, exclude=excl)
    soft = soft_ranks(scores, pos, excl, temperature=1e-4)
    assert torch.equal(torch.isnan(soft), exact < 0)
    ok = exact >= 0
    torch.testing.assert_close(soft[ok], exact[ok].float(), rtol=0, atol=1e-3)
    warm = soft_ranks(scores, pos, excl, temperature=1.0)
    assert (warm[ok] - exact[ok].float()).abs().max() > 0.1  # a real smoothing at temperature 1


@pytest.mark.parametrize("kind, metric", [("ndcg", "ndcg"), ("topk", "recall")])
def test_the_smooth_metrics_tend_to_the_exact_ones(kind, metric):
    scores, pos, excl = _ranking_case(1)
    k = 5
    exact = rank_metrics(rk.target_rank(scores, pos, exclude=excl), pos.indptr, k)[metric]
    if kind == "topk":  # recall over min(positives, k): the rows here have at most 5 positives
        assert int(pos.indptr.diff().max()) <= k
    got = smooth_metric(scores, pos, excl, kind, temperature=1e-4, k=k)
    torch.testing.assert_close(got, exact, rtol=0, atol=2e-3)
    s = scores.clone().requires_grad_(True)
    smooth_metric(s, pos, excl, kind, temperature=0.5, k=k).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert s.grad[2].abs().sum() == 0  # the row without positives


def test_the_method_is_a_registered_strategy():
    assert issubclass(METHOD_CLASSES["reward-backprop"], PostTrainingMethod)
    from refit.posttrain.config import METHODS

    assert "reward-backprop" in METHODS


def test_k1_differentiates_through_the_last_step_only(data):
    """The update's gradient is that of -mean(log-softmax) of scores of cp0 * f(x_1, t_0) + cx0 * x_1, with
    x_1 the sampled state before the last step, a constant (the same draws as the trainer's)."""
    policy = _policy(data)
    trainer = ReFiT(policy, data, _cfg(backprop_steps=1))
    seen = {}
    trainer.optimizer.step = lambda: seen.update(
        {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None})
    trainer.step()

    by_hand = _policy(data)
    twin = ReFiT(by_hand, data, _cfg(backprop_steps=1))
    episode, lo, n = twin.draw()
    by_hand.module.eval()
    traj = by_hand.sample(episode.users, episode.inputs, generator=twin.generator)  # the same noise, in order
    x1 = traj.states[-1]
    d = by_hand.diffusion
    cp, cx, _ = d.step_constants(x1.device)
    t0 = d.model_timesteps(torch.zeros(x1.shape[0], dtype=torch.long))
    h = by_hand.guidance(*episode.inputs)
    final = cp[0] * by_hand.model.guided(x1, h, t0, by_hand.w) + cx[0] * x1
    scores = by_hand.model.item_scores(final)
    loss = -listwise_logprob(scores, episode.positives, episode.exclude).mean()
    by_hand.module.zero_grad()
    loss.backward()
    assert seen
    for name, p in by_hand.module.named_parameters():
        if name in seen:
            torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert seen["item_embeddings.weight"].abs().sum() > 0 and seen["q.weight"].abs().sum() > 0  # items, encoder


def test_the_differentiable_sample_is_the_plain_sample(data):
    policy = _policy(data)
    episode = ReFiT(policy, data, _cfg()).draw()[0]
    policy.module.eval()
    for k in (1, 3, 8):
        final = policy.sample_final(episode.users, episode.inputs, generator=torch.Generator().manual_seed(4),
                                    grad_steps=k)
        plain = policy.sample(episode.users, episode.inputs, generator=torch.Generator().manual_seed(4)).final
        torch.testing.assert_close(final.detach(), plain, rtol=1e-5, atol=1e-6)
        assert final.requires_grad


def test_the_placebo_draws_random_targets_and_the_same_samples(data):
    stats = {}
    for placebo in (False, True):
        trainer = ReFiT(_policy(data), data, _cfg(placebo=placebo))
        stats[placebo] = trainer.step()
    assert stats[True]["reward"] == pytest.approx(stats[False]["reward"])  # the same samples and episodes
    assert stats[True]["surrogate"] != pytest.approx(stats[False]["surrogate"])  # toward other targets


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(data, tmp_path):
    cfg = _cfg(iterations=4, eval_every=2, checkpoint_every=2, out=str(tmp_path / "a"))
    finetune(cfg, data, policy=_policy(data), max_iterations_this_run=2)
    resumed = _policy(data, seed=9)
    finetune(cfg, data, policy=resumed, resume=True)
    whole = _policy(data)
    finetune(_cfg(iterations=4, eval_every=2, checkpoint_every=2, out=str(tmp_path / "b")), data, policy=whole)
    for k, v in whole.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert load_checkpoint(str(tmp_path / "a" / "last.pt"))["config"]["backprop_steps"] == 1


@pytest.mark.parametrize("settings, message", [
    (dict(group_size=2), "group_size must be 1"),
    (dict(anchor="kl", anchor_weight=0.1), "the kl anchor"),
    (dict(explore_steps=1, rl_steps=4), "explore_steps"),
    (dict(backprop_steps=0), "backprop_steps must be an int >= 1"),
    (dict(rb_temperature=0.0), "rb_temperature must be > 0"),
    (dict(rb_reward="mrr"), "rb_reward must be one of"),
])
def test_settings_that_do_not_apply_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**settings)


def test_a_policy_without_a_differentiable_sample_is_refused(data):
    class Plain:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name in ("_inner", "sample_final", "differentiable_scores"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    with pytest.raises(TypeError, match=r"reward-backprop needs Plain.sample_final and .differentiable_scores"):
        ReFiT(Plain(_policy(data)), data, _cfg())
    with pytest.raises(ValueError, match="backprop_steps is 9, more than the 8 reverse steps"):
        ReFiT(_policy(data), data, _cfg(backprop_steps=9))


@pytest.mark.parametrize("reward", ["log-softmax", "topk", "ndcg"])
def test_a_row_model_fine_tunes_from_the_command_line(tmp_path, reward):
    from refit.cli import main
    from refit.families.diffrec.pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(data="synthetic", data_options={"n_users": 120, "n_items": 80}, epochs=2, dims=(32,),
                            ks=(10, 20), progress=False, out=str(tmp_path / "pre")))
    code = main(["-q", "finetune", "--checkpoint", str(tmp_path / "pre" / "best.pt"), "--method", "reward-backprop",
                 "--backprop-steps", "2", "--rb-temperature", "0.5", "--rb-reward", reward, "--iterations", "6",
                 "--eval-every", "3",
                 "--batch-size", "16", "--lr", "1e-3", "--probe-size", "32", "--ks", "10,20", "--no-plot",
                 "--out", str(tmp_path / "ft")])
    assert code == 0
    state = load_checkpoint(str(tmp_path / "ft" / "last.pt"))
    assert state["config"]["method"] == "reward-backprop" and state["config"]["rb_temperature"] == 0.5
    assert state["config"]["rb_reward"] == reward
    import json

    records = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    surrogate = [r["surrogate"] for r in records if "surrogate" in r]
    assert len(surrogate) == 6 and all(math.isfinite(v) for v in surrogate)
