"""The trainer's hooks: a reward function of the user's and an episode source of the user's."""

import json

import pytest
import torch
from torch import nn

from refit.data import load_dataset
from refit.policy import InteractionEpisodes, ScheduleDenoiser
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
from refit.posttrain.run import finetune

DATA = {"n_users": 80, "n_items": 50}


class Net(nn.Module):
    def __init__(self, n_items):
        super().__init__()
        self.inp, self.out = nn.Linear(n_items + 1, 16), nn.Linear(16, n_items)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(torch.cat([x, t[:, None].float() / 10], 1))))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


def _policy(data, seed=0):
    torch.manual_seed(seed)
    return ScheduleDenoiser(Net(data.n_items), [1e-3 * (i + 1) for i in range(8)], n_items=data.n_items)


def _cfg(tmp_path, **kw):
    base = dict(iterations=3, batch_size=8, eval_every=3, probe_size=16, lr=1e-3, out=str(tmp_path / "ft"),
                progress=False, plot=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_a_reward_function_is_what_the_run_optimises_and_probes(data, tmp_path):
    seen = []

    def item_zero_first(scores, episode):
        # Higher when item 0 ranks higher: minus the share of items scored above it.
        seen.append((tuple(scores.shape), episode.users.numel(), episode.positives.indptr.numel()))
        return -(scores > scores[:, :1]).float().mean(1)

    summary = finetune(_cfg(tmp_path), data, policy=_policy(data), reward_fn=item_zero_first)
    probe, batch = ((16, data.n_items), 16, 17), ((8, data.n_items), 8, 9)
    assert seen == [probe, batch, batch, batch, probe]  # the probe at 0 and 3, the run's 3 batches of 8
    records = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    steps = [r for r in records if r.get("iteration", 0) > 0]
    assert all(-1.0 <= r["reward"] <= 0.0 for r in steps)  # this reward's range, not the collaborative one's
    probe = summary["probe"]["start"]["probe_reward"]
    assert -1.0 <= probe <= 0.0 and probe < 0


@pytest.mark.parametrize("bad, message", [
    (lambda s, e: s.mean(), r"reward_fn must return a \(8,\) float tensor .* got torch.float32 \(\)"),
    (lambda s, e: torch.ones(8, dtype=torch.long), r"got torch.int64 \(8,\)"),
    (lambda s, e: torch.full((8,), float("nan")), "NaN or infinite"),
    (lambda s, e: [0.0] * 8, "got list"),
])
def test_a_reward_function_returning_the_wrong_thing_is_refused(data, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        finetune(_cfg(tmp_path, probe_size=0), data, policy=_policy(data), reward_fn=bad)
    with pytest.raises(TypeError, match="reward_fn must be a function"):
        ReFiT(_policy(data), data, _cfg(tmp_path), reward_fn=3)


class FirstTenUsers:
    """An episode source of the user's: the data's own episodes, restricted to users 0-9."""

    def __init__(self, data):
        self.inner = InteractionEpisodes(data)
        self.inner.candidates = self.inner.candidates[self.inner.candidates < 10]
        self.drawn = []

    @property
    def neighbor_sets(self):
        return self.inner.neighbor_sets

    def __len__(self):
        return len(self.inner)

    def sample(self, n, generator):
        episode = self.inner.sample(n, generator)
        self.drawn.append(episode.users.clone())
        return episode


def test_episodes_come_from_the_users_source(data, tmp_path):
    source = FirstTenUsers(data)
    finetune(_cfg(tmp_path, probe_size=4), data, policy=_policy(data), episodes=source)
    users = torch.cat(source.drawn)
    assert users.numel() == 3 * 8 + 4 and int(users.max()) < 10  # 3 batches and the probe, all from it
    with pytest.raises(TypeError, match=r"must have sample\(n, generator\), neighbor_sets and len\(\); it lacks"):
        ReFiT(_policy(data), data, _cfg(tmp_path), episodes=object())
