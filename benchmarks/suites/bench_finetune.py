"""One ReFiT iteration (B = 64) on ML-1M: the kernels against REFIT_BACKEND=reference.

An untrained DiffRec with ML-1M's shapes stands in for a pretrained one (the
time of an iteration does not depend on the weights). ``REFIT_BENCH_QUICK=1``
uses the synthetic data set. For per-configuration times and peak memory see
``benchmarks/studies/finetune_iteration.py``.

    pytest benchmarks/suites/bench_finetune.py --benchmark-only
"""

import pytest
import torch

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record
from refit.data import load_dataset
from refit.diffusion import GaussianDiffusion
from refit.families.diffrec.denoisers import build_model
from refit.families.diffrec.pretrain import PretrainConfig
from refit.families.diffrec.recommender import RowRecommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT

_DATA = {}


@pytest.mark.parametrize("ops", ["kernels", "reference"])
def test_finetune_iteration(benchmark, monkeypatch, ops):
    if "data" not in _DATA:
        path = None if QUICK else shared_data("ml-1m_clean")
        if not QUICK and path is None:
            pytest.skip("ML-1M not found in $REFIT_DATA or ../shared/data (ml-1m_clean)")
        _DATA["data"] = load_dataset("synthetic") if QUICK else load_dataset(path)
    data = _DATA["data"]
    if ops == "reference":
        monkeypatch.setenv("REFIT_BACKEND", "reference")
    else:
        monkeypatch.delenv("REFIT_BACKEND", raising=False)
    cfg = PretrainConfig()
    torch.manual_seed(0)
    rec = RowRecommender("diffrec", build_model("diffrec", cfg.model_config(data.n_items)),
                      GaussianDiffusion(cfg.diffusion_config()))
    trainer = ReFiT(rec, data, FinetuneConfig(checkpoint="", batch_size=64, seed=0))
    benchmark.group = "ReFiT iteration (B = 64, fp32)"
    benchmark.pedantic(trainer.step, rounds=5 if QUICK else 10, warmup_rounds=1)
    record(benchmark, benchmark.group, ops, baseline="reference")
