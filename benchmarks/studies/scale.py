"""Scale sweep: time and peak memory of every pipeline stage against the number of users and items.

The synthetic data set (``refit.data.synthetic_interactions``: Zipf popularity, 6 tastes, about 30
interactions per user) is swept over users at a fixed item count and over items at a fixed user
count. Each size runs in its own process (so a stage's memory peak is its own, and one size that
runs out of memory does not end the sweep). Per size, in order:

* ``generate``: drawing the synthetic records (not a pipeline stage; reported for completeness);
* ``split``: building the train/valid/test matrices from the records (what loading does after parsing);
* ``load``: ``refit.data.load_dataset`` on the same records written as a MovieLens ``u.data`` file
  (tab-separated user, item, rating, time): parsing, id mapping and the split (the file is written
  untimed, to a temporary folder, and removed);
* ``similar-exact``: the exact similar-user table (m = 10), up to ``--exact-max-users``;
* ``similar-approx``: the approximate table (pynndescent, ``--width`` 60), with its recall@10 against
  the exact rows of 2,000 users and the N_sim-20 it gives (``_reward_effect``);
* ``pretrain-epoch``: one epoch of DiffRec (published sizes: dims 200, 600; batch 400; Adam);
* ``evaluate``: one evaluation pass (valid and test, every user);
* ``refit-setup``: building the ReFiT trainer, with the similar-user table passed in;
* ``refit-iteration``: one ReFiT iteration (B = 64; median of ``--refit-iterations``, 5, after one warm-up);
* ``itemknn``, ``ease``: one baseline fit (EASE refuses item counts whose dense item x item
  matrices exceed 8 GiB; the refusal is reported).

Peak memory is the largest resident size during the stage minus the resident size when it began
(sampled every 5 ms). Exponents are least-squares slopes of log(time) on log(size) over the sizes
measured.

    python -m benchmarks.studies.scale --quick                     # tiny sizes, a minute (CI-sized)
    python -m benchmarks.studies.scale --out benchmarks/studies/scale.json # the sweep (hours at the largest sizes)
    python -m benchmarks.studies.scale --report benchmarks/studies/scale.json --plot benchmarks/studies/scale.png
    python -m benchmarks.studies.scale --recall ../shared/data/ml-1m_clean ../shared/data/zhihu  # real data

Run with OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 on a machine where nothing else runs, or set both
to the cores given to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from benchmarks.paths import ROOT
STAGES = ("generate", "split", "load", "similar-exact", "similar-approx", "pretrain-epoch", "evaluate", "refit-setup",
          "refit-iteration", "itemknn", "ease")
PIPELINE = [s for s in STAGES if s != "generate"]


class PeakRSS:
    """Largest resident set size (bytes) seen while the block runs, sampled from /proc every 5 ms."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.delta = self.peak - self.start


def _measure(results: Dict[str, Any], name: str, fn: Callable[[], Any], log) -> Any:
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        out = fn()
    seconds = time.perf_counter() - t0
    results[name] = {"seconds": seconds, "peak_mb": mem.delta / 2**20, "rss_mb": mem.peak / 2**20}
    log(f"  {name:16s} {seconds:9.2f} s   peak +{mem.delta / 2**20:8.1f} MB (rss {mem.peak / 2**20:.0f} MB)")
    return out


