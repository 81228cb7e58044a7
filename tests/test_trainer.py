"""ReFiT: episodes, reward, baselines, log-probabilities, the trainer and its runs."""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import refit_kernels as rk
from refit.data import load_dataset
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.reward import collaborative_reward, make_episode, repeat_episode
from refit.runtime.runs import load_checkpoint
from refit.posttrain.common import Baseline, reinforce_loss, trajectory_logprob
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.run import finetune

DATA = {"n_users": 200, "n_items": 150}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(PretrainConfig(data="synthetic", data_options=DATA, steps=8, epochs=4, eval_every=2, batch_size=100,
                            dims=(32, 64), progress=False, out=str(out)), data)
    return str(out / "best.pt")


def _ft(pretrained, tmp_path, **kw):
    base = dict(checkpoint=pretrained, iterations=4, batch_size=16, eval_every=2, checkpoint_every=2,
                out=str(tmp_path / "ft"), progress=False, plot=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_hidden_episode_splits_each_row(data):
    train = rk.as_csr(data.train, "train")
    users = torch.tensor([3, 17, 17, 40])
    ep = make_episode(train, users, "hidden", 0.3, torch.Generator().manual_seed(0))
    for b, u in enumerate(users.tolist()):
        row = set(data.train[u].indices.tolist())
        hid = ep.positives.indices[ep.positives.indptr[b]:ep.positives.indptr[b + 1]].tolist()
        vis = ep.exclude.indices[ep.exclude.indptr[b]:ep.exclude.indptr[b + 1]].tolist()
        assert hid == sorted(hid) and vis == sorted(vis)
        assert set(hid) | set(vis) == row and not set(hid) & set(vis)
        assert len(hid) == max(1, min(len(row) - 1, round(0.3 * len(row))))
        assert set(torch.nonzero(ep.rows[b]).flatten().tolist()) == set(vis)


def test_observed_episode_is_the_whole_row(data):
    train = rk.as_csr(data.train, "train")
    ep = make_episode(train, torch.tensor([5, 6]), "observed")
    assert ep.exclude is None
    for b, u in enumerate([5, 6]):
        assert ep.positives.indices[ep.positives.indptr[b]:ep.positives.indptr[b + 1]].tolist() == data.train[u].indices.tolist()
        np.testing.assert_array_equal(ep.rows[b].numpy(), data.train[u].toarray().ravel())


def test_repeat_episode_repeats_users_rows_and_targets(data):
    train = rk.as_csr(data.train, "train")
    ep = make_episode(train, torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(1))
    rep = repeat_episode(ep, 3)
    assert rep.users.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for b in range(9):
        src = b // 3
        for a, c in ((rep.positives, ep.positives), (rep.exclude, ep.exclude)):
            assert a.indices[a.indptr[b]:a.indptr[b + 1]].tolist() == c.indices[c.indptr[src]:c.indptr[src + 1]].tolist()
        assert torch.equal(rep.rows[b], ep.rows[src])


def test_reward_counts_hits_of_the_top_k(data):
    train = rk.as_csr(data.train, "train")
    users = torch.tensor([0, 1, 2, 3])
    ep = make_episode(train, users, generator=torch.Generator().manual_seed(2))
    scores = torch.randn(4, data.n_items, generator=torch.Generator().manual_seed(3))
    neighbors = torch.tensor([[5, 6, -1], [7, -1, -1], [-1, -1, -1], [8, 9, 10]])
    r = collaborative_reward(scores, ep, neighbors, train, k=10, alpha=0.3)
    for b in range(4):
        s = scores[b].clone()
        s[ep.exclude.indices[ep.exclude.indptr[b]:ep.exclude.indptr[b + 1]]] = -float("inf")
        top = set(torch.topk(s, 10).indices.tolist())
        hid = set(ep.positives.indices[ep.positives.indptr[b]:ep.positives.indptr[b + 1]].tolist())
        nb = [v for v in neighbors[b].tolist() if v >= 0]
        n_sim = np.mean([len(top & set(data.train[v].indices.tolist())) for v in nb]) if nb else 0.0
        assert r.n_k[b] == len(top & hid)
        assert r.n_sim_k[b] == pytest.approx(n_sim)
        assert r.reward[b] == pytest.approx(0.3 * len(top & hid) / 10 + 0.7 * n_sim / 10)


def test_baselines():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = Baseline("group", group_size=3).advantage(r)
    assert torch.allclose(g[:3], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4) and torch.equal(g[3:], torch.zeros(3))
    ms = Baseline("mean-std").advantage(r)
    assert abs(float(ms.mean())) < 1e-6 and float(ms.std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    ema = Baseline("ema", decay=0.5)
    assert torch.equal(ema.advantage(torch.tensor([2.0, 4.0])), torch.tensor([-1.0, 1.0]))
    assert torch.equal(ema.advantage(torch.tensor([5.0, 7.0])), torch.tensor([2.0, 4.0]))  # baseline 3 -> then 4.5


def test_policy_gradient_estimates_the_gradient_of_the_expected_reward():
    """On a two-step Gaussian chain with a known answer, gaussian_logprob + the mean-std baseline +
    reinforce_loss point (on average over many trajectories) along grad E[reward]."""
    g = torch.Generator().manual_seed(0)
    B, I, sigma = 20000, 6, 0.3
    theta = torch.randn(I, generator=g, dtype=torch.float64).requires_grad_(True)
    x0 = torch.randn(I, generator=g, dtype=torch.float64)
    target = torch.randn(I, generator=g, dtype=torch.float64)
    cp = cx = torch.tensor([0.5, 0.5], dtype=torch.float64)
    log_var = torch.full((2,), 2 * math.log(sigma), dtype=torch.float64)
    with torch.no_grad():  # x_{s+1} = cp * theta + cx * x_s + sigma * noise
        x1 = 0.5 * theta + 0.5 * x0 + sigma * torch.randn(B, I, generator=g, dtype=torch.float64)
        x2 = 0.5 * theta + 0.5 * x1 + sigma * torch.randn(B, I, generator=g, dtype=torch.float64)
    states = torch.stack([x0.expand(B, I), x1, x2])
    preds = theta.expand(2, B, I)
    reward = -((x2 - target) ** 2).sum(1)
    adv = Baseline("mean-std").advantage(reward)
    logp = rk.gaussian_logprob(preds, states, cp, cx, log_var, reduction="sum", backend="cpu")
    (estimate,) = torch.autograd.grad(-reinforce_loss(adv, logp), [theta])
    # E[x2] = 0.75 theta + 0.25 x0, so grad E[reward] = -1.5 (E[x2] - target).
    exact = -1.5 * (0.75 * theta.detach() + 0.25 * x0 - target)
    assert float(torch.nn.functional.cosine_similarity(estimate, exact, dim=0)) > 0.95


def test_batched_logprob_equals_the_sampling_pass(pretrained, data):
    """Both ways of taking log p(trajectory) give the same value and the same gradient."""
    rec, data, _ = load_recommender(pretrained, data)
    rec.model.eval()
    train = rk.as_csr(data.train, "train")
    users = torch.arange(6)
    rows = rk.gather_rows(train, users)
    traj = rec.diffusion.sample(rec.denoiser(users, rows), rows, noise=True, return_trajectory=True,
                                keep_graph=True, generator=torch.Generator().manual_seed(0))
    adv = torch.randn(6, generator=torch.Generator().manual_seed(1))
    a = rk.gaussian_logprob(traj.preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var, reduction="mean")
    ga = torch.autograd.grad((adv * a).sum(), list(rec.model.parameters()))
    b = trajectory_logprob(rec, users, rows, traj, reduction="mean")
    gb = torch.autograd.grad((adv * b).sum(), list(rec.model.parameters()))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-3)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4)


