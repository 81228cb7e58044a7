"""Time per ReFiT iteration and peak memory, each configuration in a fresh process.

    python -m benchmarks.studies.finetune_iteration --checkpoint runs/pretrain-diffrec-ml-1m_clean/best.pt

For each batch size, precision, way of taking the log-probabilities and
backend choice (the kernels, or ``REFIT_BACKEND=reference`` for every op), it
runs warm-up iterations, then times ``--iterations`` iterations and reports
the median, with the process's peak resident memory. Evaluation is not part
of an iteration.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from refit.families.diffrec.pretrain import load_recommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT
args = json.loads(sys.argv[1])
rec, data, _ = load_recommender(args["checkpoint"], precision=args["precision"])
cfg = FinetuneConfig(checkpoint=args["checkpoint"], batch_size=args["batch_size"], precision=args["precision"],
                     reuse_sampling_graph=args["reuse"], seed=0)
trainer = ReFiT(rec, data, cfg)
for _ in range(args["warmup"]):
    trainer.step()
times = []
for _ in range(args["iterations"]):
    t = time.perf_counter()
    trainer.step()
    times.append(time.perf_counter() - t)
print(json.dumps({"median_s": statistics.median(times),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batch-sizes", default="64,400")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    rows = []
    print(f"{'B':>4} {'precision':>9} {'log-probs from':>16} {'ops':>10} {'s/iteration':>12} {'peak MiB':>9}")
    for b, prec, reuse, backend in itertools.product([int(x) for x in a.batch_sizes.split(",")], ["fp32", "bf16"],
                                                     [False, True], ["kernels", "reference"]):
        env = dict(os.environ)
        env.pop("REFIT_BACKEND", None)
        if backend == "reference":
            env["REFIT_BACKEND"] = "reference"
        spec = {"checkpoint": a.checkpoint, "batch_size": b, "precision": prec, "reuse": reuse,
                "iterations": a.iterations, "warmup": a.warmup}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(out.returncode)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        row = {**spec, "ops": backend, **res}
        rows.append(row)
        way = "sampling pass" if reuse else "batched re-run"
        print(f"{b:>4} {prec:>9} {way:>16} {backend:>10} {res['median_s']:>12.3f} {res['peak_mb']:>9.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