def run_size(n_users: int, n_items: int, *, stages: List[str], exact_max_users: int, quick: bool,
             width: int = 60, candidates_per_step: Optional[int] = None, jobs: int = 1,
             refit_iterations: int = 5, log=print) -> Dict[str, Any]:
    """Every stage at one size, in this process; returns {stage: {seconds, peak_mb, ...}}."""
    import numpy as np
    import torch

    from refit.baselines import EASE, ItemKNN
    from refit.data import _build, synthetic_interactions
    from refit.diffusion import GaussianDiffusion
    from refit.families.diffrec.denoisers import build_model
    from refit.families.diffrec.pretrain import PretrainConfig
    from refit.evaluate import evaluate_recommender
    from refit.families.diffrec.recommender import RowRecommender
    from refit.similarity import approximate_similar_users, top_similar_users
    from refit.posttrain.config import FinetuneConfig
    from refit.posttrain.trainer import ReFiT

    res: Dict[str, Any] = {"n_users": n_users, "n_items": n_items}
    log(f"{n_users:,} users x {n_items:,} items")
    rec = _measure(res, "generate", lambda: synthetic_interactions(n_users=n_users, n_items=n_items, seed=0), log)
    data = _measure(res, "split", lambda: _build(rec, "synthetic", "synthetic", min_rating=None, split=(0.8, 0.1, 0.1),
                                                  split_mode="time", seed=0), log)
    if "load" in stages:
        res["load"] = r = load_written(rec)
        log(f"  {'load':16s} {r['seconds']:9.2f} s   peak +{r['peak_mb']:8.1f} MB (rss {r['rss_mb']:.0f} MB)")
    del rec
    res["interactions"] = int(data.train.nnz + data.valid.nnz + data.test.nnz)
    res["items_seen"] = int(data.n_items)
    train = data.train
    neighbors = None
    sample = min(2000, n_users)  # synthetic users are exchangeable: the first 2,000 are a random sample
    if "similar-exact" in stages and n_users <= exact_max_users:
        neighbors = _measure(res, "similar-exact", lambda: top_similar_users(train, 10), log)
    if "similar-approx" in stages:
        # pynndescent compiles its numba functions at the first call of a process: time that apart.
        _measure(res, "similar-approx-compile", lambda: approximate_similar_users(
            synthetic_matrix(200, 50), 5, width=10), log)
        approx, approx_sims = _measure(res, "similar-approx", lambda: approximate_similar_users(
            train, 10, width=width, candidates_per_step=candidates_per_step, seed=0, n_jobs=jobs,
            return_similarity=True), log)
        exact_rows, exact_sims = top_similar_users(train, 10, user_range=(0, sample), return_similarity=True)
        res["similar-approx"].update({"width": width, "candidates_per_step": candidates_per_step, "jobs": jobs})
        res["similar-approx"].update(_recall(approx[:sample], approx_sims[:sample], exact_rows, exact_sims))
        res["similar-approx"].update(_reward_effect(train, exact_rows, approx[:sample]))
        r = res["similar-approx"]
        log(f"  similar-approx recall@10 on {sample:,} users: {r['recall@10']:.4f} "
            f"(tie-aware {r['tie_recall@10']:.4f}); N_sim-20 exact {r['n_sim_k_exact']:.3f}, "
            f"approx {r['n_sim_k_approx']:.3f}, mean |diff| {r['n_sim_k_abs_diff']:.3f}")
        neighbors = approx if neighbors is None else neighbors
    cfg = PretrainConfig(batch_size=400)
    torch.manual_seed(0)
    # The items that occur: the generator may draw some never (data.n_items <= n_items).
    policy = RowRecommender("diffrec", build_model("diffrec", cfg.model_config(data.n_items)),
                         GaussianDiffusion(cfg.diffusion_config()))
    if "pretrain-epoch" in stages:
        def epoch():
            model, diffusion = policy.module, policy.diffusion
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            gen = torch.Generator().manual_seed(0)
            model.train()
            for users, rows in data.batches(cfg.batch_size, "train", shuffle=True, seed=0):
                loss = diffusion.training_loss(policy.denoiser(users, rows), rows, reweight=True, generator=gen).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        _measure(res, "pretrain-epoch", epoch, log)
    if "evaluate" in stages:
        policy.module.eval()
        _measure(res, "evaluate", lambda: evaluate_recommender(policy, data, batch_size=1024), log)
    if "refit-setup" in stages or "refit-iteration" in stages:
        if neighbors is None:
            neighbors = approximate_similar_users(train, 10, width=width, candidates_per_step=candidates_per_step,
                                                  seed=0, n_jobs=jobs)
        config = FinetuneConfig(checkpoint="", batch_size=64, seed=0, similar_users=10)
        trainer = _measure(res, "refit-setup", lambda: ReFiT(policy, data, config, neighbors=neighbors), log)
        if "refit-iteration" in stages:
            trainer.step()  # warm-up
            times = []
            with PeakRSS() as mem:
                for _ in range(3 if quick else refit_iterations):
                    t0 = time.perf_counter()
                    trainer.step()
                    times.append(time.perf_counter() - t0)
            res["refit-iteration"] = {"seconds": statistics.median(times), "peak_mb": mem.delta / 2**20,
                                      "rss_mb": mem.peak / 2**20, "iterations": len(times) + 1,
                                      "total_seconds": sum(times)}
            log(f"  refit-iteration  {statistics.median(times):9.2f} s   (median of {len(times)})")
    if "itemknn" in stages:
        _measure(res, "itemknn", lambda: ItemKNN(k=100).fit(train), log)
    if "ease" in stages:
        try:
            _measure(res, "ease", lambda: EASE(l2=500.0).fit(train), log)
        except ValueError as e:
            res["ease"] = {"refused": str(e)}
            log(f"  ease refused: {e}")
    return res


