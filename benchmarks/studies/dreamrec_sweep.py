"""Sampling settings of a trained DreamRec: guidance weight and respaced steps, chosen on validation.

    python -m benchmarks.studies.dreamrec_sweep --checkpoint runs/dreamrec-ml1m/best.pt --w 0 1 2 4 8 --steps 500 100 50 20

Neither setting changes training: the guidance weight ``w`` mixes the
conditional and unconditional predictions at sampling time, and ``--steps``
respaces the reverse process (see ``GaussianDiffusion.respaced``). For every
pair it evaluates the validation and test splits (the same seeded samples for
every pair) and times the pass; the row to use is the one with the best
*validation* HR@20, and its test numbers are the ones to report. With
``--seeds`` several sampling seeds show how much the metrics move from the
sampling noise alone.
"""

import argparse
import json
import statistics
import time

from refit.families.dreamrec.recommender import evaluate_dreamrec

from refit.families.dreamrec.pretrain import load_seq_recommender


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--w", type=float, nargs="+", default=None, help="guidance weights (default: the model's)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="sampling steps (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rec, data, _ = load_seq_recommender(a.checkpoint)
    ws = a.w or [rec.w]
    steps = a.steps or [rec.diffusion.steps]
    rows = []
    for w in ws:
        for n in steps:
            rec.w = float(w)
            rec.set_eval_steps(None if n == rec.diffusion.steps else n)
            runs = []
            for seed in a.seeds:
                t0 = time.perf_counter()
                m = evaluate_dreamrec(rec, data, batch_size=a.batch_size, seed=seed)
                runs.append((m, time.perf_counter() - t0))
            row = {"w": w, "steps": n, "seconds": statistics.median(t for _, t in runs)}
            for split in ("valid", "test"):
                for key in ("hr@20", "ndcg@20"):
                    vals = [m[split][key] for m, _ in runs]
                    row[f"{split} {key}"] = statistics.mean(vals)
                    if len(vals) > 1:
                        row[f"{split} {key} sd"] = statistics.stdev(vals)
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: r["valid hr@20"])
    print(f"best on validation HR@20: w={best['w']:g}, steps={best['steps']}: "
          f"test HR@20 {best['test hr@20']:.4f}, NDCG@20 {best['test ndcg@20']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
