"""The ``refit`` command line: info, pretrain, finetune, evaluate, baselines, demo.

    refit info
    refit pretrain --data ../shared/data/ml-1m_clean --out runs/diffrec-ml1m
    refit finetune --checkpoint runs/diffrec-ml1m/best.pt --out runs/refit-ml1m
    refit evaluate --checkpoint runs/refit-ml1m/best.pt --split test
    refit baselines --data ../shared/data/ml-1m_clean --out runs/baselines-ml1m
    refit demo

Every command also runs under ``torchrun`` (``torchrun --nproc_per_node N -m
refit ...``): the process group is joined from the environment before the
command runs, work is shared between the ranks (see :mod:`refit.runtime.distributed`)
and rank 0 alone prints and writes the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from . import __version__
from .settings import add_arguments


# The flags' argument types (refit.settings holds them, for the configs' fields too).
from .settings import (finite_float as _finite_float, float_list as _float_list, int_list as _int_list,  # noqa: E402
                       positive_float as _positive_float, positive_int as _positive_int, seed as _seed)


def _min_rating(text: str):
    """'none' (keep every rating) or a finite number."""
    if text.strip().lower() == "none":
        return None
    return _finite_float(text, " or 'none'")


_UNSET = object()


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, default=None,
                   help="data set: a DiffRec split folder, a .inter / ratings.dat / u.data file, "
                        "'movielens-100k' or 'synthetic'")
    p.add_argument("--min-rating", type=_min_rating, default=_UNSET, metavar="R",
                   help="data with ratings (ratings.dat, u.data, .inter, movielens-100k): keep the "
                        "interactions rated >= R, or every one with 'none' (default: 4)")
    p.add_argument("--train-targets", choices=["all", "last"], default=_UNSET,
                   help="PreferDiff folders: train on every item after the first of each training sequence "
                        "(all, as for leave-one-out data) or on its last item only (last, PreferDiff's own "
                        "training set); default: all")


def _data_options(args) -> dict:
    """load_dataset's options from the data flags (none unless given, so every source takes them)."""
    options = {name: getattr(args, name, _UNSET) for name in ("min_rating", "train_targets")}
    options = {name: value for name, value in options.items() if value is not _UNSET}
    if options and not getattr(args, "data", None):
        flags = " and ".join("--" + name.replace("_", "-") for name in options)
        raise ValueError(f"{flags} needs --data (without it the data is the checkpoint's own, "
                         "with the options it was trained with)")
    return options


def _check_folder_arg(flag: str, path: str) -> None:
    """A run folder given by ``flag``: it may not exist yet, but it may not be a file, nor sit under one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a folder: give a run folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the first ancestor that exists must be a folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r} is under {parent!r}, which is a file, not a folder")


def _check_file_arg(flag: str, path: Optional[str], *, output: bool = False) -> None:
    """A file given by ``flag``: it must exist and be a file (``output``: it may not exist yet, but it may not
    be a folder, and its folder must be one)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file" +
                         (" (e.g. best.pt inside it)" if os.path.exists(os.path.join(path, "best.pt")) else ""))
    if output:
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ValueError(f"{flag} {path!r} is under {parent!r}, which is a file, not a folder")
        if not os.path.exists(parent):
            _check_folder_arg(flag, parent)
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is not a regular file")


def _pretrain_configs():
    """``[(family name, its config class)]`` of every registered family."""
    from . import families

    return [(name, families.get(name).config) for name in families.names()]


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    from . import families

    _add_data_args(p, required=True)
    kinds = {}
    for name in families.names():
        kinds.setdefault(families.get(name).data_kind, []).append(name)
    p.add_argument("--model", choices=families.names(), default=families.names()[0],
                   help="the model family (" + "; ".join(f"{', '.join(v)}: {k}" for k, v in kinds.items())
                        + f"); default: {families.names()[0]}")
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>-<data name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (its files are removed first); without this or "
                        "--resume a folder that holds a run is refused")
    # Every other flag is a field of a family's config (refit.settings.setting), with its help.
    p.set_defaults(settings_owners=add_arguments(p, _pretrain_configs()))


def _config_from_args(cls, args, owners, what: str, **fixed):
    """``cls`` built from the flags given (its own defaults for the others) and ``fixed``; a flag that
    ``cls`` does not take is refused (ValueError naming it and what takes it)."""
    from .settings import foreign_settings, given_settings

    foreign = foreign_settings(args, cls, owners, what)
    if foreign:
        raise ValueError("; ".join(foreign))
    return cls(**given_settings(args, cls), **fixed)


def _default_out(kind: str, model: str, data: str) -> str:
    name = os.path.basename(os.path.normpath(data)) or "data"
    return os.path.join("runs", f"{kind}-{model}-{name}")


