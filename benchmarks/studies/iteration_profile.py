"""Where the time of one ReFiT iteration goes: the profiler's operator times, by stage.

An untrained DiffRec with ML-1M's shapes (as ``benchmarks/suites/bench_finetune.py``)
runs ``--warmup`` iterations, then ``--iterations`` under ``torch.profiler``, with
the kernels (default dispatch) and with ``REFIT_BACKEND=reference`` in turn. The
operators' self CPU times are summed into stages: the denoiser's matrix products
(forward and backward), the other network operators, the log-likelihood and policy
loss (``refit::gaussian_logprob*``, ``refit::policy_loss``, or their reference
expressions), the reward (``refit::topk_hits`` / ``target_rank`` / ``gather_rows``,
or the reference's sort and gathers), the optimiser, and the rest. Wall time per
iteration is the median of the profiled iterations.

    python -m benchmarks.studies.iteration_profile [--batch-size 64] [--iterations 5] [--data synthetic]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch

from benchmarks.paths import shared_data

_MATMUL = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
_KERNELS = ("refit::",)
_OPTIM = ("Optimizer.step", "aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")
_REWARD_REF = ("aten::topk", "aten::sort", "aten::argsort", "aten::gather", "aten::scatter", "aten::isin",
               "aten::index", "aten::eq", "aten::searchsorted")


def _stage(name: str) -> str:
    # The ops' autograd wrappers are named after the op (GeneratedBackwardFor_refit_policy_loss_default
    # holds the forward's kernel time), hence the substring tests.
    if "gaussian_logprob" in name or "policy_loss" in name:
        return "log-likelihood / policy loss (kernel)"
    if name.startswith(_KERNELS) or "refit_" in name:
        return "reward and gathers (kernels)"
    if name.startswith(_MATMUL):
        return "denoiser matrix products"
    if name.startswith(_OPTIM):
        return "optimiser"
    if name.startswith(_REWARD_REF):
        return "sorts, gathers, comparisons"
    if name.startswith("aten::"):
        return "other tensor operators"
    return "other"


def profile(ops: str, batch_size: int, warmup: int, iterations: int, data_name: str = "ml-1m_clean"):
    if ops == "reference":
        os.environ["REFIT_BACKEND"] = "reference"
    else:
        os.environ.pop("REFIT_BACKEND", None)
    from refit.data import load_dataset
    from refit.diffusion import GaussianDiffusion
    from refit.families.diffrec.denoisers import build_model
    from refit.families.diffrec.pretrain import PretrainConfig
    from refit.families.diffrec.recommender import RowRecommender
    from refit.posttrain.config import FinetuneConfig
    from refit.posttrain.trainer import ReFiT

    path = shared_data(data_name) if data_name != "synthetic" else None
    data = load_dataset(path) if path is not None else load_dataset("synthetic")
    cfg = PretrainConfig()
    torch.manual_seed(0)
    rec = RowRecommender("diffrec", build_model("diffrec", cfg.model_config(data.n_items)),
                      GaussianDiffusion(cfg.diffusion_config()))
    trainer = ReFiT(rec, data, FinetuneConfig(checkpoint="", batch_size=batch_size, seed=0))
    for _ in range(warmup):
        trainer.step()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            t0 = time.perf_counter()
            trainer.step()
            walls.append(time.perf_counter() - t0)
    stages = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("autograd::") or evt.key.startswith("ProfilerStep"):
            continue
        stages[_stage(evt.key)] += evt.self_cpu_time_total / 1e3 / iterations  # ms per iteration
    return statistics.median(walls) * 1e3, dict(stages)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--data", default="ml-1m_clean",
                    help="a data set of ../shared/data (default ml-1m_clean; the synthetic one where it is missing), "
                         "or 'synthetic'")
    args = ap.parse_args(argv)
    results = {}
    before = os.environ.get("REFIT_BACKEND")
    try:
        for ops in ("kernels", "reference"):
            results[ops] = profile(ops, args.batch_size, args.warmup, args.iterations, args.data)
    finally:  # the process's own choice again (this may run inside another program)
        if before is None:
            os.environ.pop("REFIT_BACKEND", None)
        else:
            os.environ["REFIT_BACKEND"] = before
    names = sorted({k for _, st in results.values() for k in st}, key=lambda k: -results["reference"][1].get(k, 0))
    print(f"one ReFiT iteration, DiffRec on {args.data}, B = {args.batch_size}, fp32, "
          f"threads {torch.get_num_threads()}: self CPU ms per iteration")
    print(f"| stage | kernels | reference |\n| --- | ---: | ---: |")
    for k in names:
        print(f"| {k} | {results['kernels'][1].get(k, 0.0):.1f} | {results['reference'][1].get(k, 0.0):.1f} |")
    print(f"| wall time per iteration (median) | {results['kernels'][0]:.1f} | {results['reference'][0]:.1f} |")


if __name__ == "__main__":
    main()
