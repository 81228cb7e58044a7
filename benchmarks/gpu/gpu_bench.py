"""Kernel benchmarks on one device for benchmarks/gpu/gpu_check.sh: every kernel against the reference, eager and
under torch.compile, with the copy bandwidth measured in the same run.

On a GPU every tensor lives on the device and every timed call ends with
``torch.cuda.synchronize()``, so a median is the time until the results
exist. Rows (float32):

* copy bandwidth: a 1 GiB device-to-device copy (bytes read + written / time),
  the floor every memory-bound row is compared with;
* gaussian_logprob forward + backward at DiffRec's ML-1M shape (40, 400, 2810)
  and a Yelp-sized catalogue (5, 400, 34395): ``cuda``, ``triton``, the
  reference eager and compiled; (5S + 2) B I 4 bytes must move;
* policy_loss (REINFORCE's loss and gradient) at the DiffRec (40, 400, 2810)
  and GRPO (20, 1024, 2810) shapes, the same four; (3S + 1) B I 4 bytes;
* gather_rows on ML-1M: 400 users (plain), and the weighted sum of each
  one's 50 most similar users (segmented), and a large plain gather (4,096 rows
  of a 20,000 x 34,395 matrix, 0.2 % dense), against the reference eager and
  compiled and a dense copy of the matrix (``index_select``; for the segmented
  form a dense weight matrix times it);
* topk_hits: the full ML-1M evaluation (train + valid masked, test positives,
  ks 10/20/50/100, batches of 400) through ``refit.evaluate.evaluate``, the
  kernel calls alone, and the vectorised PyTorch path (mask, ``torch.topk``,
  gather, cumulative sums; bench_topk_hits.py), eager and compiled; the
  ReFiT reward at B = 64 and 400 against the vectorised PyTorch reward.

Targets (reported by gpu_report.py, not asserted): gaussian_logprob,
policy_loss and gather_rows at >= 70 % of the copy bandwidth; the evaluation >= 3x and the
reward >= 2x faster than the vectorised PyTorch paths. Each row's
``extra_info`` holds the bytes it must move and its target.

Without a GPU (``gpu_check.sh --dry-run``) the same rows run on CPU tensors,
with the cpu kernel in the kernels' place; ``REFIT_BENCH_QUICK=1`` shrinks the
shapes, and ``REFIT_BENCH_COMPILE_BACKEND=eager`` makes torch.compile trace
without generating code (the dry run's time goes to checking the plumbing).

    pytest benchmarks/gpu/gpu_bench.py --benchmark-only --benchmark-json=bench.json
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import pytest
import torch

import refit_kernels as rk
from refit_kernels import reference

from benchmarks.suites._bench import QUICK, record

DEVICE = torch.device(os.environ.get("REFIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
COMPILE_BACKEND = os.environ.get("REFIT_BENCH_COMPILE_BACKEND", "inductor")
GPU = DEVICE.type == "cuda"
if GPU and not torch.cuda.is_available():  # no silent CPU numbers for a GPU run
    raise RuntimeError(f"REFIT_BENCH_DEVICE={DEVICE} but torch sees no CUDA device")
#: The kernel backends of this device; the cpu kernel stands in for them on a CPU (the dry run).
KERNELS = ["cuda", "triton"] if GPU else ["cpu"]
BW_TARGET = 0.70


def sync() -> None:
    if GPU:
        torch.cuda.synchronize(DEVICE)


def synced(fn):
    def run():
        out = fn()
        sync()
        return out
    return run


def compiled(fn):
    """torch.compile of a reference, one compilation for every shape (dynamic), on this run's backend."""
    return torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND)


def usable(name: str):
    """None when kernel backend ``name`` can run here at full speed, else why not."""
    reason = rk.available_backends().get(name)
    if reason is None:
        reason = rk.dispatch.device_objection(name, DEVICE)
    if reason is None and name == "triton" and rk.triton.interpret_mode():
        reason = "Triton runs in its interpreter here (TRITON_INTERPRET=1): its speed means nothing"
    return reason