def format_table(results, ks: Sequence[int], metrics=("recall", "ndcg", "precision", "mrr")) -> str:
    """Rows of named metric dicts as a fixed-width table."""
    cols = [f"{m}@{k}" for k in ks for m in metrics]
    width = max(10, max(len(c) for c in cols) + 1)
    name_w = max([len("") + 6] + [len(n) + 2 for n, _ in results])
    lines = ["".ljust(name_w) + "".join(c.rjust(width) for c in cols)]
    for name, res in results:
        lines.append(name.ljust(name_w) + "".join(
            (f"{res[c]:.4f}" if res is not None and c in res else "-").rjust(width) for c in cols))
    return "\n".join(lines)


def cmd_info(args) -> int:
    from refit_kernels.info import report

    from .runtime import distributed as dist

    lines = dist.describe()  # a collective under torchrun: every rank takes part
    if dist.is_main():
        print(f"refit {__version__}")
        print(report())
        print()
        print("\n".join(lines))
    return 0


def _device():
    """The device a command trains and evaluates on: the rank's GPU under torchrun with nccl, else the CPU."""
    from .runtime import distributed as dist

    return dist.world().device


def cmd_pretrain(args) -> int:
    from . import families

    family = families.get(args.model)
    out = args.out or _default_out("pretrain", args.model, args.data)
    _check_folder_arg("--out", out)
    _check_file_arg("--init", getattr(args, "init", None))
    try:
        config = _config_from_args(family.config, args, args.settings_owners, f"--model {args.model}",
                                   data=args.data, data_options=_data_options(args), model=args.model, out=out,
                                   progress=_progress(args))
    except ValueError as exc:
        print(f"refit pretrain: {exc}", file=sys.stderr)
        return 2
    summary = family.pretrain(config, resume=args.resume, overwrite=args.overwrite, device=_device())
    if not _main():
        return _stop_code(summary)
    print(f"run folder: {os.path.abspath(out)}")
    budget = getattr(config, "time_budget", None)
    reason = {"epochs": f"all {config.epochs} epochs run",
              "patience": f"no better validation {summary['selection'].split()[-1]} for "
                          f"{getattr(config, 'patience', '?')} epochs",
              "time_budget": f"the time budget of {budget:g} s" if budget else ""}.get(
        summary["stop_reason"], f"{summary['stop_reason']} (stopped by a signal)")
    print(f"best epoch {summary['best_epoch']} of {summary['epochs_run']} run; stopped by: {reason}; "
          f"{summary['seconds']:.1f} s, peak memory {summary['peak_memory_mb']:.0f} MiB")
    if "guidance" in summary:
        g = summary["guidance"]
        print(f"guidance weight {g['w']:g}, chosen on validation (trained with {g['trained_w']:g}): "
              + ", ".join(f"w {w}: {v:.4f}" for w, v in g[f"valid_{summary['selection'].split()[-1]}"].items()))
    print(format_table([("valid", summary["valid"]), ("test", summary["test"])], config.ks, family.metrics))
    _print_resume(summary, out)
    return _stop_code(summary)


def _stop_code(summary) -> int:
    """0 for a run that finished; 128 + the signal's number for one stopped by SIGTERM / SIGINT."""
    if summary.get("status") != "stopped":
        return 0
    import signal

    name = str(summary.get("stop_reason"))
    return 128 + int(getattr(signal, name, signal.SIGTERM)) if name.startswith("SIG") else 128 + int(signal.SIGTERM)


def _print_resume(summary, out: str) -> None:
    """For a run stopped by a signal: where it stands and the command that continues it."""
    if summary.get("status") != "stopped":
        return
    import shlex

    from .runtime import distributed as dist

    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    if "--out" not in argv:
        argv += ["--out", out]
    launcher = " (under torchrun: the same torchrun command with --resume)" if dist.launched() else ""
    print(f"stopped by {summary['stop_reason']}: the run folder holds last.pt and summary.json (status "
          f"'stopped'); continue it with{launcher}\n  {shlex.join(['refit', *argv, '--resume'])}", file=sys.stderr)


def _checkpoint_model(path: str) -> str:
    from .runtime.runs import load_checkpoint

    return load_checkpoint(path).get("recommender", {}).get("model", {}).get("name", "")


