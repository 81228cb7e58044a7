"""1 process against N processes under torchrun: ReFiT iterations, pretraining epochs, evaluation.

    python -m benchmarks.studies.distributed_scaling --data ../shared/data/ml-1m_clean

Each configuration runs in a fresh ``torchrun --standalone --nproc_per_node P``
launch with ``OMP_NUM_THREADS=T`` per process; rank 0 reports the medians.
The model is DiffRec's MLP with the ML-1M defaults of ``refit pretrain``,
freshly initialised (speed does not depend on the weights' values), saved as
a checkpoint first. Times exclude start-up; the similar-user table
(computed once per ReFiT run, sharded across the ranks) is timed separately,
as are one all-reduce of a gradient-sized float32 tensor and the global-batch
noise every rank draws per ReFiT iteration.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, statistics, sys, time
import torch
from refit.runtime import distributed as dist
from refit.families.diffrec.pretrain import PretrainConfig, load_recommender, pretrain
from refit.evaluate import evaluate_recommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
a = json.loads(sys.argv[1])
dist.init()
out = {}
rec, data, _ = load_recommender(a["checkpoint"])
# The similar-user table alone (sharded by user blocks, all-gathered).
from refit.similarity import shared_similar_users
shared_similar_users(data.train, m=10)
dist.barrier(); t = time.perf_counter()
shared_similar_users(data.train, m=10)
dist.barrier(); out["similar_s"] = time.perf_counter() - t
# One all-reduce of a gradient-sized float32 tensor (what DDP sends per step, in buckets).
n_params = sum(p.numel() for p in rec.model.parameters())
if dist.is_distributed():
    import torch.distributed as td
    x = torch.ones(n_params)
    ts = []
    for i in range(12):
        dist.barrier(); t = time.perf_counter(); td.all_reduce(x); ts.append(time.perf_counter() - t)
    out["allreduce_ms"] = 1e3 * statistics.median(ts[2:])
# The global-batch noise every rank draws per ReFiT iteration (T steps of B x I normals).
g = torch.Generator().manual_seed(0)
t = time.perf_counter()
for _ in range(rec.diffusion.steps):
    torch.randn((a["batch_size"], data.n_items), generator=g)
out["noise_ms"] = 1e3 * (time.perf_counter() - t)
# ReFiT: set-up (similar-user table) and iterations.
dist.barrier(); t = time.perf_counter()
trainer = ReFiT(rec, data, FinetuneConfig(checkpoint=a["checkpoint"], batch_size=a["batch_size"], seed=0,
                                          progress=False, plot=False))
dist.barrier(); out["refit_setup_s"] = time.perf_counter() - t
for _ in range(a["warmup"]):
    trainer.step()
times = []
for _ in range(a["iterations"]):
    dist.barrier(); t = time.perf_counter()
    trainer.step()
    dist.barrier(); times.append(time.perf_counter() - t)
out["refit_s_per_it"] = statistics.median(times)
# Evaluation (validation and test from one reverse pass), after one warm-up pass.
evaluate_recommender(rec, data)
dist.barrier(); t = time.perf_counter()
evaluate_recommender(rec, data)
dist.barrier(); out["evaluate_s"] = time.perf_counter() - t
# Pretraining epochs (no evaluation): the median of the epochs' training times.
cfg = PretrainConfig(data=a["data"], epochs=a["epochs"], eval_every=10**6, patience=10**6, progress=False,
                     out=a["out"])
pretrain(cfg, data)
if dist.is_main():
    with open(os.path.join(a["out"], "metrics.jsonl")) as f:
        out["pretrain_s_per_epoch"] = statistics.median(json.loads(l)["train_s"] for l in f if l.strip())
    out["world"] = dist.world_size()
    print("RESULT " + json.dumps(out))
dist.shutdown()
"""


def make_checkpoint(data_path: str, path: str) -> None:
    """An untrained DiffRec with the ML-1M defaults, as a refit checkpoint."""
    from refit.data import load_dataset
    from refit.diffusion import GaussianDiffusion
    from refit.families.diffrec.denoisers import build_model
    from refit.families.diffrec.pretrain import PretrainConfig
    from refit.families.diffrec.recommender import RowRecommender
    from refit.runtime.runs import data_fingerprint, save_checkpoint

    import torch

    torch.manual_seed(0)
    data = load_dataset(data_path)
    cfg = PretrainConfig(data=data_path)
    model = build_model(cfg.model, cfg.model_config(data.n_items), train=data.train)
    rec = RowRecommender(cfg.model, model, GaussianDiffusion(cfg.diffusion_config()))
    save_checkpoint(path, {"kind": "pretrain", "recommender": rec.state(), "config": cfg.to_dict(), "epoch": 0,
                           "data": {"source": data_path, "options": {}, "fingerprint": data_fingerprint(data),
                                    "n_users": data.n_users, "n_items": data.n_items}})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--setups", default="1x1,2x1,1x2", help="PROCESSESxTHREADS, comma-separated")
    p.add_argument("--batch-size", type=int, default=64, help="ReFiT trajectories per iteration (global)")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    data = os.path.abspath(a.data)
    work = tempfile.mkdtemp(prefix="refit-dist-bench-")
    ckpt = os.path.join(work, "init.pt")
    make_checkpoint(data, ckpt)
    rows = []
    print(f"{'procs x threads':>15} {'ReFiT s/it':>11} {'it/s':>6} {'setup s':>8} {'similar s':>10} {'eval s':>7} "
          f"{'pretrain s/epoch':>17} {'allreduce ms':>13} {'noise ms':>9}")
    for setup in a.setups.split(","):
        procs, threads = (int(x) for x in setup.split("x"))
        args = {"checkpoint": ckpt, "data": data, "batch_size": a.batch_size, "iterations": a.iterations,
                "warmup": a.warmup, "epochs": a.epochs, "out": os.path.join(work, f"pre-{setup}")}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(CHILD)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={procs}", f.name, json.dumps(args)],
                              capture_output=True, text=True, env=env)
        os.unlink(f.name)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"setup {setup} failed")
        r = json.loads(lines[-1][len("RESULT "):])
        r.update(procs=procs, threads=threads)
        rows.append(r)
        print(f"{setup:>15} {r['refit_s_per_it']:>11.3f} {1 / r['refit_s_per_it']:>6.2f} "
              f"{r['refit_setup_s']:>8.2f} {r['similar_s']:>10.2f} {r['evaluate_s']:>7.2f} "
              f"{r['pretrain_s_per_epoch']:>17.2f} {r.get('allreduce_ms', float('nan')):>13.1f} "
              f"{r['noise_ms']:>9.1f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
