"""Offline reward-weighted fine-tuning judged on the items users rated highly, under controls.

    python -m benchmarks.studies.offline_rated_study --pretrained runs/ml100k-all-s{seed}/best.pt --seeds 1 2 3 \\
        --out runs/offline-rated [--min-target-rating 5] [--lambdas 0.25,0.5,1,2,4] [--iterations 200] [--jobs 2]

The offline method weights each logged item's loss by ``exp(rating / lambda)``,
so what it aims at is ranking the items a user rates highly, not every item a
user touches. This study measures that: its metric counts as hits only the
held-out items rated at least ``--min-target-rating`` (``refit evaluate
--min-target-rating``), on data read with every rating kept (pretrain with
``--min-rating none``). It also reports the usual metric over every held-out
item.

Every fine-tuning arm runs ``--iterations`` iterations from the seed's
pretrained checkpoint (``{seed}`` in ``--pretrained``), in a fresh process
with ``OMP_NUM_THREADS=1``, and its final model is evaluated: no arm selects a
model, so none can fit validation noise. The arms:

* ``offline``: ``refit finetune --method offline-reward-weighted`` with the lambda
  that gave the best validation metric on the first seed (the others are
  never tuned);
* ``placebo``: the same with ``--placebo`` (each user's weights moved to random
  logged items of the same user);
* ``uniform``: the same with lambda 1e9, i.e. equal weights: plain continued
  training with the same loss, optimiser, batches and number of steps (so the
  same time) as the method.

Next to them: the pretrained model, and ItemKNN and EASE tuned on the
validation split's rated metric. The table reports test metrics as mean ±
standard deviation over seeds and the change against each seed's pretrained
model (mean ± sd), which is paired: DiffRec's evaluation samples nothing.
Everything is written to ``OUT/offline-rated.json`` and ``OUT/offline-rated.md``.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

from benchmarks.studies.post_training_study import _run  # refit in a fresh one-thread process, its log beside it

UNIFORM_LAMBDA = 1e9  # exp(r / 1e9) is 1 to float32 precision for any rating: equal weights


def _finetune(checkpoint, out, seed, lam, iterations, extra, placebo=False):
    cmd = [sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", checkpoint,
           "--method", "offline-reward-weighted", "--rw-lambda", repr(lam), "--iterations", str(iterations),
           "--eval-every", str(iterations), "--seed", str(seed), "--no-plot", "--out", out, "--overwrite", *extra]
    if placebo:
        cmd.append("--placebo")
    wall = _run(cmd, out + ".log")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {"checkpoint": os.path.join(out, "last.pt"), "wall_s": wall,
            "s_per_iteration": summary.get("s_per_iteration"), "peak_memory_mb": summary.get("peak_memory_mb")}


def _metrics(rec, data, rating):
    """{"rated": {split: metrics}, "all": {split: metrics}} at k = 20."""
    from refit.evaluate import evaluate_recommender

    return {"rated": evaluate_recommender(rec, data, ("valid", "test"), ks=(20,), min_target_rating=rating),
            "all": evaluate_recommender(rec, data, ("valid", "test"), ks=(20,))}


def _evaluate(checkpoint, data, rating):
    from refit.families.diffrec.pretrain import load_recommender

    rec, data, _ = load_recommender(checkpoint, data)
    return _metrics(rec, data, rating), data


def baselines(data, rating):
    """ItemKNN and EASE, each tuned on validation Recall@20 over the items rated >= rating."""
    from refit.baselines import DEFAULT_EASE_GRID, DEFAULT_KNN_GRID, EASE, ItemKNN
    from refit.evaluate import evaluate_many
    from refit.evaluate import evaluation_targets

    rated = evaluation_targets(data, ("valid", "test"), rating)
    every = evaluation_targets(data, ("valid", "test"))
    out = {}
    knn = ItemKNN().fit(data.train, k_max=max(DEFAULT_KNN_GRID))
    ease = EASE().fit(data.train)
    for name, model, grid, set_param in [("itemknn", knn, DEFAULT_KNN_GRID, ItemKNN.set_k),
                                         ("ease", ease, DEFAULT_EASE_GRID, EASE.set_l2)]:
        best = None
        for value in grid:
            set_param(model, value)
            m = evaluate_many(model.scores, rated, ks=(20,), exclude_users_without_positives=True,
                              distributed=False)
            if best is None or m["valid"]["recall@20"] > best[1]["rated"]["valid"]["recall@20"]:
                best = (value, {"rated": m, "all": evaluate_many(model.scores, every, ks=(20,), distributed=False)})
        out[name] = {"value": best[0], **best[1]}
    return out


def run_seed(seed, a, lam):
    from refit.families.diffrec.pretrain import load_recommender

    pretrained = a.pretrained.replace("{seed}", str(seed))
    rec, data, _ = load_recommender(pretrained)
    res = {"pretrained": _metrics(rec, data, a.min_target_rating)}
    for arm, arm_lam, placebo in [("offline", lam, False), ("placebo", lam, True), ("uniform", UNIFORM_LAMBDA, False)]:
        run = _finetune(pretrained, os.path.join(a.out, f"{arm}-s{seed}"), seed, arm_lam, a.iterations,
                        shlex.split(a.finetune), placebo)
        metrics, _ = _evaluate(run["checkpoint"], data, a.min_target_rating)
        res[arm] = {**run, **metrics}
    return str(seed), res


def tune_lambda(a):
    """The lambda of the best validation metric (rated) on the first seed, with every value's numbers."""
    seed = a.seeds[0]
    pretrained = a.pretrained.replace("{seed}", str(seed))
    data, tried = None, {}
    for lam in a.lambdas:
        run = _finetune(pretrained, os.path.join(a.out, f"tune-lambda{lam:g}-s{seed}"), seed, lam, a.iterations,
                        shlex.split(a.finetune))
        metrics, data = _evaluate(run["checkpoint"], data, a.min_target_rating)
        tried[f"{lam:g}"] = metrics["rated"]["valid"]["recall@20"]
        print(f"lambda {lam:g}: valid recall@20 over items rated >= {a.min_target_rating:g}: "
              f"{tried[f'{lam:g}']:.4f}", flush=True)
    best = max(a.lambdas, key=lambda lam: tried[f"{lam:g}"])
    return best, tried