def cmd_evaluate_sequential(args, family) -> int:
    """``refit evaluate`` of a sequence family's checkpoint: its family's evaluation (and protocols)."""
    from .data import load_dataset
    from .data.sequences import DEFAULT_KS, PREFERDIFF_KS

    options = _data_options(args)
    data = load_dataset(args.data, **options) if args.data else None
    rec, data, state = family.load(args.checkpoint, data, precision=args.precision, device=_device(),
                                   allow_other_data=args.allow_other_data)
    splits = ["valid", "test"] if args.split == "both" else [args.split]
    ks = args.ks if args.ks is not None else list(PREFERDIFF_KS if args.protocol == "preferdiff" else DEFAULT_KS)
    if args.eval_steps is not None:
        if not hasattr(rec, "set_eval_steps"):
            raise ValueError(f"--eval-steps: a {family.name} policy has no respaced sampler")
        rec.set_eval_steps(args.eval_steps)
    if family.evaluate is not None:
        results = family.evaluate(rec, data, splits, ks=ks, batch_size=args.batch_size,
                                  exclude_history=args.exclude_history, seed=args.seed, progress=_progress(args),
                                  protocol=args.protocol)
    elif args.protocol != "full":
        raise ValueError(f"--protocol {args.protocol}: the {family.name} family evaluates with the full protocol only")
    else:
        results = rec.evaluate(data, ks=tuple(ks), batch_size=args.batch_size)
        results = {s: results[s] for s in splits}
    if not _main():
        return 0
    base = _sequence_baseline_rows(args, data, state, splits, ks) if args.baselines else []
    if args.json:
        if base:
            results["baselines"] = {label: metrics for label, metrics in base}
        print(json.dumps(results, indent=2, sort_keys=True))
        return 0
    how = []
    if hasattr(rec, "w"):  # a guided sampler: its guidance weight and steps
        steps = getattr(rec, "eval_steps", None) or rec.diffusion.steps
        eta = getattr(rec, "eval_eta", None)
        how += [f"w={rec.w:g}", f"{steps} sampling steps" + (f" (DDIM, eta {eta:g})" if eta is not None else "")]
    how.append(f"{args.protocol} protocol")
    print(f"{args.checkpoint}: {getattr(rec, 'network', family.name)} on {state.get('data', {}).get('source', '?')} "
          f"({data.n_sequences} sequences, {data.n_items} items; {', '.join(how)})")
    rows = [(s, results[s]) for s in splits]
    rows += [(f"{label}: {s}" if len(splits) > 1 else label, metrics.get(s)) for label, metrics in base
             for s in splits]
    # PreferDiff reports Recall@k (= HR@k with one target) and NDCG@k
    print(format_table(rows, ks, ("recall", "ndcg") if args.protocol == "preferdiff" else family.metrics))
    return 0


def _sequence_baseline_rows(args, data, state, splits, ks):
    """``[(label, {split: metrics})]`` to print under a DreamRec checkpoint's rows: most-popular,
    computed here under the same protocol, and the SASRec a ``refit baselines`` run fitted on the same
    data (its baselines.json beside the checkpoint or in runs/baselines-<data name>, matched by
    fingerprint; SASRec takes minutes to hours to train, so it is never fitted here)."""
    from .runtime.runs import data_fingerprint
    from .baselines.sequences import most_popular_metrics

    rows = [("most-popular", most_popular_metrics(data, splits, ks=ks, protocol=args.protocol,
                                                  exclude_history=args.exclude_history))]
    if args.protocol != "full" or args.exclude_history is not None:
        return rows  # a fitted SASRec's stored metrics are the full protocol's, history as by default
    source = str(state.get("data", {}).get("source", ""))
    folders = [os.path.dirname(os.path.abspath(args.checkpoint)),
               os.path.join("runs", "baselines-" + (os.path.basename(os.path.normpath(source)) or "data"))]
    fingerprint = data_fingerprint(data)
    for folder in folders:
        path = os.path.join(folder, "baselines.json")
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError):
            continue
        if payload.get("fingerprint") != fingerprint:
            continue
        for r in payload.get("results", []):
            if r.get("name") == "sasrec":
                params = ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items())
                rows.append((f"sasrec ({params})" if params else "sasrec", {s: r.get(s) for s in splits}))
                return rows
    return rows


