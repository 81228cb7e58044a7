"""Post-training under controls: fine-tuned models next to a placebo and equal-time pretraining, over seeds.

    python -m benchmarks.studies.post_training_study --pretrained runs/dr-ml1m-s{seed}/best.pt --seeds 1 2 3 \\
        --out runs/study-ml1m [--finetune "--lr 1e-4 --iterations 200"] [--jobs 2]

For every seed, starting from that seed's pretrained checkpoint (``{seed}``
in ``--pretrained`` is replaced by the seed), it runs with ``refit`` in
fresh processes (``OMP_NUM_THREADS=1``, ``--jobs`` at a time):

* ``reinforce`` (or ``--arm``'s name): ``refit finetune`` with ``--finetune``'s flags (ReFiT's
  REINFORCE unless they name another method);
* ``placebo``: the same with ``--placebo`` (each batch's advantages shuffled);
* ``continued``: ``refit pretrain --init`` (the model's own pretraining
  loss) for the wall time that run took, evaluated every epoch;
* every ``--method`` given (e.g. ``--method "reward-weighted --group-size 4"``), as
  ``refit finetune --method NAME`` with ``--finetune``'s flags, then ``--method-flags``, then
  the method's own flags (later flags win).

Every run selects its model on validation (Recall@20 or HR@20) and reports
the test metrics of that model; the pretrained model's own metrics come from
its checkpoint's run. The table is printed and written, with every run's
numbers and times, to ``OUT/study.json`` and ``OUT/study.md``. Per arm it
gives the test metric (mean and standard deviation over seeds) and its
change against the starting model evaluated the same way, as the mean and
standard deviation over seeds. A fine-tuning run's own iteration-0
evaluation uses the same batches and sampling seeds as its later ones, so
its change is paired. DreamRec's sampled evaluation moves test HR@20 by about
0.0015 between sampling seeds, which is as large as the effects measured.
``OUT/study.json`` is rewritten after every finished seed (``"finished"`` false until the last), so a
study stopped early keeps its finished seeds; ``--report`` rewrites the table from an existing
``OUT/study.json``. On data
with ratings, ``--min-target-rating R`` adds a second table: every run's
selected model evaluated again with only the held-out items rated >= R as
hits (``OUT/study-rated-R.md`` and ``.json``).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from benchmarks.paths import child_env


def _run(cmd, log):
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env()).returncode
    if rc != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit {rc}; see {log}")
    return time.perf_counter() - t0


def _summary(folder):
    with open(os.path.join(folder, "summary.json")) as f:
        return json.load(f)


def _pretrained_metrics(checkpoint):
    """The test metrics of the pretrained model as its own run selected it (its summary.json)."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    s = _summary(folder)
    return {"valid": s["valid"], "test": s["test"], "seconds": s.get("seconds")}


def _load(checkpoint):
    from refit.runtime.runs import load_checkpoint

    return load_checkpoint(checkpoint)


def _write_json(a, results, *, finished):
    with open(os.path.join(a.out, "study.json"), "w") as f:
        json.dump({"args": vars(a), "finished": finished, "results": results}, f, indent=1)


def run_seed(seed, a, out):
    ckpt = a.pretrained.replace("{seed}", str(seed))
    refit = [sys.executable, "-m", "refit", "-q"]
    finetune = ["--overwrite", *shlex.split(a.finetune)]  # a study run again replaces its runs
    res = {"pretrained": _pretrained_metrics(ckpt)}
    folder = os.path.join(out, f"{a.arm}-s{seed}")
    wall = _run(refit + ["finetune", "--checkpoint", ckpt, "--seed", str(seed), "--no-plot", "--out", folder,
                         *finetune], folder + ".log")
    res[a.arm] = {**_summary(folder), "wall_s": wall}
    folder = os.path.join(out, f"placebo-s{seed}")
    wall_p = _run(refit + ["finetune", "--checkpoint", ckpt, "--seed", str(seed), "--no-plot", "--placebo",
                           "--out", folder, *finetune], folder + ".log")
    res["placebo"] = {**_summary(folder), "wall_s": wall_p}
    for spec in a.method:
        method, *own = shlex.split(spec)  # "NAME [its own flags]"
        folder = os.path.join(out, f"{method}-s{seed}")
        w = _run(refit + ["finetune", "--checkpoint", ckpt, "--seed", str(seed), "--no-plot", "--method", method,
                          "--out", folder, *finetune, *shlex.split(a.method_flags), *own], folder + ".log")
        res[method] = {**_summary(folder), "wall_s": w}
    # Continued pretraining for the wall time ReFiT's whole run took (its set-up included).
    folder = os.path.join(out, f"continued-s{seed}")
    # The checkpoint's own model and data, read with the options it was trained on.
    state = _load(ckpt)
    model = state["recommender"]["model"]
    cont = ["pretrain", "--model", model.get("network", model["name"]),
            *(["--data", a.data] if a.data else _data_flags(state, ckpt)),
            "--init", ckpt, "--seed", str(seed), "--epochs", "100000",
            "--eval-every", "1", "--patience", "100000", "--time-budget", f"{res[a.arm]['seconds']:.1f}",
            "--out", folder, "--overwrite", *_loss_flags(state), *shlex.split(a.pretrain)]
    del state
    wall_c = _run(refit + cont, folder + ".log")
    res["continued"] = {**_summary(folder), "wall_s": wall_c}
    return seed, res


