"""Placebo control for ReFiT: the same run with each batch's advantages shuffled between users.

    python benchmarks/refit_placebo.py --checkpoint runs/ml1m-fp32-s1/best.pt --out runs/placebo-s1 --seed 1

(the same as ``refit finetune --placebo``.)

Everything else (users, trajectories, learning rate, evaluation, model
selection on validation Recall@20) is as in ``refit finetune`` with the
defaults; only the link between a trajectory and its reward is broken. Metric
changes of this size in a real run are what the noise of the updates and of
the selection on validation alone produce.
"""

import argparse
import json

from refit.trainer import FinetuneConfig, finetune


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--iterations", type=int, default=200)
    a = p.parse_args()
    summary = finetune(FinetuneConfig(checkpoint=a.checkpoint, out=a.out, seed=a.seed, iterations=a.iterations,
                                      progress=False, placebo=True))
    print(json.dumps({"best_iteration": summary["best_iteration"], "before": summary["before"]["test"],
                      "test": summary["test"]}, indent=1))


if __name__ == "__main__":
    main()
