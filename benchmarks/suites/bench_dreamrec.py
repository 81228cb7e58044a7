"""DreamRec on ml-1m_seq: training steps and one evaluation pass, against plain PyTorch and torch.compile.

    pytest benchmarks/suites/bench_dreamrec.py --benchmark-only

Training: ``STEPS`` optimiser steps of batch 256 (an epoch of ml-1m_seq is
3,838), eager against ``torch.compile`` of the encoder and the denoiser (no
refit kernel runs in a training step). Evaluation: sampling and ranking
every user's validation and test targets (6,040 each) with T = 500 steps:

* ``refit``: the folded sampler (one D x D product per step) and the
  ``topk_hits`` kernel;
* ``reference``: the step-by-step sampler (the guided denoiser called twice
  per step) and ``REFIT_BACKEND=reference`` ranking;
* ``reference-compiled``: the same with ``torch.compile`` of the denoiser.

``REFIT_BENCH_QUICK=1`` uses a small synthetic sequence set and 50 steps.
"""

import pytest
import torch

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record
from refit.data import load_dataset
from refit.diffusion import GaussianDiffusion
from refit.families.dreamrec.network import DreamRec
from refit.families.dreamrec.pretrain import DreamRecConfig
from refit.families.dreamrec.recommender import SeqRecommender, evaluate_dreamrec
from refit.families.dreamrec.losses import dreamrec_loss

STEPS = 20 if QUICK else 200
_CACHE = {}


def _setup():
    if "data" not in _CACHE:
        if QUICK:
            _CACHE["data"] = load_dataset("synthetic-seq")
        else:
            path = shared_data("ml-1m_seq")
            if path is None:
                pytest.skip("ml-1m_seq not found in $REFIT_DATA or ../shared/data")
            _CACHE["data"] = load_dataset(path)
    data = _CACHE["data"]
    cfg = DreamRecConfig(steps=50 if QUICK else 500)
    torch.manual_seed(0)
    model = DreamRec(**cfg.model_config(data.n_items))
    return data, cfg, SeqRecommender(model, GaussianDiffusion(cfg.diffusion_config()), w=cfg.w)


def _compiled(rec: SeqRecommender) -> SeqRecommender:
    """The same recommender whose encoder and denoiser run through torch.compile."""
    model = rec.model
    model.encode = torch.compile(model.encode, dynamic=False)
    model.denoise = torch.compile(model.denoise, dynamic=False)
    return rec


@pytest.mark.parametrize("impl", ["reference", "reference-compiled"])
def test_training_steps(benchmark, impl):
    data, cfg, rec = _setup()
    if impl == "reference-compiled":
        rec = _compiled(rec)
    optimizer = torch.optim.AdamW(rec.model.parameters(), lr=cfg.lr)
    batches = data.batches("train", cfg.batch_size, shuffle=True, seed=0, drop_last=True)
    generator = torch.Generator().manual_seed(0)

    def steps():
        rec.model.train()
        for i, (history, lengths, targets, _) in enumerate(batches):
            if i == STEPS:
                break
            loss = dreamrec_loss(rec, history, lengths, targets, generator).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    benchmark.group = f"DreamRec training: {STEPS} steps of batch {cfg.batch_size} ({len(batches)} per epoch)"
    benchmark.pedantic(steps, rounds=3, warmup_rounds=1)
    record(benchmark, benchmark.group, impl)


@pytest.mark.parametrize("impl", ["refit", "reference", "reference-compiled"])
def test_evaluation_pass(benchmark, impl):
    data, cfg, rec = _setup()
    rec.model.eval()
    if impl == "reference-compiled":
        rec = _compiled(rec)
    kwargs = {} if impl == "refit" else {"fast": False, "backend": "reference"}
    benchmark.group = (f"DreamRec evaluation pass: {len(data.targets['valid'])} + {len(data.targets['test'])} "
                       f"targets, T = {cfg.steps}")
    benchmark.pedantic(lambda: evaluate_dreamrec(rec, data, **kwargs), rounds=3, warmup_rounds=1)
    record(benchmark, benchmark.group, impl)
