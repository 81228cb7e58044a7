"""A diffusion policy written from scratch against the protocol (refit.policy.DiffusionPolicy), with none
of refit's model or policy classes: check_policy takes it, every sampling method fine-tunes it, the
trainer's trajectory log-likelihood is its Gaussian density by hand, and a resumed run is exact."""

import json
import math

import pytest
import torch
from torch import nn

from refit.data import load_dataset
from refit.diffusion import Trajectory
from refit.evaluate import evaluate_many
from refit.policy import batched_outputs, check_policy, episode_source, policy_state
from refit.runtime.runs import load_checkpoint
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.run import finetune
from refit.posttrain.common import trajectory_logprob

DATA = {"n_users": 150, "n_items": 120}


# --- the policy: a few Gaussian steps over interaction rows, fixed constants, a small MLP -------------

class Net(nn.Module):
    def __init__(self, n_items, hidden=32):
        super().__init__()
        self.inp, self.out = nn.Linear(n_items + 1, hidden), nn.Linear(hidden, n_items)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(torch.cat([x, t[:, None].float() / 4], 1))))


class ScratchPolicy:
    """x_{s+1} ~ N(coef_pred[s] * net(x_s, t_s) + coef_x[s] * x_s, exp(log_var[s])) for S = 3 steps from
    the user's (partly hidden) row, then a deterministic step; the final state scores the items."""

    selection_metric, precision, data_kind = "recall@20", "fp32", "interactions"
    COEF_PRED, COEF_X, LOG_VAR = (0.5, 0.6, 0.8), (0.5, 0.4, 0.2), (-3.0, -3.5, -4.0)
    TIMES = (3, 2, 1)  # the stochastic steps' timesteps; the final step is t = 0

    def __init__(self, n_items, seed=0):
        torch.manual_seed(seed)
        self.net, self.n_items = Net(n_items), n_items

    @property
    def module(self):
        return self.net

    @property
    def device(self):
        return torch.device("cpu")

    def sample(self, users, inputs, *, generator=None, temperature=1.0, rows=None, keep_graph=False):
        B, D = inputs.shape
        lo, total = rows or (0, B)
        lv = torch.tensor(self.LOG_VAR) + 2 * math.log(temperature)
        x, states, preds = inputs.float(), [inputs.float()], []
        with torch.set_grad_enabled(keep_graph):
            for s, t in enumerate(self.TIMES):
                out = self.net(x, torch.full((B,), t))
                noise = torch.randn((total, D), generator=generator)[lo:lo + B]  # the global batch's draw
                x = self.COEF_PRED[s] * out + self.COEF_X[s] * x + torch.exp(lv[s] / 2) * noise
                states.append(x.detach())
                preds.append(out)
            final = self.net(x, torch.zeros(B, dtype=torch.long))
        return Trajectory(torch.stack(states), torch.stack(preds), torch.tensor(self.COEF_PRED),
                          torch.tensor(self.COEF_X), lv, torch.tensor(self.TIMES), final.detach())

    def outputs(self, users, inputs, traj):
        return batched_outputs(self.net, traj)

    def final_scores(self, users, inputs, final):
        return final

    def denoising_loss(self, users, inputs, x0, *, generator=None, rows=None):
        B = x0.shape[0]
        lo, total = rows or (0, B)
        t = torch.randint(0, 4, (total,), generator=generator)[lo:lo + B]
        noise = torch.randn((total, x0.shape[1]), generator=generator)[lo:lo + B]
        keep = (1 - t.float() / 4)[:, None]
        return ((self.net(keep * x0 + (1 - keep) * noise, t) - x0) ** 2).mean(1)

    def pretraining_loss(self, episode, *, generator=None, rows=None):
        return self.denoising_loss(episode.users, episode.inputs, episode.inputs, generator=generator, rows=rows)

    def training_target(self, users, inputs, final, *, exclude=None, k=20):
        scores = final.detach().clone()
        if exclude is not None:
            row = torch.repeat_interleave(torch.arange(final.shape[0]), exclude.indptr.diff())
            scores[row, exclude.indices.long()] = -math.inf
        return inputs.float().clone().scatter_(1, scores.topk(k, 1).indices, 1.0)

    def evaluate(self, data, *, ks, batch_size):
        train = torch.from_numpy(data.train.toarray()).float()

        def score(users):
            with torch.no_grad():
                x = train[users]
                for s, t in enumerate(self.TIMES):  # the mean path, no noise
                    x = self.COEF_PRED[s] * self.net(x, torch.full((len(users),), t)) + self.COEF_X[s] * x
                return self.net(x, torch.zeros(len(users), dtype=torch.long))

        return evaluate_many(score, {"valid": (data.valid, [data.train]),
                                     "test": (data.test, [data.train, data.valid])}, ks=ks, batch_size=batch_size)

    def state(self):
        return policy_state(self.net, "scratch", n_items=self.n_items)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