def cmd_evaluate_outside(args) -> int:
    """``refit evaluate`` of an outside policy's checkpoint: ``--policy MODULE:FUNCTION`` rebuilds the
    policy from the data, the checkpoint's weights are loaded into it, and the policy evaluates itself."""
    from .data import load_dataset
    from .families import METRICS
    from .posttrain.run import load_policy

    if args.min_target_rating is not None:
        raise ValueError("--min-target-rating is not available for outside policies: they evaluate themselves")
    data = load_dataset(args.data, **_data_options(args)) if args.data else None
    policy, data, state = load_policy(args.checkpoint, data, device=_device(), precision=args.precision,
                                      allow_other_data=args.allow_other_data, factory=args.policy)
    sequences = hasattr(data, "targets")
    ks = args.ks if args.ks is not None else ([10, 20, 50] if sequences else [10, 20, 50, 100])
    results = policy.evaluate(data, ks=tuple(ks), batch_size=args.batch_size)
    splits = ["valid", "test"] if args.split == "both" else [args.split]
    results = {s: results[s] for s in splits}
    if not _main():
        return 0
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
        return 0
    config = state["recommender"]["model"].get("config", {})
    what = config.get("external") or config.get("outside") or "outside model"
    print(f"{args.checkpoint}: {what} (built by {args.policy}) on {state.get('data', {}).get('source', '?')} "
          f"({data.n_items} items)")
    print(format_table([(s, results[s]) for s in splits], ks,
                       METRICS["sequences" if sequences else "interactions"]))
    return 0


def cmd_evaluate(args) -> int:
    from . import families
    from .data import load_dataset
    from .evaluate import evaluate_recommender
    from .policy import OUTSIDE_MODELS

    _check_file_arg("--checkpoint", args.checkpoint)
    model = _checkpoint_model(args.checkpoint)
    if args.policy is not None or model in OUTSIDE_MODELS:
        return cmd_evaluate_outside(args)
    family = families.of_checkpoint(model)
    if family is None:
        raise ValueError(f"--checkpoint {args.checkpoint!r} holds a {model!r} model, which no registered model "
                         f"family loads (registered: {', '.join(families.names())})")
    if family.data_kind == "sequences":
        if args.min_target_rating is not None:
            raise ValueError(f"--min-target-rating needs interaction data with ratings; a {model} checkpoint's "
                             "sequences carry none")
        return cmd_evaluate_sequential(args, family)
    if args.ks is None:
        args.ks = [10, 20, 50, 100]
    options = _data_options(args)
    data = load_dataset(args.data, **options) if args.data else None
    rec, data, state = family.load(args.checkpoint, data, precision=args.precision, device=_device(),
                                   allow_other_data=args.allow_other_data)
    splits = ["valid", "test"] if args.split == "both" else [args.split]
    results = evaluate_recommender(rec, data, splits, ks=args.ks, batch_size=args.batch_size,
                                   progress=_progress(args), min_target_rating=args.min_target_rating)
    if not _main():
        return 0
    rows = [(s, results[s]) for s in splits]
    base = None
    # The cached baselines count every held-out interaction: their row would not compare.
    if args.baselines and args.min_target_rating is None:
        # The best baseline on the same data and split, cached beside the checkpoint (fitted on first use).
        from .baselines import best_baseline_rows

        extra, base, cache, from_cache = best_baseline_rows(
            data, os.path.dirname(os.path.abspath(args.checkpoint)), splits, ks=args.ks,
            batch_size=args.batch_size, progress=_progress(args))
        rows += extra
        results["best_baseline"] = {"label": base.label, **{s: getattr(base, s) for s in splits},
                                    "fit_s": base.fit_s, "cache": cache}
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        rated = "" if args.min_target_rating is None else f"; hits: held-out items rated >= {args.min_target_rating:g}"
        print(f"{args.checkpoint}: {rec.model_name} on {state.get('data', {}).get('source', '?')} "
              f"({data.n_users} users, {data.n_items} items{rated})")
        print(format_table(rows, args.ks))
        if base is not None:
            where = "not cached" if cache is None else f"{'read from' if from_cache else 'written to'} {cache}"
            print(f"best baseline by valid recall@20: {base.label} (fit {base.fit_s:.2f} s; {where})")
    return 0


def cmd_import_diffrec(args) -> int:
    """A DiffRec paper-code checkpoint (a pickled DNN) as a refit checkpoint, checked against its data."""
    from .data import load_dataset
    from .integrations.diffrec_paper import PaperCheckpointError, load_diffrec_paper_checkpoint
    from .runtime.runs import data_fingerprint, save_checkpoint

    _check_file_arg("checkpoint", args.checkpoint)
    _check_file_arg("--out", args.out, output=True)
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out!r} exists (a checkpoint of a run?): pass --overwrite to replace it, "
                         "or choose another file")
    try:
        rec = load_diffrec_paper_checkpoint(
            args.checkpoint, mean_type=args.mean_type, steps=args.steps, noise_schedule=args.noise_schedule,
            noise_scale=args.noise_scale, noise_min=args.noise_min, noise_max=args.noise_max,
            sampling_steps=args.sampling_steps, sampling_noise=args.sampling_noise)
    except PaperCheckpointError as exc:
        print(f"refit import-diffrec: {exc}", file=sys.stderr)
        return 2
    data = load_dataset(args.data, **_data_options(args))
    if rec.model.n_items != data.n_items:
        print(f"refit import-diffrec: the model scores {rec.model.n_items} items, {args.data!r} has "
              f"{data.n_items}", file=sys.stderr)
        return 2
    save_checkpoint(args.out, {"kind": "import", "recommender": rec.state(),
                               "source": {"file": os.path.abspath(args.checkpoint), "code": "DiffRec paper"},
                               "data": {"source": args.data, "options": _data_options(args),
                                        "fingerprint": data_fingerprint(data), "n_users": data.n_users,
                                        "n_items": data.n_items}})
    if _main():
        print(f"wrote {os.path.abspath(args.out)}: DiffRec over {data.n_items} items, dims {rec.model.dims}, "
              f"{args.steps} steps ({args.noise_schedule}, scale {args.noise_scale:g}); evaluate or fine-tune it "
              f"with refit evaluate / finetune --checkpoint {args.out}")
    return 0