def test_finetune_writes_its_run(pretrained, tmp_path, data):
    s = finetune(_ft(pretrained, tmp_path, plot=True), data)
    run = tmp_path / "ft"
    for name in ("config.json", "metrics.jsonl", "best.pt", "last.pt", "summary.json", "plot.png"):
        assert os.path.exists(run / name), name
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3, 4]
    for r in recs[1:]:
        assert {"reward", "n_k", "n_sim_k", "loss", "step_s"} <= set(r)
    assert "valid" in recs[0] and "valid" in recs[2] and "valid" in recs[4]
    assert s["before"]["test"] == recs[0]["test"]
    assert s["best_iteration"] in (0, 2, 4)
    state = load_checkpoint(str(run / "best.pt"))
    assert state["kind"] == "finetune" and state["iteration"] == s["best_iteration"]


# --- every fine-tuning option has the effect it promises -------------------------------------------------

def _watch(trainer, steps):
    """Instruments one ReFiT instance. Every ``trainer.step()`` appends a dict to ``steps``:

    ``grads``: the flat gradient (after clipping) at each ``optimizer.step``, one per update;
    ``outputs``: ``(S, users)`` of each trajectory the policy re-evaluated (``policy.outputs``);
    ``dtypes``: the dtypes of the denoiser's outputs (a forward hook: bfloat16 under bf16 autocast);
    ``episode``, ``traj``, ``reward``: the rollout's episode, trajectory and (B,) rewards;
    ``adv``: the (B,) advantages the trainer computed from those rewards.
    The evaluations and probes between steps are not recorded.
    """
    params = list(trainer.policy.module.parameters())
    step, opt_step, outputs, rollout, advantages = (trainer.step, trainer.optimizer.step, trainer.policy.outputs,
                                                    trainer.rollout, trainer.method._advantages)
    inside = [False]

    def on_step():
        steps.append({"grads": [], "outputs": [], "dtypes": set()})
        inside[0] = True
        try:
            return step()
        finally:
            inside[0] = False

    def on_opt_step(*args, **kwargs):
        steps[-1]["grads"].append(torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.detach().flatten()
                                             for p in params]))
        return opt_step(*args, **kwargs)

    def on_outputs(users, inputs, traj):
        if inside[0]:
            steps[-1]["outputs"].append((traj.preds.shape[0], users.clone()))
        return outputs(users, inputs, traj)

    def on_rollout(episode, lo, n_global, **kw):
        inputs, traj, reward = rollout(episode, lo, n_global, **kw)
        steps[-1].update(episode=episode, traj=traj, reward=reward.reward.clone())
        return inputs, traj, reward

    def on_advantages(reward):
        adv, keep = advantages(reward)
        steps[-1]["adv"] = adv.clone()
        return adv, keep

    trainer.step, trainer.optimizer.step, trainer.policy.outputs = on_step, on_opt_step, on_outputs
    trainer.rollout, trainer.method._advantages = on_rollout, on_advantages
    trainer.policy.module.register_forward_hook(
        lambda module, args, out: steps[-1]["dtypes"].add(out.dtype) if inside[0] else None)


