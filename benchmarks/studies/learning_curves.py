"""Does post-training raise its own reward? The probe reward against updates, every recipe next to its placebo.

    python -m benchmarks.studies.learning_curves --checkpoint runs/dr-ml1m-s1/best.pt --out runs/curves-ml1m \\
        --recipe reinforce="--iterations 200" \\
        --recipe grpo="--method grpo --group-size 16 --batch-size 1024 --reward ndcg --rl-steps 20" \\
        [--common "--eval-every 100"] [--seeds 1 2 3] [--jobs 2]

Each recipe (``NAME="refit finetune flags"``) runs as ``refit finetune`` from the checkpoint, once as it
is and once with ``--placebo`` (the same episodes and noise, the advantages or weights shuffled), per
seed, in fresh single-threaded processes (``OMP_NUM_THREADS=1``, ``--jobs`` at a time), into
``OUT/NAME-sSEED[-placebo]``. ``--common`` flags come first, the recipe's after (later flags win).

The probe reward is each run's mean reward on fixed training episodes with fixed noise, measured at
every evaluation (``--probe-size``, see ``refit finetune``); real and placebo runs of one seed probe the
same episodes. The script writes:

* ``OUT/curves.png``: the probe reward, the probe's full-list NDCG of the target (both relative to
  their start) and the validation HR@20 (Recall@20) against updates, each recipe in its colour, the
  placebo dashed;
* ``OUT/curves.json`` and ``OUT/curves.md``: per recipe and arm, the probe reward at the start and at
  the end, its relative change (mean and standard deviation over seeds), the same for the probe NDCG,
  the mean diagnostics over the run (zero-variance groups, within- and between-group spread), the KL
  of the batches' steps from the pretrained policy over the last tenth of the run, seconds per update, and the test HR@20 / NDCG@20 (Recall@20 for
  interaction data) of the final model against the start, with no selection.

``--report`` rebuilds the outputs from the run folders without running anything.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

from benchmarks.studies.post_training_study import _run  # one-thread environment, log, exit check


def _records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _recipes(items):
    out = {}
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise SystemExit(f"--recipe takes NAME=\"flags\" with a plain name, got {item!r}")
        if name in out:
            raise SystemExit(f"--recipe {name!r} given twice")
        out[name] = shlex.split(flags)
    return out


def _first_metric(metrics):
    return "hr@20" if "hr@20" in metrics else "recall@20"


def run_folder(out, name, seed, placebo):
    return os.path.join(out, f"{name}-s{seed}" + ("-placebo" if placebo else ""))


def _arm(folder):
    """One run's curve and numbers from its metrics.jsonl."""
    recs = _records(folder)
    probes = [r for r in recs if "probe_reward" in r]
    steps = [r for r in recs if r.get("iteration", 0) > 0]
    evals = [r for r in recs if "test" in r]
    if not probes or not evals:
        raise SystemExit(f"{folder}: no probe or evaluation was logged (was --probe-size 0?)")
    first = _first_metric(evals[0]["test"])

    def mean(key):
        values = [r[key] for r in steps if key in r]
        return statistics.fmean(values) if values else None

    return {
        "iterations": [r["iteration"] for r in probes],
        "probe_reward": [r["probe_reward"] for r in probes],
        "probe_ndcg": [r["probe_ndcg"] for r in probes],
        "valid_iterations": [r["iteration"] for r in evals],
        "valid": [r["valid"][first] for r in evals],
        "probe_kl": [r.get("probe_kl", 0.0) for r in probes],
        # the KL of the batch's steps from the pretrained policy over the run's last tenth (with an
        # exploring window the probe follows the deterministic path, and its own KL is 0)
        "kl_end": (statistics.fmean([r["kl"] for r in steps[-max(1, len(steps) // 10):] if "kl" in r])
                   if any("kl" in r for r in steps) else None),
        "zero_variance_groups": mean("zero_variance_groups"),
        "reward_within": mean("reward_within"),
        "reward_between": mean("reward_between"),
        "s_per_update": statistics.median([r["step_s"] for r in steps]) if steps else None,
        "metric": first,
        "test_start": {first: evals[0]["test"][first], "ndcg@20": evals[0]["test"]["ndcg@20"]},
        "test_end": {first: evals[-1]["test"][first], "ndcg@20": evals[-1]["test"]["ndcg@20"]},
        "end_iteration": evals[-1]["iteration"],
    }


def _rel(curve):
    return (curve[-1] - curve[0]) / abs(curve[0]) if curve[0] else float("nan")


def _ms(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(out, recipes, seeds):
    table = {}
    for name in recipes:
        for placebo in (False, True):
            arms = [_arm(run_folder(out, name, s, placebo)) for s in seeds]
            key = name + (" placebo" if placebo else "")
            m = arms[0]["metric"]
            table[key] = {
                "recipe": name, "placebo": placebo, "seeds": list(seeds), "runs": arms,
                "probe_reward_change": _ms([_rel(a["probe_reward"]) for a in arms]),
                "probe_ndcg_change": _ms([_rel(a["probe_ndcg"]) for a in arms]),
                "probe_reward_start": _ms([a["probe_reward"][0] for a in arms]),
                "probe_reward_end": _ms([a["probe_reward"][-1] for a in arms]),
                "zero_variance_groups": _ms([a["zero_variance_groups"] for a in arms]),
                "reward_within": _ms([a["reward_within"] for a in arms]),
                "reward_between": _ms([a["reward_between"] for a in arms]),
                "kl_end": _ms([a["kl_end"] for a in arms]),
                "s_per_update": _ms([a["s_per_update"] for a in arms]),
                "metric": m,
                "test_change": _ms([a["test_end"][m] - a["test_start"][m] for a in arms]),
                "test_ndcg_change": _ms([a["test_end"]["ndcg@20"] - a["test_start"]["ndcg@20"] for a in arms]),
                "updates": arms[0]["end_iteration"],
            }
    return table


def _fmt(ms, pct=False, digits=4):
    mean, sd = ms
    if mean is None:
        return "-"
    if pct:
        return f"{100 * mean:+.1f} % ± {100 * sd:.1f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(table):
    rows = ["| recipe | arm | updates | probe reward start -> end | change | probe NDCG change | zero-variance "
            "groups | within / between spread | KL, last tenth | s / update | test change (final model) |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for key, t in table.items():
        within, between = t["reward_within"][0], t["reward_between"][0]
        spread = "-" if within is None else f"{within:.4f} / {between:.4f}"
        test = (f"{t['metric']} {_fmt(t['test_change'], digits=4)}, ndcg@20 {_fmt(t['test_ndcg_change'], digits=4)}")
        rows.append(f"| {t['recipe']} | {'placebo' if t['placebo'] else 'real'} | {t['updates']} | "
                    f"{t['probe_reward_start'][0]:.4f} -> {t['probe_reward_end'][0]:.4f} | "
                    f"{_fmt(t['probe_reward_change'], pct=True)} | {_fmt(t['probe_ndcg_change'], pct=True)} | "
                    f"{_fmt(t['zero_variance_groups'], digits=3)} | {spread} | {_fmt(t['kl_end'], digits=3)} | "
                    f"{t['s_per_update'][0]:.3f} | {test} |")
    return "\n".join(rows) + "\n"


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 4))
    colours = {}
    for key, t in table.items():
        colour = colours.setdefault(t["recipe"], f"C{len(colours)}")
        for i, run in enumerate(t["runs"]):
            label = (t["recipe"] + (" placebo" if t["placebo"] else "")) if i == 0 else None
            style = dict(color=colour, ls="--" if t["placebo"] else "-", lw=1.2, alpha=0.9 if i == 0 else 0.5)
            ax[0].plot(run["iterations"], [v / run["probe_reward"][0] for v in run["probe_reward"]], label=label,
                       **style)
            ax[1].plot(run["iterations"], [v / run["probe_ndcg"][0] for v in run["probe_ndcg"]], label=label, **style)
            ax[2].plot(run["valid_iterations"], run["valid"], label=label, **style)
    ax[0].set(xlabel="updates", ylabel="probe reward / its start", title="the optimised reward, fixed probe")
    ax[1].set(xlabel="updates", ylabel="probe NDCG / its start", title="the target's full-list NDCG, fixed probe")
    metric = next(iter(table.values()))["metric"]
    ax[2].set(xlabel="updates", ylabel=f"validation {metric}", title=f"validation {metric} (every target)")
    for a in ax:
        if a is not ax[2]:
            a.axhline(1.0, color="grey", lw=0.6)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", action="append", default=[], required=True, help='NAME="refit finetune flags"')
    p.add_argument("--common", default="", help="flags every run takes first")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--report", action="store_true", help="rebuild the outputs from existing runs only")
    args = p.parse_args(argv)
    recipes = _recipes(args.recipe)
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        jobs = []
        for name, flags in recipes.items():
            for seed in args.seeds:
                for placebo in (False, True):
                    folder = run_folder(args.out, name, seed, placebo)
                    # A study run again replaces its runs: --overwrite.
                    cmd = [sys.executable, "-m", "refit", "-q", "finetune", "--checkpoint", args.checkpoint,
                           *shlex.split(args.common), *flags, "--seed", str(seed), "--out", folder, "--overwrite"]
                    jobs.append(cmd + (["--placebo"] if placebo else []))
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda c: _run(c, c[c.index("--out") + 1] + ".log"), jobs))
    table = collect(args.out, recipes, args.seeds)
    with open(os.path.join(args.out, "curves.json"), "w") as f:
        json.dump(table, f, indent=1)
    md = markdown(table)
    with open(os.path.join(args.out, "curves.md"), "w") as f:
        f.write(md)
    plot(table, os.path.join(args.out, "curves.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