def _cfg(tmp_path, name, **kw):
    base = dict(iterations=2, batch_size=16, eval_every=2, checkpoint_every=1, lr=1e-2, probe_size=8, seed=1,
                ks=(10, 20), progress=False, plot=False, out=str(tmp_path / name))
    return FinetuneConfig(**{**base, **kw})


def test_check_policy_takes_the_scratch_policy(data):
    policy = ScratchPolicy(data.n_items)
    check_policy(policy, data)  # raises on a missing method, a signature or a shape
    check_policy(policy, data, sample_options={})
    metrics = policy.evaluate(data, ks=(10, 20), batch_size=64)
    assert {"valid", "test"} == set(metrics) and 0 <= metrics["valid"]["recall@20"] <= 1
    assert metrics["test"]["n_users"] == DATA["n_users"]


@pytest.mark.parametrize("method,extra", [
    ("reinforce", {}),
    ("grpo", {"group_size": 4}),
    ("reward-weighted", {"group_size": 4}),
])
def test_every_sampling_method_fine_tunes_the_scratch_policy(data, tmp_path, method, extra):
    policy = ScratchPolicy(data.n_items)
    before = {k: v.clone() for k, v in policy.net.state_dict().items()}
    summary = finetune(_cfg(tmp_path, method, method=method, **extra), data, policy=policy)
    assert summary["status"] == "finished" and summary["iterations"] == 2
    assert {"recall@20", "ndcg@20"} <= set(summary["test"])
    moved = max(float((policy.net.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 1e-4  # lr 1e-2: Adam's first steps move each weight by about lr
    last = load_checkpoint(str(tmp_path / method / "last.pt"))
    assert last["iteration"] == 2 and last["recommender"]["model"]["config"]["external"] == "scratch"
    for k, v in policy.net.state_dict().items():
        assert torch.equal(last["recommender"]["model"]["state_dict"][k], v), k


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_the_trainers_log_likelihood_is_the_gaussian_density_by_hand(data, temperature):
    policy = ScratchPolicy(data.n_items, seed=3)
    ep = episode_source(data).sample(5, torch.Generator().manual_seed(0))
    traj = policy.sample(ep.users, ep.inputs, generator=torch.Generator().manual_seed(1), temperature=temperature)
    got = trajectory_logprob(policy, ep.users, ep.inputs, traj, reduction="sum")
    assert got.shape == (5,) and got.requires_grad
    want = torch.zeros(5, dtype=torch.float64)
    x = traj.states.double()
    for s, t in enumerate(ScratchPolicy.TIMES):
        with torch.no_grad():
            out = policy.net(traj.states[s], torch.full((5,), t)).double()
        mean = ScratchPolicy.COEF_PRED[s] * out + ScratchPolicy.COEF_X[s] * x[s]
        var = math.exp(ScratchPolicy.LOG_VAR[s]) * temperature ** 2
        want += (-0.5 * ((x[s + 1] - mean) ** 2 / var + math.log(2 * math.pi * var))).sum(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    mean_red = trajectory_logprob(policy, ep.users, ep.inputs, traj, reduction="mean")
    torch.testing.assert_close(mean_red.double(), want / data.n_items, rtol=1e-5, atol=1e-5)
    # The states are the sampled ones: each step's residual has the variance the constants say.
    resid = (x[1:] - torch.tensor(ScratchPolicy.COEF_PRED, dtype=torch.float64)[:, None, None] * traj.preds.double()
             - torch.tensor(ScratchPolicy.COEF_X, dtype=torch.float64)[:, None, None] * x[:-1])
    ratio = resid.var(dim=(1, 2)) / torch.exp(traj.log_var.double())
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(data, tmp_path):
    cfg = lambda out: _cfg(tmp_path, out, iterations=4, method="grpo", group_size=4)  # noqa: E731
    full = ScratchPolicy(data.n_items)
    finetune(cfg("full"), data, policy=full)
    assert finetune(cfg("cut"), data, policy=ScratchPolicy(data.n_items), max_iterations_this_run=2) == \
        {"stopped_at": 2}
    # A new process: the module rebuilt with other weights, so only last.pt can give the same end.
    resumed = ScratchPolicy(data.n_items, seed=99)
    summary = finetune(cfg("cut"), data, policy=resumed, resume=True)
    assert summary["iterations"] == 4
    logged = [json.loads(line)["iteration"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert logged == [0, 1, 2, 3, 4]
    start = ScratchPolicy(data.n_items).net.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in full.net.state_dict().items())
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