class _Watched:
    """A finished fine-tuning run: its summary, its logged iterations (1..n) and what each step did."""

    def __init__(self, summary, records, steps):
        self.summary, self.records, self.steps = summary, records, steps


@pytest.fixture(scope="module")
def watched(pretrained, data, tmp_path_factory):
    """``run(**options)``: a watched 2-iteration finetune() (through the checkpoint, as the CLI runs it) with
    these options, run once per module and shared (several option sets compare with the same plain run)."""
    cache = {}

    def run(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            out, steps, init = tmp_path_factory.mktemp("options"), [], ReFiT.__init__

            def watching_init(self, *args, **kwargs):
                init(self, *args, **kwargs)
                _watch(self, steps)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ReFiT, "__init__", watching_init)
                summary = finetune(_ft(pretrained, out, **{"iterations": 2, **kw}), data)
            records = [json.loads(line) for line in open(out / "ft" / "metrics.jsonl")][1:]
            cache[key] = _Watched(summary, records, steps)
        return cache[key]

    return run


def _mean_std(r):
    r = r.double()
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-8)


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), **({"rtol": 1e-5, "atol": 1e-5} | tol))


def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _check_defaults(run, watched, data):
    """The plain run the others are compared with: one update per iteration from one batched re-forward of
    all 16 trajectories, mean-std advantages, a float32 denoiser, every stochastic step trained."""
    for it, rec in zip(run.steps, run.records):
        S = it["traj"].preds.shape[0]
        assert len(it["grads"]) == 1 and [(s, len(u)) for s, u in it["outputs"]] == [(S, 16)]
        assert it["dtypes"] == {torch.float32}
        assert rec["trained_steps"] == S and rec["ppo_clip_fraction"] == 0.0 and rec["anchor"] == 0.0
        _close(it["adv"], _mean_std(it["reward"]))