def run_timed(benchmark, fn, group, impl, rounds, **info):
    """Times ``fn`` (synchronised) with pytest-benchmark and records the row for the summary tables."""
    benchmark.group = group
    benchmark.extra_info.update(device=str(DEVICE), impl=impl, **info)
    fn = synced(fn)
    fn()  # compile and warm up outside the timing
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    bw = _BANDWIDTH.get("bytes_per_s")
    floor = info["bytes"] / bw if bw and info.get("bytes") else None
    record(benchmark, group, impl, floor_s=floor,
           note=f"floor: {info['bytes'] / 1e6:.1f} MB at {bw / 1e9:.0f} GB/s" if floor else "")
    keep_row(benchmark)


def keep_row(benchmark):
    """Appends the row to $REFIT_BENCH_ROWS as it is timed, so a run cut short keeps what it measured."""
    path, stats = os.environ.get("REFIT_BENCH_ROWS"), getattr(benchmark, "stats", None)
    if path and stats is not None:
        with open(path, "a") as f:
            f.write(json.dumps({"group": benchmark.group, "name": benchmark.name,
                                "extra_info": dict(benchmark.extra_info),
                                "stats": {"median": stats.stats.median}}) + "\n")


# --- the copy bandwidth --------------------------------------------------------------------------

_BANDWIDTH = {}
COPY_ELEMS = (2 * 2**20) if QUICK else (256 * 2**20)  # float32: 8 MiB or 1 GiB per buffer


def _copy_bandwidth():
    if "bytes_per_s" not in _BANDWIDTH:
        src = torch.rand(COPY_ELEMS, device=DEVICE)
        dst = torch.empty_like(src)
        fn = synced(lambda: dst.copy_(src))
        fn()
        times = []
        for _ in range(5 if QUICK else 20):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        _BANDWIDTH["bytes_per_s"] = 2 * src.numel() * 4 / statistics.median(times)
        _BANDWIDTH["src"], _BANDWIDTH["dst"] = src, dst
    return _BANDWIDTH["bytes_per_s"]


@pytest.fixture
def bandwidth():
    return _copy_bandwidth()