def cmd_baselines(args) -> int:
    from .baselines import best_baseline, fit_baselines
    from .data import load_dataset
    from .families import METRICS
    from .runtime.runs import RunDir, data_fingerprint

    if args.out is not None:
        _check_folder_arg("--out", args.out)
    data = load_dataset(args.data, **_data_options(args))
    sequences = hasattr(data, "targets")  # refit.data.sequences.SequenceData: next-item targets, HR@k
    only = args.only or ("most-popular,sasrec" if sequences else "most-popular,itemknn,ease")
    include = [n.strip() for n in only.split(",") if n.strip()]
    if sequences:
        from .baselines.sequences import fit_sequence_baselines

        args.ks = args.ks or [10, 20, 50]
        grid = {"max_len": args.sasrec_max_len, "dropout": args.sasrec_dropout}
        overrides = {"max_epochs": args.sasrec_max_epochs, "seed": args.seed}
        if args.sasrec_budget is not None:
            overrides["time_budget"] = args.sasrec_budget
        try:
            results = fit_sequence_baselines(data, ks=args.ks, include=include, sasrec_grid=grid,
                                             progress=_progress(args), **overrides)
        except ValueError as exc:
            print(f"refit baselines: {exc}", file=sys.stderr)
            return 2
        best = max(results, key=lambda r: r.valid.get("hr@20", -1.0))  # the earliest on ties
    else:
        args.ks = args.ks or [10, 20, 50, 100]
        results = fit_baselines(data, ks=args.ks, knn_grid=args.knn_grid, ease_grid=args.ease_grid,
                                include=include, batch_size=args.batch_size, progress=_progress(args))
        best = best_baseline(results)
    payload = {"data": args.data, "options": _data_options(args), "fingerprint": data_fingerprint(data),
               "n_users": data.n_users, "n_items": data.n_items, "best": best.label,
               "results": [r.to_dict() for r in results]}
    out = args.out or os.path.join("runs", "baselines-" + (os.path.basename(os.path.normpath(args.data)) or "data"))
    RunDir(out).write_json("baselines.json", payload)
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    metric = "hr@20" if sequences else "recall@20"
    print(f"baselines on {args.data} ({data.n_users} users, {data.n_items} items); "
          f"hyper-parameters tuned on valid {metric}; {args.split} split:")
    splits = ["valid", "test"] if args.split == "both" else [args.split]
    print(format_table([(f"{r.label}: {s}" if len(splits) > 1 else r.label, getattr(r, s))
                        for r in results for s in splits], args.ks,
                       METRICS["sequences" if sequences else "interactions"]))
    print("fitting times (one fit at the chosen values; tuning: every fit and validation pass of the grid):")
    for r in results:
        tune = f", tuning over {len(r.grid)} values {r.tune_s:.2f} s" if r.grid else ""
        print(f"  {r.label}: fit {r.fit_s:.2f} s{tune}")
    for r in results:
        for note in r.notes:
            print(f"note: {note}")
    print(f"best: {best.label}")
    print(f"written to {os.path.abspath(os.path.join(out, 'baselines.json'))}")
    return 0


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from .posttrain.config import FinetuneConfig

    p.add_argument("--checkpoint", required=True, help="the pretrained model (a best.pt written by refit pretrain)")
    _add_data_args(p, required=False)
    p.add_argument("--out", default=None, help="run folder (default: runs/finetune-<model>-<data name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (its files are removed first); without this or "
                        "--resume a folder that holds a run is refused")
    # Every other flag is a field of FinetuneConfig (refit.settings.setting), with its help.
    p.set_defaults(settings_owners=add_arguments(p, [("finetune", FinetuneConfig)]))


