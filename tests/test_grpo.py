"""Post-training that can learn: DDIM/respaced trajectories, dense rewards, GRPO, PPO minibatches,
the timestep fraction, the probe reward and the run's diagnostics."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import refit_kernels as rk
from refit.data import load_dataset
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.reward import collaborative_reward, make_episode, rank_metrics, ranking_reward
from refit.families.dreamrec.pretrain import DreamRecConfig, load_seq_recommender, pretrain_dreamrec
from refit.runtime.runs import load_checkpoint
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.run import finetune
from _testing import benchmark_module

DATA = {"n_users": 200, "n_items": 150}
SEQ = {"n_users": 120, "n_items": 60, "mean_length": 12, "seed": 3}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain(PretrainConfig(data="synthetic", data_options=DATA, steps=8, epochs=2, eval_every=2, batch_size=100,
                            dims=(32, 64), progress=False, out=str(out)), data)
    return str(out / "best.pt")


@pytest.fixture(scope="module")
def seq_data():
    return load_dataset("synthetic-seq", **SEQ)


@pytest.fixture(scope="module")
def dreamrec(tmp_path_factory, seq_data):
    out = tmp_path_factory.mktemp("dreamrec") / "run"
    pretrain_dreamrec(DreamRecConfig(data="synthetic-seq", data_options=SEQ, hidden=16, steps=20, batch_size=64,
                                     eval_every=2, eval_batch_size=64, epochs=2, lr=5e-3, progress=False,
                                     out=str(out)), seq_data)
    return str(out / "best.pt")


def _ft(checkpoint, tmp_path, **kw):
    base = dict(checkpoint=checkpoint, iterations=4, batch_size=16, eval_every=2, checkpoint_every=2,
                out=str(tmp_path / "ft"), progress=False, plot=False, probe_size=24, eval_batch_size=16)
    base.update(kw)
    return FinetuneConfig(**base)


# --- DDIM steps -------------------------------------------------------------------------------------

def _diffusion(mean_type="x0", steps=40):
    return GaussianDiffusion(DiffusionConfig(mean_type=mean_type, steps=steps, noise_schedule="linear",
                                             noise_scale=1.0, noise_min=1e-4, noise_max=0.02))


@pytest.mark.parametrize("respace", [None, 7])
def test_ddim_eta_one_is_the_posterior(respace):
    d = _diffusion()
    d = d.respaced(respace) if respace else d
    for a, b in zip(d.step_constants(), d.step_constants(eta=1.0 + 1e-9)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eta", [0.3, 1.0, 2.5, 50.0])
def test_ddim_steps_keep_the_marginals(eta):
    """From x_t ~ q(x_t | x0), a step of any eta lands on q(x_{t-1} | x0): mean sqrt(ab') x0 and
    variance 1 - ab' (analytically, in float64 from the float32 constants)."""
    d = _diffusion().respaced(10)
    cp, cx, lv = (c.double() for c in d.step_constants(eta=eta))
    ab, abp = d.alphas_cumprod, d.alphas_cumprod_prev
    for i in range(1, d.steps):
        mean_coef = cp[i] + cx[i] * ab[i].sqrt()  # coefficient of x0 in E[x_{t-1}]
        var = cx[i] ** 2 * (1 - ab[i]) + lv[i].exp()
        assert float(mean_coef) == pytest.approx(float(abp[i].sqrt()), rel=1e-5), i
        assert float(var) == pytest.approx(float(1 - abp[i]), rel=1e-4), i
    # eta = 50 is past the cap on every step: the mean no longer depends on x_t.
    if eta == 50.0:
        assert float(cx[1:].abs().max()) < 1e-6


def test_ddim_in_eps_mode_is_the_same_step():
    """An eps-predicting model's step equals the x0 model's step on the x0 its eps implies."""
    x0d, epsd = _diffusion("x0").respaced(9), _diffusion("eps").respaced(9)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    for i in range(1, 9):
        ab = x0d.alphas_cumprod[i]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        a = [c.double()[i] for c in x0d.step_constants(eta=1.7)]
        b = [c.double()[i] for c in epsd.step_constants(eta=1.7)]
        torch.testing.assert_close(b[0] * eps + b[1] * xt, a[0] * x0 + a[1] * xt, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[2], a[2])


@pytest.mark.parametrize("eta", [-1.0, math.nan, math.inf, "1", True])
def test_ddim_refuses_bad_eta(eta):
    with pytest.raises(ValueError, match="eta"):
        _diffusion().step_constants(eta=eta)


# --- respaced, noisier trajectories ------------------------------------------------------------------

def _logprob_matches_sampling(policy, users, inputs, **options):
    policy.module.eval()
    traj = policy.sample(users, inputs, generator=torch.Generator().manual_seed(0), keep_graph=True, **options)
    a = rk.gaussian_logprob(traj.preds, traj.states, traj.coef_pred, traj.coef_x, traj.log_var)
    b = rk.gaussian_logprob(policy.outputs(users, inputs, traj), traj.states, traj.coef_pred, traj.coef_x,
                            traj.log_var)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-3)
    return traj


