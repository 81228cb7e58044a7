"""One post-training iteration of each method, at B = 64 trajectories (or logged rows):

* ``reinforce``: ReFiT's policy gradient (sampling, reward, one batched re-forward, update);
* ``reward-weighted``: 16 users x 4 trajectories, the denoising loss toward the samples;
* ``offline-reward-weighted``: no sampling, the rating-weighted pretraining loss (DiffRec only:
  ml-1m_clean carries no ratings, so seeded ratings 1-5 stand in -- the time does not depend on them);
* ``pretraining-step``: one step of the model's own pretraining loss on the same users, the unit of
  the equal-time control.

Backbones: DiffRec on ml-1m_clean and DreamRec on ml-1m_seq, both untrained with the published
sizes (the time of an iteration does not depend on the weights). ``REFIT_BENCH_QUICK=1`` uses the
synthetic data sets.

    pytest benchmarks/suites/bench_methods.py --benchmark-only
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record
from refit.data import load_dataset
from refit.diffusion import GaussianDiffusion
from refit.families.diffrec.denoisers import build_model
from refit.families.dreamrec.network import DreamRec
from refit.families.diffrec.pretrain import PretrainConfig
from refit.families.diffrec.recommender import RowRecommender
from refit.families.dreamrec.pretrain import DreamRecConfig
from refit.families.dreamrec.recommender import SeqRecommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT

_DATA = {}
METHODS = {
    "reinforce": dict(),
    "reward-weighted": dict(method="reward-weighted", group_size=4),
    "offline-reward-weighted": dict(method="offline-reward-weighted"),
    "pretraining-step": dict(),
}


def _data(backbone):
    if backbone not in _DATA:
        name = "ml-1m_clean" if backbone == "diffrec" else "ml-1m_seq"
        if QUICK:
            data = load_dataset("synthetic" if backbone == "diffrec" else "synthetic-seq")
        else:
            path = shared_data(name)
            if path is None:
                pytest.skip(f"{name} not found in $REFIT_DATA or ../shared/data")
            data = load_dataset(path)
        if backbone == "diffrec":
            ratings = data.train.copy().astype(np.float32)
            ratings.data = np.random.default_rng(0).integers(1, 6, ratings.nnz).astype(np.float32)
            data.train_ratings = sp.csr_matrix(ratings)
        _DATA[backbone] = data
    return _DATA[backbone]


def _policy(backbone, data):
    torch.manual_seed(0)
    if backbone == "diffrec":
        cfg = PretrainConfig()
        return RowRecommender("diffrec", build_model("diffrec", cfg.model_config(data.n_items)),
                           GaussianDiffusion(cfg.diffusion_config()))
    cfg = DreamRecConfig()
    return SeqRecommender(DreamRec(**cfg.model_config(data.n_items)), GaussianDiffusion(cfg.diffusion_config()),
                          w=cfg.w)


@pytest.mark.parametrize("backbone", ["diffrec", "dreamrec"])
@pytest.mark.parametrize("method", list(METHODS))
def test_post_training_iteration(benchmark, backbone, method):
    if backbone == "dreamrec" and method == "offline-reward-weighted":
        pytest.skip("sequence data carry no ratings")
    data = _data(backbone)
    policy = _policy(backbone, data)
    trainer = ReFiT(policy, data, FinetuneConfig(checkpoint="", batch_size=64, seed=0, **METHODS[method]))
    step = trainer.step
    if method == "pretraining-step":
        def step():
            episode, _, _ = trainer.draw()
            policy.module.train()
            loss = policy.pretraining_loss(episode, generator=trainer.generator).mean()
            trainer._update(loss)

    benchmark.group = f"post-training iteration, {backbone} (B = 64, fp32)"
    benchmark.pedantic(step, rounds=5 if QUICK else 10, warmup_rounds=1)
    record(benchmark, benchmark.group, method, baseline="pretraining-step")