def _check_group_baseline(run, watched, data):
    """Four users with four trajectories each; every trajectory's advantage is its reward standardised
    within its own user's group."""
    for it in run.steps:
        users = it["episode"].users.view(-1, 4)
        assert bool((users == users[:, :1]).all()) and users[:, 0].unique().numel() == 4
        g = it["reward"].double().view(-1, 4)
        expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)
        _close(it["adv"], expected)
        assert not torch.allclose(expected, _mean_std(it["reward"]), atol=1e-3)  # the check tells them apart


def _check_ema_baseline(run, watched, data):
    """reward - EMA of the earlier batches' mean rewards (decay 0.9; the first batch is its own baseline)."""
    m = [float(it["reward"].double().mean()) for it in run.steps]
    bases = [m[0], m[0], 0.9 * m[0] + 0.1 * m[1]]
    for it, base in zip(run.steps, bases):
        _close(it["adv"], it["reward"].double() - base)
    # ... which is not the batch's own mean (the "mean" baseline) from iteration 2 on
    assert m[1] != pytest.approx(m[0], abs=1e-4) and bases[2] != pytest.approx(m[2], abs=1e-4)


def _check_observed_target(run, watched, data):
    """Each episode starts from the user's whole training row and rewards hits on all of it (nothing hidden,
    nothing excluded)."""
    for it in run.steps:
        ep = it["episode"]
        assert ep.exclude is None
        for b, u in enumerate(ep.users.tolist()):
            row = data.train[u].indices.tolist()
            assert ep.positives.indices[ep.positives.indptr[b]:ep.positives.indptr[b + 1]].tolist() == row
            assert torch.nonzero(ep.inputs[b]).flatten().tolist() == row


def _check_kl_anchor(run, watched, data):
    """The KL to the pretrained model is 0 at the start (so iteration 1 is the plain run's update and iteration 2
    samples the same trajectories), then positive, and enters the loss times anchor_weight; it costs a second
    forward pass."""
    plain = watched()
    kl = [r["anchor"] for r in run.records]
    assert kl[0] == pytest.approx(0.0, abs=1e-9) and kl[1] > 1e-6
    assert run.records[1]["loss"] == pytest.approx(plain.records[1]["loss"] + 0.1 * kl[1], rel=1e-5, abs=1e-9)
    assert not torch.equal(run.steps[1]["grads"][0], plain.steps[1]["grads"][0])
    S = run.steps[0]["traj"].preds.shape[0]
    assert all([(s, len(u)) for s, u in it["outputs"]] == [(S, 16)] * 2 for it in run.steps)


def _check_elbo_anchor(run, watched, data):
    """The pretraining loss enters the loss times anchor_weight, next to the plain run's REINFORCE loss on the
    same first trajectories, and changes the update."""
    plain = watched()
    elbo = run.records[0]["anchor"]
    assert elbo > 0
    assert run.records[0]["loss"] - 0.1 * elbo == pytest.approx(plain.records[0]["loss"], abs=1e-4)
    assert not torch.equal(run.steps[0]["grads"][0], plain.steps[0]["grads"][0])


def _check_ppo_epochs(run, watched, data):
    """Two inner epochs: two updates per iteration, each after re-evaluating the whole batch, and the ratios of
    the second epoch (after an lr 1e-3 update) are clipped; the first epoch's ratios are 1."""
    S = run.steps[0]["traj"].preds.shape[0]
    for it, rec in zip(run.steps, run.records):
        assert len(it["grads"]) == 2 and [(s, len(u)) for s, u in it["outputs"]] == [(S, 16)] * 2
        assert 0.0 < rec["ppo_clip_fraction"] <= 0.5


def _check_ppo_minibatches(run, watched, data):
    """Two inner epochs over minibatches of 8: four updates per iteration, each epoch's two minibatches
    splitting the batch's 16 trajectories between them; every minibatch after the first is evaluated after an
    update, and its ratios are clipped (the first one's are 1: at most 3/4 of the ratios are clipped)."""
    S = run.steps[0]["traj"].preds.shape[0]
    for it, rec in zip(run.steps, run.records):
        assert len(it["grads"]) == 4 and [(s, len(u)) for s, u in it["outputs"]] == [(S, 8)] * 4
        batch = sorted(it["episode"].users.tolist())
        for epoch in (it["outputs"][:2], it["outputs"][2:]):
            assert sorted(torch.cat([u for _, u in epoch]).tolist()) == batch
        assert 0.0 < rec["ppo_clip_fraction"] <= 0.75