def test_diffrec_samples_respaced_ddim_trajectories(pretrained, data):
    rec, data, _ = load_recommender(pretrained, data)
    users = torch.arange(5)
    rows = rk.gather_rows(rk.as_csr(data.train, "train"), users)
    traj = _logprob_matches_sampling(rec, users, rows, steps=4, eta=2.0)
    assert traj.states.shape[0] == 4 and traj.preds.shape[0] == 3  # 4 steps, the last deterministic
    respaced = rec.diffusion.respaced(4)
    assert traj.timesteps.tolist() == respaced.timestep_map[[3, 2, 1]].tolist()
    cp, cx, lv = respaced.step_constants(eta=2.0)
    torch.testing.assert_close(traj.log_var, lv[[3, 2, 1]])
    full = rec.sample(users, rows, generator=torch.Generator().manual_seed(0))
    assert full.preds.shape[0] == rec.diffusion.steps - 1


def test_dreamrec_samples_respaced_ddim_trajectories(dreamrec, seq_data):
    rec, data, _ = load_seq_recommender(dreamrec, seq_data)
    t = data.targets["train"][torch.arange(6)]
    history, lengths = data.windows(t.seq, t.pos)
    traj = _logprob_matches_sampling(rec, t.seq, (history, lengths), steps=5, eta=1.5)
    assert traj.preds.shape[:2] == (4, 6)