def load_written(rec):
    """Writes the records as a u.data file in a temporary folder, then times nothing but loading it."""
    import tempfile

    import pandas as pd

    from refit.data import load_dataset

    with tempfile.TemporaryDirectory(prefix="refit-scale-") as folder:
        path = os.path.join(folder, "u.data")
        # Integer times (u.data's), in the records' time order; 1-based ids like MovieLens.
        t = rec.times.argsort(kind="stable").argsort(kind="stable")
        pd.DataFrame({"u": rec.users + 1, "i": rec.items + 1, "r": 5, "t": t}).to_csv(path, sep="\t", header=False,
                                                                                 index=False)
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            data = load_dataset(path, min_rating=None, split=(0.8, 0.1, 0.1), split_mode="time", seed=0)
        return {"seconds": time.perf_counter() - t0, "peak_mb": mem.delta / 2**20, "rss_mb": mem.peak / 2**20,
                "interactions": int(data.train.nnz + data.valid.nnz + data.test.nnz)}


def synthetic_matrix(n_users: int, n_items: int):
    from refit.data import load_dataset

    return load_dataset("synthetic", n_users=n_users, n_items=n_items).train


def _recall(ids, sims, exact_ids, exact_sims) -> Dict[str, float]:
    """recall@10 of the exact ids, and the tie-aware recall: the share of the exact list's places
    filled by users at least as similar as the exact list's last one (equal similarities are
    interchangeable; the exact table breaks their ties by id)."""
    hit = total = 0
    for a, e in zip(ids.tolist(), exact_ids.tolist()):
        e = [v for v in e if v >= 0]
        total += len(e)
        hit += len(set(e) & set(a))
    n_exact = (exact_ids >= 0).sum(1)
    last = exact_sims.gather(1, (n_exact - 1).clamp(min=0)[:, None])
    good = ((sims >= last * (1 - 1e-9)) & (ids >= 0)).sum(1)
    tie_hits = int(good.minimum(n_exact).sum())
    return {"recall@10": hit / max(1, total), "tie_recall@10": tie_hits / max(1, int(n_exact.sum()))}