#: ``refit pretrain`` flags of a sequential run's settings that continued pretraining keeps: its network
#: (which ``--init`` must match), loss, optimiser and sampler.
_SEQ_FLAGS = ("hidden", "max_len", "dropout", "heads", "diffuser", "p_uncond", "lamda", "gamma", "reconstruction",
              "pairing", "negatives", "lr", "weight_decay", "batch_size", "steps", "noise_schedule", "beta_start",
              "beta_end", "eval_steps", "eval_eta", "precision")


def _loss_flags(state):
    """``refit pretrain``'s flags that continue a sequential checkpoint (its loaded ``state``) as it was
    trained: its network, loss, optimiser and sampler settings (``_SEQ_FLAGS``, those its config holds) and
    its ``ce_weight`` (0 for one written before the flag existed); none for the other families. The
    continued model recommends with the checkpoint's guidance weight."""
    if state["recommender"]["model"]["name"] != "dreamrec":
        return []
    config = state.get("config", {})
    flags = []
    for name in _SEQ_FLAGS:
        if config.get(name) is not None:
            flags += ["--" + name.replace("_", "-"), str(config[name])]
    if "detach_target" in config:
        flags.append("--detach-target" if config["detach_target"] else "--no-detach-target")
    # It recommends as the checkpoint does (its inference w, which may have been chosen on validation),
    # as the fine-tuned arms do: the guidance weight is no part of the pretraining loss.
    return flags + ["--ce-weight", repr(float(config.get("ce_weight", 0.0))),
                    "--w", repr(float(state["recommender"]["inference"]["w"])), "--w-grid", "none"]


def _data_flags(state, ckpt):
    """``refit pretrain``'s data flags for the data a checkpoint (its loaded ``state``, read from the
    file ``ckpt``) was trained on."""
    data = state["data"]
    options = dict(data.get("options") or {})
    flags = ["--data", data["source"]]
    if "min_rating" in options:
        value = options.pop("min_rating")
        flags += ["--min-rating", "none" if value is None else repr(value)]
    if "train_targets" in options:
        flags += ["--train-targets", options.pop("train_targets")]
    if options:
        raise SystemExit(f"{ckpt}: its data options {sorted(options)} have no refit pretrain flag; "
                         f"pass the data with --data")
    return flags


def _start(run, res, m):
    """The metric of the starting model under the same evaluation as ``run``'s own: a fine-tuning run
    evaluates its iteration 0 (its ``before``) with the batches and seeds of all its evaluations, so
    its change is paired; continued pretraining evaluates as the pretraining run did."""
    return run["before"]["test"][m] if "before" in run else res["pretrained"]["test"][m]


def rated_results(results, pretrained, min_rating):
    """``results`` with every run's selected checkpoint (and each seed's pretrained one) evaluated again,
    counting as hits only the held-out items rated >= min_rating (interaction data with ratings; see
    ``refit evaluate --min-target-rating``). DiffRec's evaluation samples nothing, so each change is
    paired against the pretrained checkpoint evaluated the same way."""
    from refit.evaluate import evaluate_recommender
    from refit.families.diffrec.pretrain import load_recommender

    def metrics(checkpoint, data):
        rec, data, _ = load_recommender(checkpoint, data)
        return evaluate_recommender(rec, data, ("valid", "test"), ks=(20,), min_target_rating=min_rating), data

    rated = {}
    for seed, res in results.items():
        start, data = metrics(pretrained.replace("{seed}", str(seed)), None)
        rated[seed] = {"pretrained": {**res["pretrained"], **start}}
        for arm, run in res.items():
            if arm != "pretrained":
                evaluated, _ = metrics(run["checkpoint"], data)
                rated[seed][arm] = {**{k: v for k, v in run.items() if k != "before"}, **evaluated}
    return rated


