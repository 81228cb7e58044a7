"""One GRPO update on ml-1m_seq DreamRec: 1,024 trajectories (64 targets x groups of 16) of 20 respaced
steps, the dense NDCG reward, against REFIT_BACKEND=reference (every kernel's PyTorch reference).

Two samplers: every step draws noise (``all-steps``: the log-likelihood of 19 steps per trajectory
is re-evaluated), and one exploring step (``explore-1``: DDIM elsewhere, one step re-evaluated).
An untrained DreamRec with the published sizes stands in for a pretrained one (the time of an update
does not depend on the weights; with the dense reward no group is dropped). ``REFIT_BENCH_QUICK=1``
uses the synthetic sequences.

    pytest benchmarks/suites/bench_grpo.py --benchmark-only
"""

import pytest
import torch

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record
from refit.data import load_dataset
from refit.diffusion import GaussianDiffusion
from refit.families.dreamrec.network import DreamRec
from refit.families.dreamrec.pretrain import DreamRecConfig
from refit.families.dreamrec.recommender import SeqRecommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT

_DATA = {}
SAMPLERS = {"all-steps": {}, "explore-1": {"explore_steps": 1}}


def _data():
    if "data" not in _DATA:
        path = None if QUICK else shared_data("ml-1m_seq")
        if not QUICK and path is None:
            pytest.skip("ml-1m_seq not found in $REFIT_DATA or ../shared/data")
        _DATA["data"] = load_dataset("synthetic-seq") if QUICK else load_dataset(path)
    return _DATA["data"]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("ops", ["kernels", "reference"])
def test_grpo_update(benchmark, monkeypatch, ops, sampler):
    data = _data()
    if ops == "reference":
        monkeypatch.setenv("REFIT_BACKEND", "reference")
    else:
        monkeypatch.delenv("REFIT_BACKEND", raising=False)
    cfg = DreamRecConfig()
    torch.manual_seed(0)
    policy = SeqRecommender(DreamRec(**cfg.model_config(data.n_items)), GaussianDiffusion(cfg.diffusion_config()),
                            w=cfg.w)
    trainer = ReFiT(policy, data, FinetuneConfig(checkpoint="", method="grpo", group_size=16, batch_size=1024,
                                                 reward="ndcg", rl_steps=20, probe_size=0, seed=0,
                                                 **SAMPLERS[sampler]))
    benchmark.group = f"GRPO update, DreamRec ml-1m_seq, 1,024 trajectories x 20 steps ({sampler})"
    benchmark.pedantic(trainer.step, rounds=3 if QUICK else 7, warmup_rounds=1)
    record(benchmark, benchmark.group, ops, baseline="reference")