def _reward_effect(train, exact_ids, approx_ids) -> Dict[str, float]:
    """N_sim-20 of the first users with each table, for one fixed top-20 list per user: the
    popularity order perturbed by Gumbel noise (varied, popularity-biased lists, like a model's).
    Returns the mean with each table and the mean absolute per-user difference."""
    import numpy as np
    import torch

    import refit_kernels as rk

    n_items = train.shape[1]
    b = min(exact_ids.shape[0], max(1, (1 << 24) // n_items))
    gen = torch.Generator().manual_seed(0)
    pop = torch.from_numpy(np.asarray(train.sum(0)).ravel().astype(np.float32))
    u = torch.rand(b, n_items, generator=gen).clamp(min=1e-12)
    scores = torch.log1p(pop)[None, :] - torch.log(-torch.log(u))
    sets = rk.as_csr(train, "train")
    exclude = rk.as_csr(train[:b], "exclude")
    got = {}
    for name, table in (("exact", exact_ids[:b]), ("approx", approx_ids[:b])):
        out = rk.topk_hits(scores, (20,), exclude=exclude, neighbors=table.contiguous(), neighbor_sets=sets)
        got[name] = out.neighbor_hits[:, 0].to(torch.float64)
    return {"n_sim_k_exact": float(got["exact"].mean()), "n_sim_k_approx": float(got["approx"].mean()),
            "n_sim_k_abs_diff": float((got["exact"] - got["approx"]).abs().mean()), "n_sim_k_users": b}


def recall_on(paths: List[str], widths: List[int], log=print) -> List[Dict[str, Any]]:
    """The approximate table against the exact one for every user of real data sets (any source
    ``refit.data.load_dataset`` reads; sequence data as its user x item training matrix)."""
    from refit.data import load_dataset
    from refit.similarity import approximate_similar_users, top_similar_users

    approximate_similar_users(synthetic_matrix(200, 50), 5, width=10)  # numba's compilation, untimed
    rows = []
    for path in paths:
        train = load_dataset(path).train
        t0 = time.perf_counter()
        exact, exact_sims = top_similar_users(train, 10, return_similarity=True)
        exact_s = time.perf_counter() - t0
        for width in widths:
            t0 = time.perf_counter()
            ids, sims = approximate_similar_users(train, 10, width=width, seed=0, return_similarity=True)
            r = {"data": path, "users": train.shape[0], "items": train.shape[1], "width": width,
                 "exact_s": exact_s, "approx_s": time.perf_counter() - t0}
            r.update(_recall(ids, sims, exact, exact_sims))
            r.update(_reward_effect(train, exact, ids))
            log(f"{os.path.basename(os.path.normpath(path))}: {r['users']:,} users, width {width}: recall@10 "
                f"{r['recall@10']:.4f} (tie-aware {r['tie_recall@10']:.4f}); exact {exact_s:.1f} s, approximate "
                f"{r['approx_s']:.1f} s; N_sim-20 exact {r['n_sim_k_exact']:.4f}, approx {r['n_sim_k_approx']:.4f}, "
                f"mean |diff| {r['n_sim_k_abs_diff']:.4f} over {r['n_sim_k_users']:,} users")
            rows.append(r)
    return rows


def _child(args) -> None:
    """One size in this process; the JSON result is the last line of stdout."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    res = run_size(args.child[0], args.child[1], stages=args.stages, exact_max_users=args.exact_max_users,
                   quick=args.quick, width=args.width, candidates_per_step=args.candidates_per_step,
                   jobs=args.jobs, refit_iterations=args.refit_iterations,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(res))


def sweep(points: List[Dict[str, int]], args) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    if args.out and os.path.exists(args.out) and args.resume:
        with open(args.out) as f:
            out = json.load(f)["points"]
    done = {(p["n_users"], p["n_items"]) for p in out}
    for pt in points:
        if (pt["n_users"], pt["n_items"]) in done:
            continue
        cmd = [sys.executable, "-m", "benchmarks.studies.scale", "--child", str(pt["n_users"]), str(pt["n_items"]),
               "--stages", ",".join(args.stages), "--exact-max-users", str(args.exact_max_users),
               "--width", str(args.width), "--jobs", str(args.jobs),
               "--refit-iterations", str(args.refit_iterations)]
        if args.candidates_per_step is not None:
            cmd += ["--candidates-per-step", str(args.candidates_per_step)]
        if args.quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if proc.returncode != 0:
            res = {"n_users": pt["n_users"], "n_items": pt["n_items"], "failed": proc.returncode}
            print(f"  size failed with exit code {proc.returncode}", file=sys.stderr)
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        out.append(res)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"points": out, "threads": os.environ.get("OMP_NUM_THREADS")}, f, indent=1)
    return out


def exponent(points: List[Dict[str, Any]], stage: str, axis: str) -> Optional[float]:
    """Least-squares slope of log(seconds) on log(axis) over the points that measured the stage."""
    xy = [(math.log(p[axis]), math.log(p[stage]["seconds"])) for p in points
          if isinstance(p.get(stage), dict) and "seconds" in p[stage] and p[stage]["seconds"] > 0]
    if len(xy) < 2:
        return None
    mx = sum(x for x, _ in xy) / len(xy)
    my = sum(y for _, y in xy) / len(xy)
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    return sum((x - mx) * (y - my) for x, y in xy) / sxx if sxx > 0 else None


def axis_points(points: List[Dict[str, Any]], axis: str, fixed: int) -> List[Dict[str, Any]]:
    """The points of one sweep axis ("n_users" with the items fixed, or "n_items"), by size. A point
    with an ``"axis"`` key belongs to that axis only: results merged from runs made at different
    times keep each axis's shared size from the axis's own run."""
    other = "n_items" if axis == "n_users" else "n_users"
    return sorted([p for p in points if p[other] == fixed and "failed" not in p and p.get("axis", axis) == axis],
                  key=lambda p: p[axis])


def report(points: List[Dict[str, Any]], users_axis_items: int, items_axis_users: int) -> str:
    by_users = axis_points(points, "n_users", users_axis_items)
    by_items = axis_points(points, "n_items", items_axis_users)
    lines = []
    for title, pts, axis in ((f"users ({users_axis_items:,} items)", by_users, "n_users"),
                             (f"items ({items_axis_users:,} users)", by_items, "n_items")):
        if not pts:
            continue
        sizes = [p[axis] for p in pts]
        lines.append(f"Seconds (peak MB) against {title}:")
        lines.append("")
        lines.append("| stage | " + " | ".join(f"{s:,}" for s in sizes) + " | exponent |")
        lines.append("| --- | " + " | ".join("---:" for _ in sizes) + " | ---: |")
        for stage in STAGES:
            cells = []
            for p in pts:
                r = p.get(stage)
                if not isinstance(r, dict):
                    cells.append("-")
                elif "refused" in r:
                    cells.append("refused")
                else:
                    cells.append(f"{r['seconds']:.2f} ({r['peak_mb']:.0f})")
            if all(c == "-" for c in cells):
                continue
            e = exponent(pts, stage, axis)
            lines.append(f"| {stage} | " + " | ".join(cells) + f" | {'-' if e is None else f'{e:.2f}'} |")
        rec = [p for p in pts if isinstance(p.get("similar-approx"), dict)]
        if rec:
            lines.append("")
            lines.append("Approximate table against the exact rows of 2,000 users, recall@10 (tie-aware): "
                         + ", ".join(f"{p[axis]:,}: {p['similar-approx']['recall@10']:.3f} "
                                     f"({p['similar-approx']['tie_recall@10']:.3f})" for p in rec))
        lines.append("")
    failed = [p for p in points if "failed" in p]
    for p in failed:
        lines.append(f"{p['n_users']:,} users x {p['n_items']:,} items: failed (exit code {p['failed']})")
    return "\n".join(lines)


def plot(points: List[Dict[str, Any]], users_axis_items: int, items_axis_users: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, axis, fixed, key in ((axes[0], "n_users", users_axis_items, "n_items"),
                                 (axes[1], "n_items", items_axis_users, "n_users")):
        pts = axis_points(points, axis, fixed)
        for stage in PIPELINE:
            xs = [p[axis] for p in pts if isinstance(p.get(stage), dict) and "seconds" in p[stage]]
            ys = [p[stage]["seconds"] for p in pts if isinstance(p.get(stage), dict) and "seconds" in p[stage]]
            if len(xs) >= 1:
                e = exponent(pts, stage, axis)
                ax.loglog(xs, ys, "o-", label=stage + ("" if e is None else f" (slope {e:.2f})"))
        ax.set_xlabel(axis.replace("n_", "") + f" ({key.replace('n_', '')} = {fixed:,})")
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (1k-4k users, 300-1,200 items)")
    p.add_argument("--users", default="10000,30000,100000,300000,1000000")
    p.add_argument("--users-items", type=int, default=3000, help="items of the users sweep")
    p.add_argument("--items", default="3000,10000,30000,100000")
    p.add_argument("--items-users", type=int, default=100000, help="users of the items sweep")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--exact-max-users", type=int, default=100000,
                   help="the exact similar-user table only up to this many users (its time is quadratic)")
    p.add_argument("--width", type=int, default=60, help="candidates per user of the approximate table")
    p.add_argument("--candidates-per-step", type=int, default=None,
                   help="the approximate table's candidates per user and descent step (default: "
                        "refit.similarity.default_candidates_per_step, 160 above 250,000 users)")
    p.add_argument("--jobs", type=int, default=1,
                   help="threads of the approximate table (pynndescent's n_jobs; set NUMBA_NUM_THREADS to match)")
    p.add_argument("--refit-iterations", type=int, default=5,
                   help="timed ReFiT iterations after the warm-up (their median is reported)")
    p.add_argument("--out", default=None, help="JSON results (written after every size)")
    p.add_argument("--resume", action="store_true", help="skip the sizes already in --out")
    p.add_argument("--report", default=None, help="print the markdown table of this JSON file and exit")
    p.add_argument("--plot", default=None, help="with --report: write the log-log plot here")
    p.add_argument("--recall", nargs="+", metavar="DATA", default=None,
                   help="instead of the sweep: recall@10 of the approximate table against the exact one on "
                        "these data sets (every user), at widths --recall-widths; JSON to --out")
    p.add_argument("--recall-widths", default="30,60")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        p.error(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}")
    if args.quick:
        args.users, args.users_items, args.items, args.items_users = "1000,2000,4000", 300, "300,600,1200", 2000
    if args.child:
        _child(args)
        return 0
    if args.recall:
        rows = recall_on(args.recall, [int(w) for w in args.recall_widths.split(",") if w])
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"recall": rows}, f, indent=1)
        return 0
    users = [int(x) for x in args.users.split(",") if x]
    items = [int(x) for x in args.items.split(",") if x]
    if args.report:
        with open(args.report) as f:
            points = json.load(f)["points"]
    else:
        points_wanted = [{"n_users": u, "n_items": args.users_items} for u in users]
        points_wanted += [{"n_users": args.items_users, "n_items": i} for i in items
                          if {"n_users": args.items_users, "n_items": i} not in points_wanted]
        points = sweep(points_wanted, args)
    print(report(points, args.users_items, args.items_users))
    if args.plot:
        plot(points, args.users_items, args.items_users, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