def table(results, base, rating):
    rows = []
    arms = ["pretrained", "offline", "placebo", "uniform"]
    cols = [("rated", "recall@20"), ("rated", "ndcg@20"), ("all", "recall@20")]
    for arm in arms:
        line = [arm]
        for kind, m in cols:
            vals = [r[arm][kind]["test"][m] for r in results.values()]
            deltas = [r[arm][kind]["test"][m] - r["pretrained"][kind]["test"][m] for r in results.values()]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            dsd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            line += [f"{statistics.mean(vals):.4f} ± {sd:.4f}", f"{statistics.mean(deltas):+.4f} ± {dsd:.4f}"]
        its = [r[arm]["s_per_iteration"] for r in results.values() if r[arm].get("s_per_iteration")]
        mem = [r[arm]["peak_memory_mb"] for r in results.values() if r[arm].get("peak_memory_mb")]
        line += [f"{statistics.median(its):.3f}" if its else "-", f"{max(mem):.0f}" if mem else "-"]
        rows.append(line)
    for name, b in base.items():
        line = [f"{name} ({b['value']:g}, tuned on this metric)"]
        for kind, m in cols:
            line += [f"{b[kind]['test'][m]:.4f}", ""]
        rows.append(line + ["-", "-"])
    r = f"{rating:g}"
    head = (f"| arm | test recall@20, rated >= {r} | change | test NDCG@20, rated >= {r} | change "
            f"| test recall@20, every item | change | s / iteration | peak MB |")
    sep = "| --- |" + " ---: |" * 8
    return "\n".join([head, sep] + ["| " + " | ".join(x) + " |" for x in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", required=True, help="checkpoint path with {seed} for the seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", required=True)
    p.add_argument("--min-target-rating", type=float, default=5.0)
    p.add_argument("--lambdas", type=lambda t: [float(x) for x in t.split(",")], default=[0.25, 0.5, 1.0, 2.0, 4.0],
                   help="lambda grid, tuned on the first seed's validation split")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--finetune", default="", help="extra flags for every refit finetune run (e.g. --lr)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at a time (one core each)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from refit.families.diffrec.pretrain import load_recommender

    lam, tried = tune_lambda(a)
    print(f"chosen lambda: {lam:g}", flush=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        results = dict(pool.map(lambda s: run_seed(s, a, lam), a.seeds))
    _, data, _ = load_recommender(a.pretrained.replace("{seed}", str(a.seeds[0])))
    base = baselines(data, a.min_target_rating)
    text = table(results, base, a.min_target_rating)
    print(text)
    with open(os.path.join(a.out, "offline-rated.json"), "w") as f:
        json.dump({"args": vars(a), "lambda": lam, "lambda_valid": tried, "results": results, "baselines": base},
                  f, indent=1)
    with open(os.path.join(a.out, "offline-rated.md"), "w") as f:
        f.write(f"lambda {lam:g} (validation, seed {a.seeds[0]}: {tried})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
