"""Each CPU kernel beside busy processes: is there a cliff when the machine is shared?

An OpenMP region ends when every thread of its team has finished. With another
process busy on a core, one of the team's threads can be descheduled for a whole
time slice, and a region of a few hundred microseconds then takes milliseconds.
This runs every op at the shapes the pipeline uses, with 0, 1 and 2 busy
single-threaded processes beside it (each a Python loop), and with the thread
count unset (torch's default), 1 and 2 (``OMP_NUM_THREADS``, set before torch
is imported, in a fresh process per setting). It prints the median and the 90th
percentile of each op's time, in ms, as a Markdown table (and ``--json``).

    python -m benchmarks.studies.contention                       # the table
    python -m benchmarks.studies.contention --repeats 100 --json out.json
    python -m benchmarks.studies.contention --iterations 10       # and one iteration of each method

Run it alone on the machine: the busy processes are its own, and anything else
running adds to them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.paths import child_env


# One process per thread setting: it times every op and prints one JSON line.
CHILD = r"""
import json, sys, time
import numpy as np
import torch
import refit_kernels as rk

repeats = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
rng = np.random.default_rng(0)

# ML-1M-like interactions: 6,040 users x 3,706 items, ~165 items per user.
n_users, n_items = 6040, 3706
rows = [np.sort(rng.choice(n_items, size=int(rng.integers(20, 300)), replace=False)) for _ in range(n_users)]
indptr = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]), dtype=torch.int64)
indices = torch.tensor(np.concatenate(rows), dtype=torch.int64)
A = rk.as_csr((indptr, indices), "A", n_cols=n_items)
users400 = torch.arange(400)
scores = torch.rand(1024, n_items, generator=g)
targets = torch.randint(0, n_items, (1024,), generator=g)
positives = rk.as_csr((torch.arange(1025), targets), "positives", n_cols=n_items)
S, B, D = 20, 1024, 64  # a GRPO update's trajectories on DreamRec
preds = torch.randn(S, B, D, generator=g, requires_grad=True)
states = torch.randn(S + 1, B, D, generator=g)
cp, cx, lv = torch.full((S,), 0.5), torch.full((S,), 0.9), torch.full((S,), -3.0)

def logprob_fwd_bwd():
    preds.grad = None
    rk.gaussian_logprob(preds, states, cp, cx, lv).sum().backward()

ops = {
    "gather_rows (400 users x 3,706 items)": lambda: rk.gather_rows(A, users400, backend="cpu"),
    "topk_hits (1,024 x 3,706, k 20)": lambda: rk.topk_hits(scores, (20,), positives=positives, backend="cpu"),
    "target_rank (1,024 x 3,706)": lambda: rk.target_rank(scores, positives, backend="cpu"),
    "gaussian_logprob fwd+bwd (20 x 1,024 x 64)": logprob_fwd_bwd,
}
iteration_repeats = int(sys.argv[2])
if iteration_repeats:
    # One post-training iteration of each method on DiffRec (its published sizes, untrained: the time
    # does not depend on the weights) over ML-1M-sized synthetic data, B = 64.
    import scipy.sparse as sp
    from refit.data import load_dataset
    from refit.diffusion import GaussianDiffusion
    from refit.families.diffrec.denoisers import build_model
    from refit.families.diffrec.pretrain import PretrainConfig
    from refit.families.diffrec.recommender import RowRecommender
    from refit.posttrain.config import METHODS, FinetuneConfig
    from refit.posttrain.trainer import ReFiT

    data = load_dataset("synthetic", n_users=6040, n_items=3706, seed=0)
    rated = data.train.copy().astype(np.float32)
    rated.data = rng.integers(1, 6, rated.nnz).astype(np.float32)
    data.train_ratings = sp.csr_matrix(rated)
    cfg = PretrainConfig()
    for method in METHODS:  # each with its defaults (GRPO's groups of 16, reward-weighted's of 4, ...)
        torch.manual_seed(0)
        policy = RowRecommender("diffrec", build_model("diffrec", cfg.model_config(data.n_items)),
                             GaussianDiffusion(cfg.diffusion_config()))
        trainer = ReFiT(policy, data, FinetuneConfig(checkpoint="", batch_size=64, seed=0, method=method))
        ops[f"{method} iteration (DiffRec, B 64)"] = trainer.step

out = {}
for name, f in ops.items():
    n = iteration_repeats if name.endswith("B 64)") else repeats
    for _ in range(5 if n == repeats else 2):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    out[name] = {"median": float(np.median(ts)), "p90": float(np.percentile(ts, 90))}
print(json.dumps({"threads": torch.get_num_threads(), "ops": out}))
"""


BUSY = "while True: pass"


def run(threads: str, busy: int, repeats: int, iteration_repeats: int = 0) -> dict:
    env = child_env(None if threads == "unset" else threads)
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)  # let the busy loops take their cores
        res = subprocess.run([sys.executable, "-c", CHILD, str(repeats), str(iteration_repeats)], env=env,
                             capture_output=True, text=True,
                             timeout=1800)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    if res.returncode != 0:
        raise SystemExit(f"the timing process failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200, help="timed calls per op and setting (default 200)")
    p.add_argument("--iterations", type=int, default=0, metavar="N",
                   help="also time N post-training iterations of each method on DiffRec per setting (default 0: none)")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes beside (default 0 1 2)")
    p.add_argument("--threads", nargs="+", default=["unset", "1", "2"], help="OMP_NUM_THREADS settings")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    results = []
    for busy in args.busy:
        for threads in args.threads:
            r = run(threads, busy, args.repeats, args.iterations)
            results.append({"busy": busy, "threads_setting": threads, **r})
            print(f"busy {busy}, threads {threads} ({r['threads']}): "
                  + ", ".join(f"{k.split(' ')[0]} {v['median']:.3f}/{v['p90']:.3f}" for k, v in r["ops"].items()),
                  file=sys.stderr, flush=True)
    ops = list(results[0]["ops"])
    print("| op | busy processes | " + " | ".join(f"threads {t}: median / p90 ms" for t in args.threads) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in args.threads) + " |")
    for op in ops:
        for busy in args.busy:
            cells = []
            for t in args.threads:
                r = next(x for x in results if x["busy"] == busy and x["threads_setting"] == t)
                cells.append(f"{r['ops'][op]['median']:.3f} / {r['ops'][op]['p90']:.3f}")
            print(f"| {op} | {busy} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
