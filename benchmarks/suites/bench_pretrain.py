"""One pretraining epoch and one evaluation pass of DiffRec on ML-1M (DiffRec's settings).

The evaluation pass scores every user once (the reverse pass, from the clean
training row) and ranks for validation and test: in the hidden space (the
default) and step by step over full rows. ``REFIT_BENCH_QUICK=1`` uses the
small synthetic data set instead.

    pytest benchmarks/suites/bench_pretrain.py --benchmark-only
"""

import pytest
import torch

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record
from refit.data import load_dataset
from refit.diffusion import DiffusionConfig, GaussianDiffusion
from refit.families.diffrec.denoisers import build_model
from refit.families.diffrec.pretrain import PretrainConfig
from refit.evaluate import evaluate_recommender
from refit.families.diffrec.recommender import RowRecommender

_CACHE = {}


def _setup(precision="fp32"):
    if "data" not in _CACHE:
        if QUICK:
            _CACHE["data"] = load_dataset("synthetic")
        else:
            path = shared_data("ml-1m_clean")
            if path is None:
                pytest.skip("ML-1M not found in $REFIT_DATA or ../shared/data (ml-1m_clean)")
            _CACHE["data"] = load_dataset(path)
    data = _CACHE["data"]
    cfg = PretrainConfig(precision=precision)
    torch.manual_seed(0)
    model = build_model("diffrec", cfg.model_config(data.n_items))
    rec = RowRecommender("diffrec", model, GaussianDiffusion(cfg.diffusion_config()), precision=precision)
    return data, cfg, rec


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_epoch(benchmark, precision):
    data, cfg, rec = _setup(precision)
    optimizer = torch.optim.AdamW(rec.model.parameters(), lr=cfg.lr)
    batches = data.batches(cfg.batch_size, "train", shuffle=True, seed=0)
    generator = torch.Generator().manual_seed(0)

    def epoch():
        rec.model.train()
        for users, rows in batches:
            loss = rec.diffusion.training_loss(rec.denoiser(users, rows), rows, generator=generator).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    benchmark.group = f"DiffRec training epoch ({data.n_users} users, batch {cfg.batch_size})"
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    record(benchmark, benchmark.group, precision)


@pytest.mark.parametrize("way", ["hidden-space", "step-by-step"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_pass(benchmark, precision, way):
    data, cfg, rec = _setup(precision)
    if way == "step-by-step":
        scores = rec.scores
        rec.scores = lambda users, rows, **kw: scores(users, rows, latent=False)
    benchmark.group = f"DiffRec evaluation pass ({data.n_users} users, valid + test)"
    benchmark.pedantic(lambda: evaluate_recommender(rec, data), rounds=3, warmup_rounds=1)
    record(benchmark, benchmark.group, f"{way} {precision}")
