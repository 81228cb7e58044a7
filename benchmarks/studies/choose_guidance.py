"""Chooses the guidance weight of a sequential checkpoint trained before ``refit pretrain`` did it itself.

``refit pretrain --model dreamrec|preferdiff`` ends a finished run by choosing
the weight recommending uses on validation (``--w-grid``; docs/models.md, "The
guidance weight, chosen on validation"). This script applies the same rule
(``refit.families.dreamrec.recommender.select_guidance``, with the run's own seed, evaluation
batch size and history rule) to the best.pt of an older run folder and writes
a new folder: best.pt recommending with the chosen weight, and the run's
summary.json with that model's valid/test metrics and a ``guidance`` entry.
The source folder is left as it is.

    python -m benchmarks.studies.choose_guidance runs/old-run runs/old-run-chosen [--w-grid 0,0.5,1,2,4]
"""

import argparse
import json
import os
import sys
import time


from refit.runtime.runs import load_checkpoint, save_checkpoint
from refit.families.dreamrec.recommender import SEQ_SELECTION, evaluate_dreamrec, select_guidance
from refit.families.dreamrec.pretrain import W_GRID, load_seq_recommender


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="a finished sequential run folder (best.pt, summary.json)")
    p.add_argument("out", help="the folder to write (created; must not hold a best.pt)")
    p.add_argument("--w-grid", default=",".join(f"{w:g}" for w in W_GRID),
                   help="comma-separated guidance weights; the run's own w is always among them")
    a = p.parse_args(argv)
    try:
        grid = sorted({float(v) for v in a.w_grid.split(",")})
    except ValueError:
        p.error(f"--w-grid: expected comma-separated numbers, got {a.w_grid!r}")
    if any(not w >= 0 or w == float("inf") for w in grid):
        p.error(f"--w-grid: expected finite weights >= 0, got {a.w_grid!r}")
    src_ckpt, src_summary = os.path.join(a.source, "best.pt"), os.path.join(a.source, "summary.json")
    for path in (src_ckpt, src_summary):
        if not os.path.isfile(path):
            p.error(f"{path}: no such file (the source must be a finished run folder)")
    if os.path.exists(os.path.join(a.out, "best.pt")):
        p.error(f"{a.out}: already holds a best.pt")

    state = load_checkpoint(src_ckpt)
    cfg = state.get("config") or {}
    rec, data, _ = load_seq_recommender(src_ckpt)
    grid = sorted(set(grid) | {float(cfg.get("w", rec.w))})
    kw = dict(batch_size=cfg.get("eval_batch_size", 2048), exclude_history=cfg.get("exclude_history"),
              seed=cfg.get("seed", 0))
    t0 = time.perf_counter()
    w, values = select_guidance(rec, data, grid, **kw)
    rec.w = w
    m = evaluate_dreamrec(rec, data, ks=tuple(cfg.get("ks", (10, 20, 50))), **kw)

    os.makedirs(a.out, exist_ok=True)
    state["recommender"]["inference"]["w"] = w
    state["best"] = {**(state.get("best") or {}), "valid": m["valid"], "test": m["test"],
                     "value": m["valid"][SEQ_SELECTION]}
    save_checkpoint(os.path.join(a.out, "best.pt"), state)
    with open(src_summary) as f:
        summary = json.load(f)
    summary.update(valid=m["valid"], test=m["test"], checkpoint=os.path.abspath(os.path.join(a.out, "best.pt")),
                   guidance={"w": w, "trained_w": cfg.get("w"),
                             f"valid_{SEQ_SELECTION}": {f"{k:g}": v for k, v in values.items()},
                             "seconds": round(time.perf_counter() - t0, 2), "applied_to": os.path.abspath(a.source)})
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"w {w:g} chosen ({', '.join(f'w {k:g}: {v:.4f}' for k, v in values.items())} valid {SEQ_SELECTION}); "
          f"test hr@20 {m['test']['hr@20']:.4f}, ndcg@20 {m['test']['ndcg@20']:.4f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