def _check_reuse_sampling_graph(run, watched, data):
    """No second forward pass, and the plain run's loss and gradient (to float32 rounding)."""
    plain = watched()
    assert all(it["outputs"] == [] and len(it["grads"]) == 1 for it in run.steps)
    assert run.records[0]["loss"] == pytest.approx(plain.records[0]["loss"], rel=1e-5)
    _close(run.steps[0]["grads"][0], plain.steps[0]["grads"][0], rtol=1e-3, atol=1e-6)


def _check_bf16(run, watched, data):
    """The denoiser runs under bf16 autocast, sampling and re-forward alike; the update is not fp32's to the
    bit, but points the same way (cosine 0.99992 measured; 0.995 asked)."""
    plain = watched()
    assert all(it["dtypes"] == {torch.bfloat16} for it in run.steps)
    g, g32 = run.steps[0]["grads"][0], plain.steps[0]["grads"][0]
    assert not torch.equal(g, g32) and _cosine(g, g32) > 0.995


def _check_sum_reduction(run, watched, data):
    """The log-likelihood summed over the items instead of averaged: the same trajectories, and the loss and
    its gradient's norm n_items times the plain run's."""
    plain = watched()
    r, p = run.records[0], plain.records[0]
    assert r["reward"] == p["reward"]
    assert r["loss"] == pytest.approx(data.n_items * p["loss"], rel=1e-4)
    assert r["grad_norm"] == pytest.approx(data.n_items * p["grad_norm"], rel=1e-4)


def _check_temperature(run, watched, data):
    """The trajectory's log-variance is the plain run's + 2 log(temperature), and the noise actually drawn has
    that variance: the states' residuals around the steps' means, divided by exp(log_var / 2), have std 1."""
    plain_lv = watched().steps[0]["traj"].log_var
    for it in run.steps:
        t = it["traj"]
        _close(t.log_var, plain_lv + 2 * math.log(2.0))
        mean = t.coef_pred[:, None, None] * t.preds + t.coef_x[:, None, None] * t.states[:-1]
        eps = (t.states[1:] - mean) * torch.exp(-0.5 * t.log_var)[:, None, None]
        assert float(eps.double().std()) == pytest.approx(1.0, abs=0.05)


def _check_timestep_fraction(run, watched, data):
    """round(0.3 * S) of the S stochastic steps are trained (and re-evaluated) per update, not all S."""
    for it, rec in zip(run.steps, run.records):
        S = it["traj"].preds.shape[0]
        n = max(1, round(0.3 * S))
        assert n < S and rec["trained_steps"] == n
        assert [(s, len(u)) for s, u in it["outputs"]] == [(n, 16)]