def _finetune_config(args, out: str):
    from .posttrain.config import FinetuneConfig

    fixed = dict(checkpoint=args.checkpoint, data=args.data, data_options=_data_options(args), out=out,
                 progress=_progress(args))
    return _config_from_args(FinetuneConfig, args, args.settings_owners, "refit finetune", **fixed)


def cmd_finetune(args) -> int:
    from .families import METRICS
    from .posttrain.run import finetune

    _check_file_arg("--checkpoint", args.checkpoint)
    out = args.out or os.path.join("runs", "finetune-" + os.path.basename(os.path.dirname(
        os.path.abspath(args.checkpoint))))
    _check_folder_arg("--out", out)
    try:
        config = _finetune_config(args, out)
    except ValueError as exc:
        print(f"refit finetune: {exc}", file=sys.stderr)
        return 2
    summary = finetune(config, resume=args.resume, overwrite=args.overwrite, device=_device())
    if not _main():
        return _stop_code(summary)
    print(f"run folder: {os.path.abspath(out)}")
    print(f"best iteration {summary['best_iteration']} of {summary['iterations']} (selected by {summary['selection']}), "
          f"{summary['s_per_iteration']:.3f} s per iteration, {summary['seconds']:.1f} s in all, "
          f"peak memory {summary['peak_memory_mb']:.0f} MiB")
    metrics = METRICS["sequences" if "hr@20" in summary["test"] else "interactions"]
    ks = config.ks or sorted(int(k.split("@")[1]) for k in summary["test"] if k.startswith("ndcg@"))
    print(format_table([("test, before", summary["before"]["test"]), ("test, after", summary["test"])],
                       ks, metrics))
    _print_resume(summary, out)
    return _stop_code(summary)


