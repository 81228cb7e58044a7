"""Tunes SASRec (full softmax) on a sequential data set and reports its validation and test metrics.

    python -m benchmarks.studies.tune_sasrec ../shared/data/ml-1m_seq --budget 1800 --out runs/sasrec-ml1m.json
    python -m benchmarks.studies.tune_sasrec ../shared/data/zhihu --max-len 10 50 --budget 600

Every configuration of the grid (the cartesian product of the value lists
given; default :data:`refit.baselines.sasrec.DEFAULT_GRID`, 8 configurations) is
trained with AdamW and early stopping on the validation HR@20, within
``--budget`` seconds each; the best one by validation HR@20 is evaluated on
validation and test (full ranking; the history excluded when items do not
repeat in a sequence, as in ml-1m_seq). The result (chosen values, metrics,
one row per configuration, the chosen run's curve, notes such as a choice on
the edge of the grid or a run cut by its budget) is printed and, with
``--out``, written as JSON; ``--save`` writes the chosen model
(:func:`refit.baselines.sasrec.load_sasrec` reads it).

``--max-steps N`` stops every run after N optimiser steps: a smoke test of
the whole pipeline in seconds, not a result.

Cost: on ml-1m_seq with hidden 64, 2 blocks, max_len 200 and 128 windows a
step, an epoch is 48 steps of about 14,000 predicted positions each (the
full softmax over 3,706 items dominates), roughly 2-4 minutes on two shared
CPU cores, plus 10-20 s per validation pass; SASRec usually needs tens of
epochs there, so size ``--budget`` accordingly (or use a GPU).
"""

import argparse
import json
import logging
import os
import time

import torch


from refit.baselines.sasrec import DEFAULT_GRID, DEFAULT_KS, SASRecConfig, fit_sasrec, save_sasrec
from benchmarks.paths import data_root
from refit.data.sequences import load_sequences


def _default_data() -> str:
    return os.path.join(data_root(), "ml-1m_seq")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="?", default=_default_data(),
                   help="a ml-1m_seq style dataset.pkl (or its folder) or a DreamRec .df folder "
                        "(default: $REFIT_DATA/ml-1m_seq or ../shared/data/ml-1m_seq)")
    g = p.add_argument_group("grid (each a list of values; the grid is their cartesian product)")
    g.add_argument("--hidden", type=int, nargs="+", default=list(DEFAULT_GRID["hidden"]))
    g.add_argument("--blocks", type=int, nargs="+", default=list(DEFAULT_GRID["n_blocks"]))
    g.add_argument("--heads", type=int, nargs="+", default=list(DEFAULT_GRID["n_heads"]))
    g.add_argument("--dropout", type=float, nargs="+", default=list(DEFAULT_GRID["dropout"]))
    g.add_argument("--max-len", type=int, nargs="+", default=list(DEFAULT_GRID["max_len"]))
    g.add_argument("--lr", type=float, nargs="+", default=list(DEFAULT_GRID["lr"]))
    g.add_argument("--weight-decay", type=float, nargs="+", default=[0.0])
    t = p.add_argument_group("training of each configuration")
    t.add_argument("--budget", type=float, default=None, help="seconds per configuration (default: none)")
    t.add_argument("--max-epochs", type=int, default=200)
    t.add_argument("--patience", type=int, default=10, help="validations without improvement before stopping")
    t.add_argument("--eval-every", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=128, help="sequences (windows) per step")
    t.add_argument("--cover", choices=("last", "all"), default="last",
                   help="train on each sequence's last window (the paper) or on all of its windows")
    t.add_argument("--max-steps", type=int, default=None, help="optimiser steps per configuration (smoke test)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; on a busy shared machine 1 can beat 2)")
    o = p.add_argument_group("output")
    o.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    o.add_argument("--protocol", choices=("full", "dreamrec"), default="full",
                   help="protocol of the reported metrics (selection always uses the full one)")
    o.add_argument("--out", default=None, help="write the result as JSON here")
    o.add_argument("--save", default=None, help="write the chosen model here (torch file)")
    o.add_argument("--progress", action="store_true", help="progress bars")
    o.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    a = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    data = load_sequences(a.data)
    print(f"{data}  (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
    grid = {"hidden": a.hidden, "n_blocks": a.blocks, "n_heads": a.heads, "dropout": a.dropout,
            "max_len": a.max_len, "lr": a.lr, "weight_decay": a.weight_decay}
    base = SASRecConfig(batch_size=a.batch_size, max_epochs=a.max_epochs, patience=a.patience,
                        eval_every=a.eval_every, cover=a.cover, time_budget=a.budget, max_steps=a.max_steps,
                        seed=a.seed, device=a.device)
    res = fit_sasrec(data, grid, ks=a.ks, base=base, protocol=a.protocol, progress=True if a.progress else False)

    print(f"\n{res.label}: trained {res.fit_s:.0f} s, tuned {res.tune_s:.0f} s, evaluated {res.eval_s:.1f} s")
    names = [k for k in grid if len(grid[k]) > 1]
    for row in res.grid:
        values = ", ".join(f"{k}={row[k]}" for k in names) or "(one configuration)"
        print(f"  {values:<40} valid hr@20 {row['valid hr@20']:.4f}  epochs {row['epochs']:g} "
              f"(best {row['best_epoch']:g}, {row['train_s']:.0f} s, {row['stopped']})")
    for split in ("valid", "test"):
        m = getattr(res, split)
        print(f"  {split:<5} " + "  ".join(f"{k} {m[k]:.4f}" for k in sorted(m, key=_order) if k != "n")
              + f"  (n={m.get('n')})")
    for n in res.notes:
        print(f"  note: {n}")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"data": os.path.abspath(a.data), "data_name": data.name, "grid_spec": grid,
                       "torch_threads": torch.get_num_threads(), **res.to_dict()}, f, indent=1)
        print(f"wrote {a.out}")
    if a.save:
        save_sasrec(res.model, a.save)
        print(f"wrote {a.save}")
    return res


def _order(key: str):
    name, _, k = key.partition("@")
    return (name, int(k) if k.isdigit() else 0)


if __name__ == "__main__":
    main()