OPTION_SETS = {
    "defaults": ({}, _check_defaults),
    "group-baseline": (dict(baseline="group", group_size=4), _check_group_baseline),
    "ema-baseline": (dict(baseline="ema", iterations=3), _check_ema_baseline),
    "observed-target": (dict(target="observed"), _check_observed_target),
    "kl-anchor": (dict(anchor="kl", anchor_weight=0.1), _check_kl_anchor),
    "elbo-anchor": (dict(anchor="elbo", anchor_weight=0.1), _check_elbo_anchor),
    "ppo-epochs": (dict(ppo_epochs=2, lr=1e-3), _check_ppo_epochs),
    "ppo-minibatches": (dict(ppo_epochs=2, minibatch_size=8, lr=1e-3), _check_ppo_minibatches),
    "reuse-sampling-graph": (dict(reuse_sampling_graph=True), _check_reuse_sampling_graph),
    "bf16": (dict(precision="bf16"), _check_bf16),
    "sum-reduction": (dict(reduction="sum"), _check_sum_reduction),
    "temperature": (dict(temperature=2.0), _check_temperature),
    "timestep-fraction": (dict(timestep_fraction=0.3), _check_timestep_fraction),
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_run(name, watched, data):
    """Each option set runs to the end and has its observable effect (one a trainer that ignored the
    option would not show); see each check's docstring."""
    options, check = OPTION_SETS[name]
    run = watched(**options)
    assert run.summary["iterations"] == options.get("iterations", 2) == len(run.steps) == len(run.records)
    check(run, watched, data)


def test_kl_anchor_starts_at_zero(pretrained, data):
    rec, data, _ = load_recommender(pretrained, data)
    t = ReFiT(rec, data, FinetuneConfig(checkpoint=pretrained, batch_size=8, anchor="kl", anchor_weight=1.0))
    assert t.step()["anchor"] == pytest.approx(0.0, abs=1e-6)  # the model still equals its pretrained copy
    assert t.step()["anchor"] > 0


def test_a_new_run_in_a_used_folder_logs_only_its_own_iterations(pretrained, tmp_path):
    finetune(_ft(pretrained, tmp_path, iterations=4))
    finetune(_ft(pretrained, tmp_path, iterations=2), overwrite=True)
    logged = [json.loads(line)["iteration"] for line in open(tmp_path / "ft" / "metrics.jsonl")]
    assert logged == [0, 1, 2]


def test_resume_after_a_kill_reaches_the_same_parameters(pretrained, tmp_path):
    """A run killed mid-way and resumed ends with exactly the parameters of an uninterrupted run."""
    args = ["--checkpoint", pretrained, "--iterations", "8", "--batch-size", "16", "--eval-every", "4",
            "--checkpoint-every", "2", "--no-plot"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda out, extra=(): subprocess.run([sys.executable, "-m", "refit", "-q", "finetune", *args, "--out", out,  # noqa: E731
                                                *extra], capture_output=True, text=True, env=env, timeout=600)
    full = run(str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    # The process kills itself (SIGKILL: no handlers, no cleanup) when iteration 6 begins, i.e.
    # after iteration 5 is logged and while last.pt holds iteration 4: a deterministic point,
    # where polling from outside could miss a run that finishes first.
    killer = (
        "import os, signal, sys\n"
        "from refit import trainer\n"
        "step, calls = trainer.ReFiT.step, [0]\n"
        "def dying_step(self):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self)\n"
        "trainer.ReFiT.step = dying_step\n"
        "from refit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", killer, "-q", "finetune", *args, "--out", str(killed)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    logged = [json.loads(line)["iteration"] for line in open(killed / "metrics.jsonl")]
    assert logged == list(range(6)), logged  # the evaluation at 0, then iterations 1..5
    assert load_checkpoint(str(killed / "last.pt"))["iteration"] == 4
    resumed = run(str(killed), ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(killed / "last.pt"))
    assert a["iteration"] == b["iteration"] == 8
    for k, v in a["recommender"]["model"]["state_dict"].items():
        assert torch.equal(v, b["recommender"]["model"]["state_dict"][k]), k
    iters = [json.loads(line)["iteration"] for line in open(killed / "metrics.jsonl")]
    assert iters == list(range(9))


def test_bad_finetune_configs(pretrained):
    with pytest.raises(ValueError, match="group_size"):
        FinetuneConfig(checkpoint=pretrained, batch_size=10, group_size=3)
    with pytest.raises(ValueError, match="target"):
        FinetuneConfig(checkpoint=pretrained, target="clicks")
    with pytest.raises(ValueError, match="anchor_weight"):
        FinetuneConfig(checkpoint=pretrained, anchor="kl")
    with pytest.raises(ValueError, match="reuse_sampling_graph"):
        FinetuneConfig(checkpoint=pretrained, ppo_epochs=2, reuse_sampling_graph=True)
    with pytest.raises(ValueError, match="hide_fraction"):
        FinetuneConfig(checkpoint=pretrained, hide_fraction=1.0)


def test_placebo_shuffles_the_advantages_of_the_same_episodes(pretrained, data, tmp_path):
    runs = []
    for placebo in (False, True):
        rec, d, _ = load_recommender(pretrained, data)
        trainer = ReFiT(rec, d, _ft(pretrained, tmp_path, placebo=placebo, lr=1e-3))
        stats = trainer.step()
        runs.append((stats, trainer.generator.get_state(), {k: v.clone() for k, v in rec.model.state_dict().items()}))
    (real, g_real, p_real), (placebo, g_placebo, p_placebo) = runs
    # The same episodes, trajectories and rewards: the main generator made the same draws.
    assert placebo["reward"] == real["reward"] and torch.equal(g_real, g_placebo)
    # But another update: the advantages were permuted between the trajectories.
    assert placebo["loss"] != pytest.approx(real["loss"], rel=1e-6)
    assert any(not torch.equal(p_real[k], p_placebo[k]) for k in p_real)