def cmd_demo(args) -> int:
    """Pretrain DiffRec on the built-in data, fine-tune it with ReFiT, print before and after."""
    import time

    from .data import RECBOLE_HINT, load_dataset
    from . import families
    from .runtime.runs import RUN_FILES
    from .posttrain.config import FinetuneConfig
    from .posttrain.run import finetune

    t0 = time.perf_counter()
    _check_folder_arg("--out", args.out)
    # The demo has no --resume: a folder with an earlier demo's runs is refused here, in the demo's words.
    earlier = [os.path.join(args.out, sub) for sub in ("pretrain", "finetune")
               if any(os.path.exists(os.path.join(args.out, sub, name)) for name in RUN_FILES)]
    if earlier and not args.overwrite:
        print(f"refit demo: {os.path.abspath(args.out)} holds the runs of an earlier demo ({', '.join(earlier)}): "
              "pass --overwrite to replace them, or choose another --out", file=sys.stderr)
        return 2
    say = print if _main() else (lambda *a, **k: None)  # under torchrun, rank 0 speaks
    source = args.data
    if source is None:
        try:
            data = load_dataset("movielens-100k")
            source = "movielens-100k"
        except FileNotFoundError:
            say("refit demo: MovieLens-100K is not available (" + RECBOLE_HINT.split(". ")[0] +
                "); using the synthetic data set instead.\n"
                "  To run the demo on MovieLens-100K: pip install --no-deps recbole==1.2.1", file=sys.stderr)
            data = load_dataset("synthetic")
            source = "synthetic"
    else:
        data = load_dataset(source)
    say(f"refit demo: {source}: {data.n_users} users, {data.n_items} items, "
        f"{data.train.nnz} / {data.valid.nnz} / {data.test.nnz} train / valid / test interactions")
    out = args.out
    diffrec = families.get("diffrec")  # the demo's model
    pre = diffrec.config(data=source, epochs=args.epochs, out=os.path.join(out, "pretrain"),
                         progress=_progress(args), seed=args.seed)
    say(f"1/2 pretraining DiffRec (at most {args.epochs} epochs, early stopping on validation Recall@20) ...")
    ps = diffrec.pretrain(pre, data, overwrite=args.overwrite, device=_device())
    say(f"    best epoch {ps['best_epoch']}, {ps['seconds']:.0f} s")
    ft = FinetuneConfig(checkpoint=os.path.join(out, "pretrain", "best.pt"), data=source,
                        iterations=args.iterations, out=os.path.join(out, "finetune"), progress=_progress(args),
                        seed=args.seed)
    say(f"2/2 fine-tuning with ReFiT ({args.iterations} iterations) ...")
    fs = finetune(ft, data, overwrite=args.overwrite, device=_device())
    say(f"    best iteration {fs['best_iteration']}, {fs['seconds']:.0f} s")
    if not _main():
        return 0
    say("baselines: most-popular, ItemKNN and EASE, tuned on validation Recall@20 ...")
    from .baselines import best_baseline_rows

    base_rows, best, _, _ = best_baseline_rows(data, out, ("test",), ks=(10, 20, 50, 100))
    say()
    say(f"Test metrics on {source} (each model selected on validation Recall@20):")
    rows = [("DiffRec (pretrained)", fs["before"]["test"]), ("DiffRec + ReFiT", fs["test"]),
            (f"best baseline: {best.label}", base_rows[0][1])]
    say(format_table(rows, (10, 20)))
    probe = fs.get("probe")
    if probe and probe.get("start") and probe.get("end"):
        r0, r1 = probe["start"]["probe_reward"], probe["end"]["probe_reward"]
        change = f" ({(r1 - r0) / abs(r0):+.1%})" if r0 else ""
        say(f"\nReFiT's own reward on {probe['episodes']} fixed training episodes (the probe): "
            f"{r0:.4f} before, {r1:.4f} after {probe['end_iteration']} iterations{change}. A probe that does not "
            f"rise means the fine-tuning did not learn; see benchmarks/studies/learning_curves.py for its placebo.")
    say(f"\nrun folders: {os.path.abspath(out)} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def _main() -> bool:
    from .runtime import distributed as dist

    return dist.is_main()


def _progress(args) -> Optional[bool]:
    """The progress-bar setting of a command: False with -q, True with --progress, else None (on a terminal)."""
    if args.quiet:
        return False
    return True if args.progress else None


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line (argparse prints the whole usage first): the flag,
    what is wrong, and where the usage is. Exit code 2, as argparse's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refit", description="ReFiT: RL fine-tuning of diffusion recommenders.")
    parser.add_argument("--version", action="version", version=f"refit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--progress", action="store_true",
                        help="progress bars even when stderr is not a terminal (by default they are shown only "
                             "on a terminal, so logs and pipes are not flooded)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the data loaders filter")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show Python's traceback instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="versions, what was built, which kernel backends are usable")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("pretrain", help="train a diffusion recommender with the ELBO (DiffRec's recipe)")
    _add_pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("finetune", help="fine-tune a pretrained model with ReFiT (policy gradient)")
    _add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("demo", help="pretrain DiffRec on the built-in data, fine-tune with ReFiT, compare")
    p.add_argument("--data", default=None, help="default: movielens-100k (from recbole), else synthetic")
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs of an earlier demo in --out (its pretrain/ and finetune/ run folders); "
                        "without it such a folder is refused")
    p.add_argument("--epochs", type=_positive_int, default=100, help="pretraining epochs at most")
    p.add_argument("--iterations", type=_positive_int, default=200, help="ReFiT iterations")
    p.add_argument("--seed", type=_seed, default=1)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("evaluate", help="full-ranking metrics of a saved model")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt written by refit")
    p.add_argument("--policy", default=None, metavar="MODULE:FUNCTION",
                   help="for a checkpoint of an outside policy (ScheduleDenoiser, LatentScheduleDenoiser): the "
                        "function that builds the policy from the data; the checkpoint's weights are loaded into "
                        "it (the module is imported, with the working directory on the path)")
    _add_data_args(p, required=False)
    p.add_argument("--allow-other-data", action="store_true",
                   help="use --data although the checkpoint records another data fingerprint, or none (a model "
                        "saved without its data); a warning names both fingerprints")
    p.add_argument("--split", choices=["valid", "test", "both"], default="test")
    p.add_argument("--ks", type=_int_list, default=None,
                   help="default: 10,20,50,100 (10,20,50 for sequence models; 5,10 with --protocol preferdiff)")
    p.add_argument("--batch-size", type=_positive_int, default=1024)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--seed", type=_seed, default=0, help="sequence models: seed of the sampled embeddings")
    p.add_argument("--exclude-history", action=argparse.BooleanOptionalAction, default=None,
                   help="sequence models: never rank the history's items (default: when items do not repeat)")
    p.add_argument("--protocol", choices=["full", "dreamrec", "preferdiff"], default="full",
                   help="dreamrec: evaluate as DreamRec's own code does (dropout on, padding ranked, no "
                        "exclusion, batches of 100 with the last partial one dropped), for comparison; "
                        "preferdiff: as PreferDiff's code does (Recall and NDCG at 5 and 10 unless --ks, every "
                        "item ranked, the history not excluded)")
    p.add_argument("--eval-steps", type=_positive_int, default=None,
                   help="sequence models: sample with this many respaced reverse steps instead of all of them")
    p.add_argument("--min-target-rating", type=_finite_float, default=None, metavar="R",
                   help="count only the held-out interactions rated >= R as hits (data with ratings, read "
                        "with --min-rating below R, e.g. none; not for sequence models; no baseline row)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also print the best tuned baseline's row (cached in the checkpoint's folder); for "
                        "sequence models: most-popular, and the SASRec of a `refit baselines` run on the same data "
                        "(its baselines.json beside the checkpoint or in runs/baselines-<data name>)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("import-diffrec", help="a checkpoint of DiffRec's paper code (a pickled DNN) as a refit "
                                              "checkpoint; the diffusion settings come from the flags")
    p.add_argument("checkpoint", help="the .pth file DiffRec's main.py saved (torch.save(model, ...))")
    _add_data_args(p, required=True)
    p.add_argument("--out", required=True, help="the refit checkpoint to write (an existing file only with "
                                                 "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--mean-type", choices=["x0", "eps"], default="x0")
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--noise-schedule", choices=["linear", "linear-var", "cosine"], default="linear-var")
    p.add_argument("--noise-scale", type=_finite_float, default=0.1)
    p.add_argument("--noise-min", type=_finite_float, default=0.0001)
    p.add_argument("--noise-max", type=_finite_float, default=0.02)
    p.add_argument("--sampling-steps", type=int, default=0)
    p.add_argument("--sampling-noise", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=cmd_import_diffrec)
    from .baselines import DEFAULT_EASE_GRID, DEFAULT_KNN_GRID

    p = sub.add_parser("baselines", help="most-popular, ItemKNN and EASE (sequences: most-popular and SASRec), "
                                         "tuned on validation, same protocol")
    _add_data_args(p, required=True)
    p.add_argument("--out", default=None,
                   help="folder to write baselines.json into (default: runs/baselines-<data name>)")
    p.add_argument("--split", choices=["valid", "test", "both"], default="test")
    p.add_argument("--ks", type=_int_list, default=None, help="default: 10,20,50,100 (10,20,50 for sequences)")
    p.add_argument("--knn-grid", type=_int_list, default=list(DEFAULT_KNN_GRID),
                   help="ItemKNN neighbourhood sizes to try")
    p.add_argument("--ease-grid", type=_float_list, default=list(DEFAULT_EASE_GRID),
                   help="EASE L2 strengths to try")
    p.add_argument("--only", default=None, help="comma-separated subset of the baselines (default: "
                   "most-popular,itemknn,ease; for sequences most-popular,sasrec)")
    g = p.add_argument_group("sequences: SASRec, tuned on validation HR@20 over the grid of these lists")
    g.add_argument("--sasrec-max-len", type=_int_list, default=[50, 200])
    g.add_argument("--sasrec-dropout", type=_float_list, default=[0.2, 0.5])
    g.add_argument("--sasrec-max-epochs", type=_positive_int, default=200)
    g.add_argument("--sasrec-budget", type=_positive_float, default=None, help="seconds per configuration (default: none)")
    g.add_argument("--seed", type=_seed, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=1024)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_baselines)
    return parser