def test_exploring_window_draws_noise_only_there(pretrained, data):
    """Outside the window every step is DDIM's deterministic one: the window's start state and a
    zero-width window's output do not depend on the noise, and the trajectory holds only the window."""
    rec, data, _ = load_recommender(pretrained, data)
    rec.model.eval()
    users = torch.arange(5)
    rows = rk.gather_rows(rk.as_csr(data.train, "train"), users)
    d = rec.diffusion.respaced(6)
    f = rec.denoiser(users, rows)
    a, b = (d.sample(f, rows, noise=True, return_trajectory=True, explore=(2, 2),
                     generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    assert a.states.shape[0] == 3 and a.preds.shape[0] == 2
    assert a.timesteps.tolist() == d.timestep_map[[3, 2]].tolist()  # steps 2 and 3 of the 5 from t = 5
    assert torch.equal(a.states[0], b.states[0]) and not torch.equal(a.states[1], b.states[1])
    cp, cx, lv = d.step_constants()
    torch.testing.assert_close(a.log_var, lv[[3, 2]])
    x = rows
    with torch.no_grad():  # the deterministic path to the window, by hand
        cp0, cx0, _ = d.step_constants(eta=0.0)
        for i in (5, 4):
            x = cp0[i] * f(x, d.timestep_map[i].expand(5)) + cx0[i] * x
    torch.testing.assert_close(a.states[0], x)
    z = [d.sample(f, rows, noise=True, return_trajectory=True, explore=(0, 0),
                  generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert z[0].preds.shape[0] == 0 and torch.equal(z[0].final, z[1].final)
    with pytest.raises(ValueError, match="explore"):
        d.sample(f, rows, noise=True, explore=(4, 2))


def test_dreamrec_groups_share_their_start(dreamrec, seq_data):
    rec, data, _ = load_seq_recommender(dreamrec, seq_data)
    t = data.targets["train"][torch.tensor([0, 0, 1, 1])]
    inputs = data.windows(t.seq, t.pos)
    traj = _logprob_matches_sampling(rec, t.seq, inputs, steps=6, explore=(1, 1), group_size=2)
    assert traj.preds.shape[0] == 1
    assert torch.equal(traj.states[0, 0], traj.states[0, 1]) and not torch.equal(traj.states[1, 0], traj.states[1, 1])
    assert not torch.equal(traj.states[0, 1], traj.states[0, 2])  # another group, another start
    with pytest.raises(ValueError, match="groups of 3"):
        rec.sample(t.seq, inputs, steps=6, explore=(1, 1), group_size=3)


def test_a_run_with_an_exploring_window(dreamrec, seq_data, tmp_path):
    rec, data, _ = load_seq_recommender(dreamrec, seq_data)
    t = ReFiT(rec, data, _ft(dreamrec, tmp_path, method="grpo", group_size=4, reward="ndcg", rl_steps=8,
                             explore_steps=2))
    stats = t.step()
    assert stats["trained_steps"] == 2
    probe = t.probe()
    assert probe["probe_kl"] == 0.0 and probe == t.probe()
    with pytest.raises(ValueError, match="explore_steps"):
        ReFiT(rec, data, _ft(dreamrec, tmp_path, explore_steps=rec.diffusion.steps))


# --- dense rewards ---------------------------------------------------------------------------------

def test_rank_metrics_by_hand():
    # row 0: positives at ranks 0 and 3; row 1: none; row 2: one at rank 1; row 3: one excluded (-1)
    ranks = torch.tensor([0, 3, 1, -1])
    indptr = torch.tensor([0, 2, 2, 3, 4])
    m = rank_metrics(ranks, indptr, k=2)
    assert m["hits"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert m["recall"].tolist() == [0.5, 0.0, 1.0, 0.0]
    ndcg0 = (1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    torch.testing.assert_close(m["ndcg"], torch.tensor([ndcg0, 0.0, 1 / math.log2(3), 0.0]))
    torch.testing.assert_close(m["rr"], torch.tensor([1.0, 0.0, 0.5, 0.0]))


def test_dense_reward_ranks_over_the_full_list(data):
    train = rk.as_csr(data.train, "train")
    users = torch.arange(12)
    ep = make_episode(train, users, generator=torch.Generator().manual_seed(2))
    scores = torch.randn(12, data.n_items, generator=torch.Generator().manual_seed(3))
    scores[:, :40] = torch.round(scores[:, :40])  # ties
    neighbors = torch.randint(-1, 200, (12, 5), generator=torch.Generator().manual_seed(4))
    hit = ranking_reward(scores, ep, neighbors, train, kind="hit", k=10, alpha=0.3)
    base = collaborative_reward(scores, ep, neighbors, train, k=10, alpha=0.3)
    for a, b in zip(hit, base):
        assert torch.equal(a, b)
    for kind in ("ndcg", "rr"):
        r = ranking_reward(scores, ep, neighbors, train, kind=kind, k=10, alpha=0.3)
        assert torch.equal(r.n_k, base.n_k) and torch.equal(r.n_sim_k, base.n_sim_k)
        for b in range(12):  # the full ranking by sorting: score descending, then item id
            vis = set(ep.exclude.indices[ep.exclude.indptr[b]:ep.exclude.indptr[b + 1]].tolist())
            order = [i for i in sorted(range(data.n_items), key=lambda i: (-float(scores[b, i]), i)) if i not in vis]
            pos = ep.positives.indices[ep.positives.indptr[b]:ep.positives.indptr[b + 1]].tolist()
            ranks = sorted(order.index(p) for p in pos)
            if kind == "ndcg":
                g = sum(1 / math.log2(r + 2) for r in ranks) / sum(1 / math.log2(r + 2) for r in range(len(pos)))
            else:
                g = 1 / (ranks[0] + 1)
            want = 0.3 * g + 0.7 * float(base.n_sim_k[b]) / 10
            assert float(r.reward[b]) == pytest.approx(want, rel=1e-5), (kind, b)


# --- GRPO, PPO minibatches, the timestep fraction ----------------------------------------------------

def test_grpo_drops_the_groups_whose_rewards_tie(pretrained, data, tmp_path):
    rec, d, _ = load_recommender(pretrained, data)
    t = ReFiT(rec, d, _ft(pretrained, tmp_path, method="grpo", group_size=4, placebo=True))
    reward = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0, 0.3, 0.1, 0.2, 0.4])
    adv, keep = t.method._advantages(reward)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    assert torch.equal(adv[~keep], torch.zeros(8))  # the placebo moved advantages among kept rows only
    g = reward.view(4, 4)[[1, 3]]
    real = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(adv[keep].sort().values, real.sort().values)
    stats = t._reward_stats(reward, adv, keep)
    assert stats["zero_variance_groups"] == 0.5 and stats["kept_fraction"] == 0.5
    assert stats["reward_between"] > stats["reward_within"] > 0


def test_grpo_step_trains_only_on_kept_groups(pretrained, data, tmp_path, monkeypatch):
    from refit.reward import Reward

    rec, d, _ = load_recommender(pretrained, data)
    t = ReFiT(rec, d, _ft(pretrained, tmp_path, method="grpo", group_size=4, reward="ndcg", rl_steps=4))
    real = t.reward
    tie = torch.tensor([1.0] * 8 + [0.0] * 8)

    def reward(scores, episode):  # the first two groups tie
        r = real(scores, episode)
        return Reward(torch.where(torch.arange(16) < 8, tie, r.reward), r.n_k, r.n_sim_k)

    monkeypatch.setattr(t, "reward", reward)
    seen = []
    outputs = rec.outputs
    monkeypatch.setattr(rec, "outputs", lambda u, i, traj: seen.append(traj.preds.shape[1]) or outputs(u, i, traj))
    stats = t.step()
    assert seen == [8]  # one re-evaluation, of the kept rows only (the KL's pass runs on the frozen copy)
    assert stats["kept_fraction"] == 0.5 and stats["zero_variance_groups"] == 0.5
    assert stats["trained_steps"] == 3 and stats["kl"] == pytest.approx(0.0, abs=1e-9)
    assert {"reward_within", "reward_between", "adv_std", "grad_norm"} <= set(stats)
    assert t.step()["kl"] > 0  # the policy has moved


def test_ppo_minibatches_make_one_update_each(pretrained, data, tmp_path):
    rec, d, _ = load_recommender(pretrained, data)
    t = ReFiT(rec, d, _ft(pretrained, tmp_path, ppo_epochs=2, minibatch_size=6))
    stats = t.step()
    steps = {int(s["step"]) for s in t.optimizer.state.values()}
    assert steps == {2 * 3}  # 2 epochs x ceil(16 / 6) minibatches
    assert 0.0 <= stats["ppo_clip_fraction"] <= 1.0


def test_timestep_fraction_trains_a_subset_of_the_steps(pretrained, data, tmp_path):
    rec, d, _ = load_recommender(pretrained, data)
    t = ReFiT(rec, d, _ft(pretrained, tmp_path, timestep_fraction=0.5, rl_steps=5))
    rec.model.eval()
    users = torch.arange(4)
    rows = rk.gather_rows(rk.as_csr(d.train, "train"), users)
    traj = rec.sample(users, rows, generator=torch.Generator().manual_seed(0), steps=5)
    chosen = t.method._train_steps(traj.preds.shape[0])
    assert len(chosen) == 2 and chosen == sorted(set(chosen))
    from refit.reward import Episode
    from refit.posttrain.common import Rows

    sub = Rows(Episode(users, rows, None, None), traj)
    part = t.method._logprob(sub, chosen)
    full = rk.gaussian_logprob(rec.outputs(users, rows, traj), traj.states, traj.coef_pred, traj.coef_x,
                               traj.log_var, per_step=True, reduction="mean")
    torch.testing.assert_close(part, full[chosen], rtol=1e-5, atol=1e-3)
    # the gradient reaches the parameters through the chosen steps alone
    (g_part,) = torch.autograd.grad(part.sum(), [next(rec.model.parameters())])
    assert torch.isfinite(g_part).all() and g_part.abs().sum() > 0


# --- the probe and the run's diagnostics ------------------------------------------------------------

def test_probe_is_fixed_and_shared_with_the_placebo(pretrained, data, tmp_path):
    probes = []
    for placebo in (False, True):
        rec, d, _ = load_recommender(pretrained, data)
        t = ReFiT(rec, d, _ft(pretrained, tmp_path, placebo=placebo, reward="ndcg"))
        gen = t.generator.get_state()
        first = t.probe()
        assert t.probe() == first  # the same episodes and noise every time
        assert torch.equal(t.generator.get_state(), gen)  # and no draw from the run's generator
        probes.append(first)
    assert probes[0] == probes[1]
    p = probes[0]
    assert set(p) == {"probe_reward", "probe_ndcg", "probe_rr", "probe_recall", "probe_kl"}
    # The KL to the pretrained policy is 0 before any update, up to rounding: the sampling pass and the
    # re-evaluation batch the network differently, and BLAS may round the two differently (1.7e-11 measured).
    assert abs(p["probe_kl"]) < 1e-8 and 0 < p["probe_ndcg"] <= 1 and p["probe_rr"] <= p["probe_ndcg"] + 1e-6


def test_a_run_logs_its_probe_and_diagnostics(dreamrec, seq_data, tmp_path):
    s = finetune(_ft(dreamrec, tmp_path, method="grpo", group_size=4, reward="ndcg", rl_steps=6, rl_noise=1.5,
                     lr=1e-3, plot=True), seq_data)
    recs = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "probe_reward" in r] == [0, 2, 4]
    for r in recs[1:]:
        assert {"zero_variance_groups", "reward_within", "reward_between", "adv_std", "kl", "grad_norm"} <= set(r)
    assert s["probe"]["start"]["probe_reward"] == recs[0]["probe_reward"]
    assert s["probe"]["end"]["probe_reward"] == recs[-1]["probe_reward"] and s["probe"]["end_iteration"] == 4
    assert recs[-1]["probe_kl"] > 0  # the policy moved
    assert set(s["diagnostics"]) >= {"zero_variance_groups", "kl", "adv_std"}
    assert os.path.exists(tmp_path / "ft" / "plot.png")


def test_the_cli_runs_grpo(pretrained, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", pretrained,
                           "--method", "grpo", "--group-size", "4", "--batch-size", "16", "--reward", "rr",
                           "--rl-steps", "4", "--rl-noise", "2", "--timestep-fraction", "0.5", "--ppo-epochs", "2",
                           "--minibatch-size", "8", "--iterations", "2", "--eval-every", "2", "--probe-size", "16",
                           "--no-plot", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    config = json.load(open(out / "config.json"))
    assert (config["method"], config["baseline"], config["reward"], config["rl_steps"]) == ("grpo", "group", "rr", 4)
    assert "probe" in json.load(open(out / "summary.json"))


@pytest.mark.parametrize("kw, match", [
    (dict(method="grpo", group_size=1), "group_size"),
    (dict(reward="mrr"), "reward"),
    (dict(rl_steps=1), "rl_steps"),
    (dict(rl_steps=True), "rl_steps"),
    (dict(rl_noise=0.0), "rl_noise"),
    (dict(rl_noise=math.nan), "rl_noise"),
    (dict(timestep_fraction=0.0), "timestep_fraction"),
    (dict(timestep_fraction=1.5), "timestep_fraction"),
    (dict(minibatch_size=8), "ppo_epochs"),
    (dict(minibatch_size=0, ppo_epochs=1), "minibatch_size"),
    (dict(probe_size=-1), "probe_size"),
    (dict(explore_steps=0), "explore_steps"),
    (dict(explore_steps=4, rl_steps=4), "explore_steps"),
    (dict(explore_steps=1, method="offline-reward-weighted"), "explore_steps"),
    (dict(reuse_sampling_graph=True, timestep_fraction=0.5), "timestep_fraction"),
])
def test_bad_options_are_refused_by_name(pretrained, kw, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(checkpoint=pretrained, **kw)


def test_a_policy_without_respaced_sampling_is_refused(pretrained, data, tmp_path):
    rec, d, _ = load_recommender(pretrained, data)

    class Plain:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "inner":  # before __init__ (a copy being built)
                raise AttributeError(name)
            return getattr(self.inner, name)

        def sample(self, users, inputs, *, generator=None, temperature=1.0, rows=None, keep_graph=False):
            return self.inner.sample(users, inputs, generator=generator, temperature=temperature, rows=rows,
                                     keep_graph=keep_graph)

    with pytest.raises(TypeError, match="steps"):
        ReFiT(Plain(rec), d, _ft(pretrained, tmp_path, rl_steps=4))
    ReFiT(Plain(rec), d, _ft(pretrained, tmp_path))  # without the options it is a policy as before


def test_learning_curves_runs_recipes_next_to_their_placebos(pretrained, tmp_path, monkeypatch):
    learning_curves = benchmark_module("studies.learning_curves")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "curves"
    assert learning_curves.main(["--checkpoint", pretrained, "--out", str(out), "--jobs", "2",
                                 "--common", "--iterations 4 --eval-every 2 --batch-size 16 --probe-size 16 --no-plot",
                                 "--recipe", "rf=--lr 1e-3",
                                 "--recipe", "grpo=--method grpo --group-size 4 --reward ndcg --rl-steps 4 "
                                             "--explore-steps 1"]) == 0
    table = json.load(open(out / "curves.json"))
    assert list(table) == ["rf", "rf placebo", "grpo", "grpo placebo"]
    for key, arm in table.items():
        recs = [json.loads(line) for line in open(out / (key.replace(" placebo", "-s1-placebo")
                                                          if "placebo" in key else f"{key}-s1") / "metrics.jsonl")]
        probes = [r["probe_reward"] for r in recs if "probe_reward" in r]
        assert arm["runs"][0]["probe_reward"] == probes and arm["runs"][0]["iterations"] == [0, 2, 4]
        assert arm["probe_reward_change"][0] == pytest.approx((probes[-1] - probes[0]) / probes[0])
    assert table["grpo"]["zero_variance_groups"][0] is not None and table["rf"]["zero_variance_groups"][0] is None
    # a placebo run probes the same episodes with the same noise: it starts where the real run starts
    assert table["grpo placebo"]["runs"][0]["probe_reward"][0] == table["grpo"]["runs"][0]["probe_reward"][0]
    assert os.path.getsize(out / "curves.png") > 0 and "| grpo | placebo |" in open(out / "curves.md").read()
    with pytest.raises(SystemExit, match="NAME"):
        learning_curves.main(["--checkpoint", pretrained, "--out", str(out), "--recipe", "no flags"])


def test_gradient_snr_compares_the_samplers(dreamrec, capsys):
    gradient_snr = benchmark_module("studies.gradient_snr")

    assert gradient_snr.main(["--checkpoint", dreamrec, "--targets", "4", "--draws", "2", "--explore", "0", "2",
                              "--finetune", "--method grpo --group-size 4 --reward ndcg --alpha 1 --rl-steps 5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "cosine" in line]
    assert [line.split("cosine")[0].strip() for line in lines] == [
        "all steps", "all but the last", "one exploring step at 0", "one exploring step at 2"]
    for line in lines:
        cos = float(line.split("cosine")[1].split()[0])
        assert -1.0 <= cos <= 1.0
    with pytest.raises(SystemExit, match="positions"):
        gradient_snr.main(["--checkpoint", dreamrec, "--targets", "2", "--draws", "2", "--explore", "9",
                           "--finetune", "--method grpo --group-size 4 --rl-steps 5"])


# --- the learning-rate schedule -------------------------------------------------------------------

def test_cosine_schedule_values_and_refusal(pretrained):
    from refit.posttrain.trainer import ReFiT

    config = FinetuneConfig(checkpoint=pretrained, lr=1e-3, lr_schedule="cosine", iterations=4)
    trainer = ReFiT.__new__(ReFiT)  # lr_at reads the config alone
    trainer.config = config
    assert [round(trainer.lr_at(i), 12) for i in (1, 2, 3, 4)] == [
        1e-3, round(1e-3 * (1 + math.cos(math.pi / 4)) / 2, 12), 5e-4, round(1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2, 12)]
    trainer.config = FinetuneConfig(checkpoint=pretrained, lr=1e-3, iterations=4)
    assert trainer.lr_at(3) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        FinetuneConfig(checkpoint=pretrained, lr_schedule="linear")


def test_a_resumed_cosine_run_ends_where_an_uninterrupted_one_does(pretrained, data, tmp_path):
    kw = dict(method="grpo", group_size=4, lr=1e-3, lr_schedule="cosine", checkpoint_every=1)
    finetune(_ft(pretrained, tmp_path, out=str(tmp_path / "full"), **kw), data)
    finetune(_ft(pretrained, tmp_path, out=str(tmp_path / "cut"), **kw), data, max_iterations_this_run=2)
    finetune(_ft(pretrained, tmp_path, out=str(tmp_path / "cut"), **kw), data, resume=True)
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    for name, t in a["recommender"]["model"]["state_dict"].items():
        assert torch.equal(t, b["recommender"]["model"]["state_dict"][name]), name
    lr_last = 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2
    assert a["trainer"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_last)
    # the schedule moved the parameters: a constant rate ends elsewhere
    finetune(_ft(pretrained, tmp_path, out=str(tmp_path / "const"), **{**kw, "lr_schedule": "constant"}), data)
    c = load_checkpoint(str(tmp_path / "const" / "last.pt"))
    assert any(not torch.equal(t, c["recommender"]["model"]["state_dict"][n])
               for n, t in a["recommender"]["model"]["state_dict"].items())


def test_the_thread_count_the_governor_changed_ends_with_the_run(pretrained, data, tmp_path, monkeypatch):
    """A run whose governor lowers torch's threads leaves the caller's count as it found it."""
    from refit.posttrain import trainer as tr

    class Lowering:
        def __init__(self):
            self.ceiling = torch.get_num_threads()

        def tick(self):
            torch.set_num_threads(1)
            return "other processes hold 1.0 of 2 cores: using 1 thread instead of 2"

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(tr, "ThreadGovernor", Lowering)
    try:
        finetune(_ft(pretrained, tmp_path, iterations=2, eval_every=2), data)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