def table(results, metrics):
    """Markdown: per arm, the test metric's mean ± sd over seeds, and the mean ± sd over seeds of its
    change against the starting model evaluated the same way (see :func:`_start`)."""
    rows = []
    arms = list(next(iter(results.values())).keys())
    for arm in arms:
        line = [arm]
        for m in metrics:
            vals = [r[arm]["test"][m] for r in results.values()]
            deltas = [r[arm]["test"][m] - _start(r[arm], r, m) for r in results.values()]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            dsd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            line.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}")
            line.append(f"{statistics.mean(deltas):+.4f} ± {dsd:.4f}")
        secs = [r[arm].get("seconds") for r in results.values() if r[arm].get("seconds") is not None]
        line.append(f"{statistics.mean(secs):.0f}" if secs else "-")
        its = [r[arm]["s_per_iteration"] for r in results.values() if r[arm].get("s_per_iteration")]
        line.append(f"{statistics.median(its):.2f}" if its else "-")
        mem = [r[arm]["peak_memory_mb"] for r in results.values() if r[arm].get("peak_memory_mb")]
        line.append(f"{max(mem):.0f}" if mem else "-")
        rows.append(line)
    head = ("| arm | " + " | ".join(f"test {m} | change" for m in metrics) +
            " | seconds | s / iteration | peak MB |")
    sep = "| --- | " + " | ".join("---: | ---:" for _ in metrics) + " | ---: | ---: | ---: |"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", help="checkpoint path with {seed} for the seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="the data (default: the checkpoint's own source)")
    p.add_argument("--finetune", default="", help="flags for every refit finetune run")
    p.add_argument("--arm", default="reinforce",
                   help="the name of the main arm, run with --finetune's flags (e.g. grpo with --finetune "
                        "\"--method grpo ...\"); its placebo and the equal-time continued pretraining follow it")
    p.add_argument("--pretrain", default="", help="extra flags for the continued-pretraining runs")
    p.add_argument("--method", action="append", default=[],
                   help='another post-training method to run, optionally with its own flags: "NAME [FLAGS]"')
    p.add_argument("--method-flags", default="", help="extra flags for the --method runs")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at a time (one core each)")
    p.add_argument("--report", action="store_true", help="only rewrite the table from OUT/study.json")
    p.add_argument("--min-target-rating", type=float, default=None, metavar="R",
                   help="also tabulate every run's selected model with only held-out items rated >= R as hits "
                        "(data with ratings; written to OUT/study-rated-R.md and .json)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if not a.report and not a.pretrained:
        p.error("--pretrained is required (unless --report)")
    if a.report:
        with open(os.path.join(a.out, "study.json")) as f:
            results = json.load(f)["results"]
    else:
        # study.json is written after every finished seed (``"finished": false`` until the last), so a
        # study stopped early keeps the seeds it completed and --report tabulates them.
        results = {}
        with ThreadPoolExecutor(a.jobs) as pool:
            for seed, res in (f.result() for f in as_completed([pool.submit(run_seed, s, a, a.out)
                                                                   for s in a.seeds])):
                results[seed] = res
                _write_json(a, results, finished=len(results) == len(a.seeds))
        results = {s: results[s] for s in a.seeds}
    first = next(iter(results.values()))["pretrained"]["test"]
    metrics = ["hr@20", "ndcg@20"] if "hr@20" in first else ["recall@20", "ndcg@20"]
    text = table(results, metrics)
    print(text)
    if not a.report:
        _write_json(a, results, finished=True)
    with open(os.path.join(a.out, "study.md"), "w") as f:
        f.write(text + "\n")
    if a.min_target_rating is not None:
        pretrained = a.pretrained
        if a.report:
            with open(os.path.join(a.out, "study.json")) as f:
                pretrained = json.load(f)["args"]["pretrained"]
        rated = rated_results(results, pretrained, a.min_target_rating)
        text = table(rated, metrics)
        print(f"\nhits: held-out items rated >= {a.min_target_rating:g}\n{text}")
        name = os.path.join(a.out, f"study-rated-{a.min_target_rating:g}")
        with open(name + ".json", "w") as f:
            json.dump({"min_target_rating": a.min_target_rating, "results": rated}, f, indent=1)
        with open(name + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