#: Errors of the input (a file, a flag, a checkpoint, the machine's limits): one line, exit code 2. Anything
#: else is a bug of refit: one line that says so, the traceback with --debug.
_USER_ERRORS = (ValueError, OSError, IndexError, MemoryError)


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + str(exc) if str(exc) else ''} (a smaller --batch-size or model may fit)"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        # "[Errno 21] Is a directory: 'x'" -> "'x': is a directory"
        target = f"{exc.filename!r}" + (f" -> {exc.filename2!r}" if exc.filename2 is not None else "")
        return f"{target}: {exc.strerror[:1].lower()}{exc.strerror[1:]}"
    text = str(exc)
    if isinstance(exc, KeyError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text.strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one ``refit`` command; the exit code. Run as a command (``argv`` None), it first lowers
    torch's thread count to the cores the machine's load leaves free, unless OMP_NUM_THREADS is
    set, and says so (:func:`refit.limits.adapt_threads`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .runtime import distributed as dist

    if argv is None:  # run as a command (not called from Python, whose threads are its own)
        from .limits import adapt_threads

        changed = adapt_threads()
        if changed and not args.quiet:
            print(f"refit: {changed}", file=sys.stderr)

    try:
        if dist.launched():  # under torchrun: join the process group first
            info = dist.init()
            if info.rank != 0:
                args.quiet = True  # one progress bar, rank 0's
        try:
            return args.func(args)
        finally:
            dist.shutdown()
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"refit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line; --debug keeps the traceback
        if args.debug:
            raise
        prefix = f"[rank {dist.rank()}] " if dist.is_distributed() else ""
        if isinstance(exc, _USER_ERRORS):
            print(f"{prefix}refit {args.command}: {_error_line(exc)}", file=sys.stderr)
        else:
            print(f"{prefix}refit {args.command}: internal error ({type(exc).__name__}: {_error_line(exc)}); "
                  "this is a bug in refit: rerun with --debug for the traceback and report it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