def test_copy_bandwidth(benchmark, bandwidth):
    src, dst = _BANDWIDTH["src"], _BANDWIDTH["dst"]
    n_bytes = 2 * src.numel() * 4
    benchmark.group = f"copy bandwidth {DEVICE.type}"
    benchmark.extra_info.update(device=str(DEVICE), impl="copy", bytes=n_bytes)
    benchmark.pedantic(synced(lambda: dst.copy_(src)), rounds=5 if QUICK else 20, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _BANDWIDTH["bytes_per_s"] = n_bytes / stats.stats.median
        benchmark.extra_info["bytes_per_s"] = _BANDWIDTH["bytes_per_s"]
        keep_row(benchmark)


# --- gaussian_logprob ------------------------------------------------------------------------------

from benchmarks.suites import bench_gaussian_logprob as _glp  # noqa: E402

GLP_IMPLS = KERNELS + ["reference"]
_COMPILED = {}


def _glp_fn(impl):
    if impl == "reference":
        return reference.gaussian_logprob
    if impl == "reference-compiled":
        if "glp" not in _COMPILED:
            _COMPILED["glp"] = compiled(reference.gaussian_logprob)
        return _COMPILED["glp"]
    return lambda *a, _n=impl: rk.gaussian_logprob(*a, backend=_n)


@pytest.mark.parametrize("shape_name", list(_glp.SHAPES))
@pytest.mark.parametrize("impl", GLP_IMPLS)
def test_gaussian_logprob(benchmark, bandwidth, shape_name, impl):
    bench_gaussian_logprob(benchmark, shape_name, impl)


def bench_gaussian_logprob(benchmark, shape_name, impl):
    if impl in KERNELS and usable(impl) is not None:
        pytest.skip(usable(impl))
    shape = _glp.SHAPES[shape_name]
    pred, traj, cp, cx, lv, weights = _glp.trajectory(shape, str(DEVICE))
    p = pred.detach().requires_grad_(True)
    fn = _glp_fn(impl)

    def fwd_bwd():
        out = fn(p, traj, cp, cx, lv)
        return torch.autograd.grad(out, p, weights)[0]

    if impl == "reference-compiled":
        first_compiled_call(fwd_bwd)
    S, B, I = shape
    slow = impl.startswith("reference")
    run_timed(benchmark, fwd_bwd, f"gaussian_logprob fwd+bwd {shape_name} {shape} {DEVICE.type}", impl,
              rounds=(3 if QUICK else 10) if slow else (5 if QUICK else 30),
              bytes=(5 * S + 2) * B * I * 4, target="bandwidth" if impl in KERNELS else None,
              target_fraction=BW_TARGET)


# --- policy_loss -----------------------------------------------------------------------------------

from benchmarks.suites import bench_policy_loss as _pl  # noqa: E402

PL_SHAPES = {"quick": (4, 16, 300)} if QUICK else {k: _pl.SHAPES[k] for k in ("diffrec", "grpo")}


def _pl_fn(impl):
    if impl == "reference":
        return _pl._reference
    if impl == "reference-compiled":
        if "pl" not in _COMPILED:
            _COMPILED["pl"] = compiled(_pl._reference)
        return _COMPILED["pl"]
    return lambda p, t, cp, cx, lv, a, o, _n=impl: rk.policy_loss(p, t, cp, cx, lv, a, old_logprob=o, backend=_n).loss


@pytest.mark.parametrize("shape_name", list(PL_SHAPES))
@pytest.mark.parametrize("impl", GLP_IMPLS)
def test_policy_loss(benchmark, bandwidth, shape_name, impl):
    bench_policy_loss(benchmark, shape_name, impl)


def bench_policy_loss(benchmark, shape_name, impl):
    """REINFORCE's loss and its gradient: the fused kernels against autograd through the reference."""
    if impl in KERNELS and usable(impl) is not None:
        pytest.skip(usable(impl))
    shape = PL_SHAPES[shape_name]
    pred, traj, cp, cx, lv, adv, _ = _pl.trajectory(shape, str(DEVICE))
    p = pred.detach().requires_grad_(True)
    fn = _pl_fn(impl)

    def loss_and_grad():
        return torch.autograd.grad(fn(p, traj, cp, cx, lv, adv, None), p)[0]

    if impl == "reference-compiled":
        first_compiled_call(loss_and_grad)
    S, B, I = shape
    slow = impl.startswith("reference")
    run_timed(benchmark, loss_and_grad, f"policy_loss reinforce {shape_name} {shape} {DEVICE.type}", impl,
              rounds=(3 if QUICK else 10) if slow else (5 if QUICK else 30),
              bytes=(3 * S + 1) * B * I * 4, target="bandwidth" if impl in KERNELS else None,
              target_fraction=BW_TARGET)


# --- gather_rows -------------------------------------------------------------------------------------

from benchmarks.suites import bench_gather_rows as _gr  # noqa: E402

GATHER_FORMS = ["plain", "segmented", "plain-large"]
GATHER_IMPLS = KERNELS + ["reference", "dense"]
_GATHER = {}


def _large_problem():
    """A random 0/1 CSR matrix (20,000 x 34,395, ~70 entries a row; quick: 500 x 3,000) and 4,096 rows of it."""
    n_rows, n_cols, per_row, B = (500, 3000, 20, 64) if QUICK else (20_000, 34_395, 70, 4096)
    rng = np.random.default_rng(0)
    counts = rng.poisson(per_row, n_rows)
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    keys = np.unique(row_of * n_cols + rng.integers(0, n_cols, row_of.size))
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // n_cols, minlength=n_rows), out=indptr[1:])
    rows = np.sort(rng.choice(n_rows, size=B, replace=False))
    return indptr, (keys % n_cols).astype(np.int64), n_cols, rows


def gather_case(form):
    """Device tensors and implementations of one gather form (cached)."""
    if form in _GATHER:
        return _GATHER[form]
    dev = DEVICE
    if form == "plain-large":
        indptr, indices, n_cols, users = _large_problem()
        indptr, indices = torch.from_numpy(indptr).to(dev), torch.from_numpy(indices).to(dev)
        rows, seg, w = torch.from_numpy(users).to(dev), None, None
        name = f"random {indptr.numel() - 1}x{n_cols}"
    else:
        p = _gr.problem()
        A = p["A"]
        n_cols = A.shape[1]
        indptr = torch.from_numpy(A.indptr.astype(np.int64)).to(dev)
        indices = torch.from_numpy(A.indices.astype(np.int64)).to(dev)
        name = p["name"]
        if form == "plain":
            rows, seg, w = torch.from_numpy(p["users"]).to(dev), None, None
        else:
            rows, seg, w = p["rows"].to(dev), p["seg"].to(dev), p["weights"].to(dev)
    B = rows.shape[0] if seg is None else seg.shape[0] - 1
    out = torch.empty(B, n_cols, device=dev)
    n_rows = indptr.numel() - 1
    ref = lambda: reference.gather_rows(indptr, indices, None, rows, seg, w, n_cols)  # noqa: E731

    def dense_fn():
        """The rival that keeps a dense copy of the matrix on the device (built once, outside the timing)."""
        key = (n_rows, n_cols, form != "plain-large")
        cache = _GATHER.setdefault("dense", {})
        if key not in cache:
            cache.clear()  # one dense matrix at a time
            vals = torch.ones(indices.numel(), device=dev)
            cache[key] = torch.sparse_csr_tensor(indptr, indices, vals, (n_rows, n_cols)).to_dense()
        dense = cache[key]
        if seg is None:
            return lambda: dense.index_select(0, rows)
        seg_of = torch.repeat_interleave(torch.arange(B, device=dev), seg.diff())

        def matmul():  # the weight matrix is built inside the timing: the kernel takes the lists as they are
            W = torch.zeros(B, n_rows, device=dev).index_put_((seg_of, rows), w, accumulate=True)
            return W @ dense
        return matmul

    impls = {k: (lambda _k=k: rk.gather_rows((indptr, indices), rows, segments=seg, weights=w, out=out,
                                             n_cols=n_cols, backend=_k)) for k in KERNELS}
    impls["reference"] = ref
    if "gather" not in _COMPILED:
        _COMPILED["gather"] = compiled(reference.gather_rows)
    impls["reference-compiled"] = lambda: _COMPILED["gather"](indptr, indices, None, rows, seg, w, n_cols)
    impls["dense"] = dense_fn
    nnz = int((indptr[rows + 1] - indptr[rows]).sum())
    traffic = B * n_cols * 4 + nnz * 8 + rows.shape[0] * (8 + 16 + (4 if seg is not None else 0))
    what = (f"{B} rows x {n_cols} columns" if seg is None else f"{B} users x weighted neighbors ({nnz} entries)")
    _GATHER[form] = dict(impls=impls, traffic=traffic, group=f"gather_rows {form} {name}: {what} {DEVICE.type}",
                         check=ref)
    return _GATHER[form]


@pytest.mark.parametrize("form", GATHER_FORMS)
@pytest.mark.parametrize("impl", GATHER_IMPLS)
def test_gather_rows(benchmark, bandwidth, form, impl):
    bench_gather_rows(benchmark, form, impl)


def bench_gather_rows(benchmark, form, impl):
    if impl in KERNELS and usable(impl) is not None:
        pytest.skip(usable(impl))
    case = gather_case(form)
    fn = case["impls"][impl]
    if impl == "dense":
        fn = fn()
    if impl == "reference-compiled":
        first_compiled_call(fn)
    # Like with like: every row computes the reference's result (0/1 values: exact sums; weights: float32).
    torch.testing.assert_close(fn(), case["check"](), rtol=1e-5, atol=1e-5)
    slow = impl.startswith("reference")
    run_timed(benchmark, fn, case["group"], impl, rounds=(3 if QUICK else 10) if slow else (10 if QUICK else 50),
              bytes=case["traffic"], target="bandwidth" if impl in KERNELS else None, target_fraction=BW_TARGET)


# --- topk_hits: the full evaluation and the reward ------------------------------------------------

from benchmarks.suites import bench_topk_hits as _tk  # noqa: E402

EVAL_IMPLS = KERNELS + [f"{k} (topk_hits only)" for k in KERNELS] + ["reference"]
_EVAL = {}


def eval_case():
    if _EVAL:
        return _EVAL
    from refit.evaluate import evaluate, union_csr

    mats, scores_cpu = _tk.ml1m()
    dev = DEVICE
    n_users, n_items = scores_cpu.shape
    scores = scores_cpu.to(dev)
    exclude = union_csr([mats["train"], mats["valid"]], n_items).to(dev)
    positives = rk.as_csr(mats["test"], "test").to(dev)
    history = torch.from_numpy((mats["train"] + mats["valid"]).toarray() > 0).to(dev)
    test_dense = torch.from_numpy(mats["test"].toarray() > 0).to(dev)
    n_pos = torch.from_numpy(np.diff(mats["test"].indptr)).to(torch.int64).to(dev)
    kmax = _tk.KS[-1]
    disc = (1.0 / torch.log2(torch.arange(kmax, dtype=torch.float32) + 2.0)).to(dev)
    idcg = torch.cat([torch.zeros(1), torch.cumsum(disc.cpu(), 0)]).to(dev)
    B = _tk.BATCH
    starts = list(range(0, n_users, B))

    def torch_path(batch_fn):
        def run():
            total = torch.zeros(4 * len(_tk.KS), dtype=torch.float64, device=dev)
            for s in starts:
                e = min(n_users, s + B)
                total += batch_fn(scores[s:e], history[s:e], test_dense[s:e], n_pos[s:e], disc, idcg).double()
            return total / n_users
        return run

    def api(backend):
        return lambda: evaluate(lambda u: scores[int(u[0]):int(u[-1]) + 1], positives, exclude, ks=_tk.KS,
                                batch_size=B, backend=backend)

    users_all = torch.arange(n_users, device=dev)

    def kernel_only(backend):
        def run():
            outs = []
            for s in starts:
                e = min(n_users, s + B)
                outs.append(rk.topk_hits(scores[s:e], _tk.KS, users=users_all[s:e], exclude=exclude,
                                         positives=positives, backend=backend).hits)
            return outs
        return run

    impls = {k: api(k) for k in KERNELS}
    impls.update({f"{k} (topk_hits only)": kernel_only(k) for k in KERNELS})
    impls["reference"] = torch_path(_tk._torch_batch_metrics)
    impls["reference-compiled"] = torch_path(compiled(_tk._torch_batch_metrics))
    n_bytes = scores.numel() * 4 + 8 * (mats["train"].nnz + mats["valid"].nnz + mats["test"].nnz)
    _EVAL.update(impls=impls, bytes=n_bytes, shape=(n_users, n_items))
    return _EVAL


@pytest.mark.parametrize("impl", EVAL_IMPLS)
def test_topk_full_evaluation(benchmark, bandwidth, impl):
    bench_topk_full_evaluation(benchmark, None, impl)


def bench_topk_full_evaluation(benchmark, _, impl):
    kernel = impl.split(" ")[0]
    if kernel in KERNELS and usable(kernel) is not None:
        pytest.skip(usable(kernel))
    case = eval_case()
    if impl == "reference-compiled":
        first_compiled_call(case["impls"][impl])
    slow = impl.startswith("reference")
    run_timed(benchmark, case["impls"][impl], f"topk_hits full evaluation ML-1M {case['shape']} ks {_tk.KS} "
              f"batch {_tk.BATCH} {DEVICE.type}", impl, rounds=(3 if QUICK else 10) if slow else (3 if QUICK else 20),
              bytes=case["bytes"], target="speedup" if impl in KERNELS else None, target_speedup=3.0,
              versus="reference")


REWARD_IMPLS = KERNELS + ["reference"]
_REWARD = {}


def reward_case(B):
    if B in _REWARD:
        return _REWARD[B]
    x = _tk._reward_inputs(B)
    dev = DEVICE
    scores, users, nbrs = (x[k].to(dev) for k in ("scores", "users", "neighbors"))
    csr = {k: (x[k].indptr.to(dev), x[k].indices.to(dev)) for k in ("exclude", "positives", "neighbor_sets")}
    d = {k: v.to(dev) for k, v in x["dense"].items()}
    K = _tk.REWARD_K

    def kernel(backend):
        def run():
            out = rk.topk_hits(scores, K, users=users, exclude=csr["exclude"], positives=csr["positives"],
                               neighbors=nbrs, neighbor_sets=csr["neighbor_sets"], backend=backend)
            return 0.5 * out.hits[:, 0] / K + 0.5 * out.neighbor_hits[:, 0] / K
        return run

    impls = {k: kernel(k) for k in KERNELS}
    impls["reference"] = lambda: _tk._torch_reward(scores, d["visible"], d["hidden"], d["train"], users, nbrs)
    if "reward" not in _COMPILED:
        _COMPILED["reward"] = compiled(_tk._torch_reward)
    impls["reference-compiled"] = lambda: _COMPILED["reward"](scores, d["visible"], d["hidden"], d["train"], users,
                                                              nbrs)
    _REWARD[B] = dict(impls=impls, n=scores.shape[0], n_items=scores.shape[1])
    return _REWARD[B]


@pytest.mark.parametrize("B", _tk.REWARD_BATCHES)
@pytest.mark.parametrize("impl", REWARD_IMPLS)
def test_topk_reward(benchmark, bandwidth, B, impl):
    bench_topk_reward(benchmark, B, impl)


def bench_topk_reward(benchmark, B, impl):
    if impl in KERNELS and usable(impl) is not None:
        pytest.skip(usable(impl))
    case = reward_case(B)
    fn = case["impls"][impl]
    if impl == "reference-compiled":
        first_compiled_call(fn)
    torch.testing.assert_close(fn().float(), case["impls"]["reference"]().float())
    run_timed(benchmark, fn, f"topk_hits reward B={B} I={case['n_items']} M={_tk.N_NEIGHBORS} K={_tk.REWARD_K} "
              f"{DEVICE.type}", impl, rounds=5 if QUICK else 50, bytes=None,
              target="speedup" if impl in KERNELS else None, target_speedup=2.0, versus="reference")


# --- torch.compile of the references, last ------------------------------------------------------------
#
# Compiling takes most of this file's time on a GPU; run last, a deadline that comes early costs only
# these rows. One compilation serves every shape of a reference (dynamic shapes).

COMPILED = ([("gaussian_logprob", s) for s in _glp.SHAPES] + [("policy_loss", s) for s in PL_SHAPES]
            + [("gather_rows", f) for f in GATHER_FORMS]
            + [("topk_full_evaluation", None)] + [("topk_reward", B) for B in _tk.REWARD_BATCHES])


def first_compiled_call(fn):
    """Compiles (the first call); a reference torch.compile cannot handle is a skipped row, not a failure."""
    try:
        fn()
        sync()
    except Exception as exc:  # noqa: BLE001 - report what torch.compile said, and go on
        pytest.skip(f"torch.compile ({COMPILE_BACKEND}) of the reference failed: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}")


@pytest.mark.parametrize("case", COMPILED, ids=lambda c: f"{c[0]}-{c[1]}")
def test_reference_compiled(benchmark, bandwidth, case):
    op, arg = case
    {"gaussian_logprob": bench_gaussian_logprob, "policy_loss": bench_policy_loss, "gather_rows": bench_gather_rows,
     "topk_full_evaluation": bench_topk_full_evaluation, "topk_reward": bench_topk_reward}[op](
        benchmark, arg, "reference-compiled")
