"""Reverse loops and ReFiT iterations on one device, eagerly and from CUDA graphs (refit.runtime.cudagraph).

For benchmarks/gpu/gpu_check.sh. Untrained models of the published sizes stand
in for trained ones (the time of a pass does not depend on the weights), so
no checkpoint has to travel. Every timed call ends with a device
synchronisation; a row is the median over repeats after warm-up (the graph
is captured during warm-up).

Rows:

* one ReFiT iteration of DiffRec (ML-1M: 2,810 items, dims (200, 600), 40
  steps, B = 64), fp32 and bf16, sampling eagerly or from a graph; and fp32
  with every op on the PyTorch reference (``REFIT_BACKEND=reference``). Whether
  ``ReFiT.step`` runs on the device as written is a check; where it fails
  (for example a reward input left on the CPU), the failure is recorded and
  the iterations are timed with the reward's inputs moved to the device;
* ReFiT's sampling alone (``policy.sample``, B = 64): eager or graph, fp32 or
  bf16, the noise from a CPU generator (the trainer's) or a device generator;
* evaluation's reverse pass over every user (batches of 1,024, the last one
  padded): the hidden-space pass (the default) and the full-row pass; and
  the whole evaluation (rows gathered on the device, scores, ``topk_hits``,
  metrics), with a check that ``RowRecommender.evaluate`` itself runs there;
* DreamRec's evaluation sampler (ML-1M-seq size: 3,706 items, width 64, 500
  steps, a batch of 2,048): eager with the folded linear algebra (the
  default), eager step by step, and the graph of the step-by-step loop; the
  noise from a CPU generator (what evaluation seeds) or a device one.

Checks: the graph gives the eager sampler's trajectory for the same noise;
on a GPU the loop runs with ``torch.cuda.set_sync_debug_mode("error")`` (a
host synchronisation inside it would raise) and the capture itself succeeds.

    python -m benchmarks.gpu.gpu_loops --json loops.json [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

import refit_kernels as rk
from benchmarks.paths import data_root
from refit.families import graphed
from refit.data import load_dataset
from refit.diffusion import GaussianDiffusion
from refit.families.diffrec.denoisers import build_model
from refit.families.dreamrec.network import DreamRec
from refit.families.diffrec.pretrain import PretrainConfig
from refit.families.diffrec.recommender import RowRecommender
from refit.families.dreamrec.pretrain import DreamRecConfig
from refit.families.dreamrec.recommender import SeqRecommender
from refit.posttrain.config import FinetuneConfig
from refit.posttrain.trainer import ReFiT


class Bench:
    def __init__(self, device: torch.device, quick: bool):
        self.device, self.quick = device, quick
        self.rows, self.checks = [], []
        self.repeat, self.warmup = (2, 1) if quick else (10, 3)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, repeat=None, warmup=None) -> float:
        """Median seconds of ``fn()`` followed by a device synchronisation."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
            self.sync()
        times = []
        for _ in range(self.repeat if repeat is None else repeat):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def row(self, what: str, **fields):
        row = {"what": what, **{k: (round(v * 1e3, 4) if k.endswith("_s") else v) for k, v in fields.items()}}
        row = {k.replace("_s", "_ms") if k.endswith("_s") else k: v for k, v in row.items()}
        self.rows.append(row)
        eager, graph = row.get("eager_ms"), row.get("graph_ms")
        # Off a GPU the "graph" is the capture-safe loop run eagerly: no speed-up to speak of.
        gain = f"   graph {eager / graph:.2f}x faster" if eager and graph and self.device.type == "cuda" else ""
        print(f"  {what:<62} " + "  ".join(f"{k} {v}" for k, v in row.items() if k != "what") + gain, flush=True)

    def check(self, name: str, ok: bool, detail: str = ""):
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"  check {name}: {'ok' if ok else 'FAILED'} {detail}", flush=True)

    def section(self, name: str, fn):
        print(f"{name}:", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            self.check(name, False, f"{type(exc).__name__}: {exc}")


def diffrec(data, device, precision, quick):
    cfg = PretrainConfig(dims=(32, 64), steps=6) if quick else PretrainConfig()
    torch.manual_seed(0)
    model = build_model("diffrec", cfg.model_config(data.n_items)).to(device)
    return RowRecommender("diffrec", model, GaussianDiffusion(cfg.diffusion_config(), device=device), precision=precision)


def _reward_on_the_scores_device(reward_fn):
    """collaborative_reward with the episode's CSR rows, the neighbors and the training matrix moved to
    the scores' device (what ReFiT.rollout hands it lives on the CPU)."""
    def reward(scores, episode, neighbors, neighbor_sets, **kw):
        dev = scores.device
        move = lambda c: None if c is None else c.to(dev)  # noqa: E731
        episode = episode._replace(positives=move(episode.positives), exclude=move(episode.exclude))
        return reward_fn(scores, episode, neighbors.to(dev), move(neighbor_sets), **kw)
    return reward


def first_step(b: Bench, trainer) -> None:
    """One ReFiT step as the library takes it; where its reward refuses inputs left on the CPU, the
    failure is recorded and the reward's inputs are moved to the device for the timings that follow."""
    import refit.posttrain.trainer as trainer_module

    try:
        trainer.step()
        b.check("ReFiT.step runs on this device as written", True)
    except ValueError as exc:
        if "is on cpu but scores is on" not in str(exc):
            raise
        b.check("ReFiT.step runs on this device as written", False,
                f"refit/posttrain/trainer.py ReFiT.rollout: {exc}; timed with the reward's inputs moved to the device")
        trainer_module.collaborative_reward = _reward_on_the_scores_device(trainer_module.collaborative_reward)
        trainer.step()


def refit_iterations(b: Bench, data, B: int):
    for precision in ("fp32", "bf16"):
        rec = diffrec(data, b.device, precision, b.quick)
        trainer = ReFiT(rec, data, FinetuneConfig(checkpoint="", batch_size=B, seed=0))
        if precision == "fp32":
            first_step(b, trainer)
        eager = b.time(trainer.step)
        reference = None
        if precision == "fp32":
            os.environ["REFIT_BACKEND"] = "reference"
            try:
                reference = b.time(trainer.step)
            finally:
                del os.environ["REFIT_BACKEND"]
        trainer.policy = trainer.rec = graphed(rec, batch_size=B)  # the same module, the same optimiser
        graph = b.time(trainer.step)
        b.row(f"ReFiT iteration DiffRec B={B} {precision}", eager_s=eager, graph_s=graph,
              **({"reference_ops_s": reference} if reference is not None else {}))


def sampling(b: Bench, data, B: int):
    users = torch.arange(B)
    inputs = rk.gather_rows(data.train, users).to(b.device)
    for precision in ("fp32", "bf16"):
        rec = diffrec(data, b.device, precision, b.quick)
        rec.model.eval()
        fast = graphed(rec, batch_size=B)
        for where in ("cpu", b.device.type) if b.device.type != "cpu" else ("cpu",):
            g = torch.Generator(device=where).manual_seed(0)
            eager = b.time(lambda: rec.sample(users, inputs, generator=g))
            graph = b.time(lambda: fast.sample(users, inputs, generator=g))
            b.row(f"ReFiT sampling B={B} {precision}, noise from a {where} generator", eager_s=eager, graph_s=graph)
        if precision == "fp32":
            same_noise(b, rec, fast, users, inputs)
            no_sync(b, fast)


def same_noise(b: Bench, rec, fast, users, inputs):
    where = b.device.type
    want = rec.sample(users, inputs, generator=torch.Generator(device=where).manual_seed(7))
    got = fast.sample(users, inputs, generator=torch.Generator(device=where).manual_seed(7))
    worst = max(float((getattr(got, n) - getattr(want, n)).abs().max()) for n in ("states", "preds", "final"))
    scale = float(want.states.abs().max())
    b.check("graph equals the eager sampler (same noise)", worst <= 1e-5 * max(scale, 1.0),
            f"largest difference {worst:.3e} (states up to {scale:.3e})")


def no_sync(b: Bench, fast):
    samplers = list(fast.samplers.values())
    if b.device.type != "cuda":
        b.check("no host sync inside the loop", True, "checked by tests/test_cudagraph.py on the CPU")
        return
    captured = all(s.loop.graph is not None for s in samplers)
    b.check("captured into a CUDA graph", captured, f"{len(samplers)} sampler(s)")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in samplers:
            s.run_loop()
        ok, detail = True, "torch.cuda.set_sync_debug_mode('error') around the loop"
    except RuntimeError as exc:
        ok, detail = False, str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    b.check("no host sync inside the loop", ok, detail)


def evaluate_on_device(scorer, data, batch: int, ks, device):
    """refit's evaluation (valid + test metrics) with the training rows gathered on ``device``."""
    from refit.evaluate import evaluate_many
    from refit.evaluate import evaluation_targets

    train = rk.as_csr(data.train, "train", index_dtype=None).to(device)

    def score_fn(users):
        users = users.to(device)
        return scorer.scores(users, rk.gather_rows(train, users))

    return evaluate_many(score_fn, evaluation_targets(data, ("valid", "test")), ks=ks, batch_size=batch)


def evaluation(b: Bench, data, batch: int):
    rec = diffrec(data, b.device, "fp32", b.quick)
    rec.model.eval()
    fast = graphed(rec, eval_batch_size=batch)
    users = torch.arange(data.n_users)
    train = rk.as_csr(data.train, "train", index_dtype=None).to(b.device)
    batches = [(u, rk.gather_rows(train, u)) for u in (users[s:s + batch].to(b.device)
                                                       for s in range(0, data.n_users, batch))]
    for latent, name in ((True, "hidden-space pass (default)"), (False, "full-row pass")):
        eager = b.time(lambda: [rec.scores(u, r, latent=latent) for u, r in batches], repeat=max(2, b.repeat // 2))
        graph = b.time(lambda: [fast.scores(u, r, latent=latent) for u, r in batches], repeat=max(2, b.repeat // 2))
        b.row(f"evaluation scores, {data.n_users} users in batches of {batch}: {name}", eager_s=eager, graph_s=graph)
    ks = (10, 20, 50, 100)
    try:
        want = rec.evaluate(data, ks=ks, batch_size=batch)
        b.check("RowRecommender.evaluate runs on this device as written", True)
    except ValueError as exc:
        want = None
        b.check("RowRecommender.evaluate runs on this device as written", False,
                f"refit.evaluate.evaluate_recommender: {exc}; timed with the rows gathered on the device")
    got = fast.evaluate(data, ks=ks, batch_size=batch)
    if want is not None:
        worst = max(abs(got[s][k] - want[s][k]) for s in want for k in want[s])
        b.check("graphed evaluation gives the eager metrics", worst <= 1e-5, f"largest difference {worst:.2e}")
    eager = b.time(lambda: evaluate_on_device(rec, data, batch, ks, b.device), repeat=max(2, b.repeat // 4),
                   warmup=1)
    graph = b.time(lambda: fast.evaluate(data, ks=ks, batch_size=batch), repeat=max(2, b.repeat // 4), warmup=1)
    b.row(f"evaluation end to end (valid + test metrics), batches of {batch}", eager_s=eager, graph_s=graph)


def dreamrec(b: Bench, B: int):
    cfg = DreamRecConfig(steps=10) if b.quick else DreamRecConfig()
    n_items = 60 if b.quick else 3706
    torch.manual_seed(0)
    model = DreamRec(**cfg.model_config(n_items)).to(b.device).eval()
    rec = SeqRecommender(model, GaussianDiffusion(cfg.diffusion_config(), device=b.device), w=cfg.w)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, cfg.max_len + 1, (B,), generator=g)
    hist = torch.randint(0, n_items, (B, cfg.max_len), generator=g)
    hist[torch.arange(cfg.max_len)[None, :] >= lengths[:, None]] = n_items
    hist, lengths = hist.to(b.device), lengths.to(b.device)
    fast = graphed(rec, eval_batch_size=B)
    # refit's evaluation seeds a CPU generator per batch; a device generator shows the loop without host draws.
    for where in ("cpu", b.device.type) if b.device.type != "cpu" else ("cpu",):
        gen = lambda: torch.Generator(device=where).manual_seed(1)  # noqa: E731
        folded = b.time(lambda: rec.generate(hist, lengths, gen()), repeat=max(2, b.repeat // 2))
        stepwise = b.time(lambda: rec.generate(hist, lengths, gen(), fast=False), repeat=max(2, b.repeat // 2))
        graph = b.time(lambda: fast.generate(hist, lengths, gen()), repeat=max(2, b.repeat // 2))
        b.row(f"DreamRec evaluation sampler, {cfg.steps} steps, B={B}, {n_items} items, {where} generator",
              eager_s=stepwise, graph_s=graph, eager_folded_s=folded)
        got, want = fast.generate(hist, lengths, gen()), rec.generate(hist, lengths, gen(), fast=False)
        worst = float((got - want).abs().max())
        b.check(f"DreamRec graph equals the eager step-by-step sampler ({where} generator)",
                worst <= 1e-4 * max(float(want.abs().max()), 1.0), f"largest difference {worst:.3e}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the dry run)")
    p.add_argument("--data", default=None, help="DiffRec's ml-1m_clean folder (default: $REFIT_DATA/ml-1m_clean)")
    p.add_argument("--json", default=None, help="write the rows and checks here")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_loops: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    b = Bench(device, a.quick)
    if a.quick:
        data = load_dataset("synthetic", n_users=120, n_items=150, seed=0)
    else:
        path = a.data or os.path.join(data_root(), "ml-1m_clean")
        data = load_dataset(path)
    B, eval_batch, seq_batch = (8, 32, 16) if a.quick else (64, 1024, 2048)
    print(f"gpu_loops on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"data {data}", flush=True)
    b.section("ReFiT iteration", lambda: refit_iterations(b, data, B))
    b.section("ReFiT sampling", lambda: sampling(b, data, B))
    b.section("evaluation", lambda: evaluation(b, data, eval_batch))
    b.section("DreamRec", lambda: dreamrec(b, seq_batch))
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "quick": a.quick, "rows": b.rows, "checks": b.checks}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    failed = [c["name"] for c in b.checks if not c["ok"]]
    if failed:
        print(f"gpu_loops: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
