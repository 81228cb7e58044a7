"""gather_rows on ML-1M: the cpu kernel against scipy and against a dense copy.

Plain form: a batch of 400 random users of the ML-1M training matrix (5,949
x 2,810, 403,277 interactions) becomes the dense (400, 2810) float32 model
input. Rivals: scipy row slicing + ``torch.from_numpy`` (``A[users].toarray()``)
and indexing a dense copy of the whole matrix (DiffRec's way:
``dense.index_select(0, users)``), and the PyTorch reference.

Segmented form: for the same 400 users, the weighted sum of the rows of their
50 most similar users (weights = the cosine similarities), i.e. aggregated
neighbor profiles. Rival: a scipy sparse (400 x 5949) weight matrix times A,
densified (``(W @ A).toarray()``; building W is part of its work, since the
kernel takes the neighbor lists as they are).

The kernel writes into a reused ``out`` buffer and takes the matrix as CSR
tensors prepared once (what ``refit.data.UserBatches`` does); the rows
``cpu (scipy input)`` pass the scipy matrix itself on every call, and
``cpu (new output)`` allocates the output each time.

The floor is the output's bytes plus the gathered index (and value/weight)
bytes, over this machine's copy bandwidth; the 4.5 MB output fits in cache, so
the kernel can beat it.

    flock /tmp/refit-bench.lock pytest benchmarks/suites/bench_gather_rows.py --benchmark-only
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit_kernels as rk
from refit_kernels import reference

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record

BATCH, NEIGHBORS = (64, 10) if QUICK else (400, 50)

_CACHE = {}


def problem():
    """ML-1M train (or a synthetic stand-in in quick mode), users, neighbors and weights (cached)."""
    if "p" not in _CACHE:
        from refit.data import load_dataset
        from refit.similarity import top_similar_users

        if QUICK:
            data = load_dataset("synthetic")
        else:
            path = shared_data()
            if path is None:
                pytest.skip("the ML-1M split is not in ../shared/data (or $REFIT_DATA)")
            data = load_dataset(path)
        A = data.train
        rng = np.random.default_rng(0)
        users = np.sort(rng.choice(data.n_users, size=BATCH, replace=False))
        neighbors, sims = top_similar_users(A, NEIGHBORS, return_similarity=True)
        nb, w = neighbors[users], sims[users].float()
        valid = nb >= 0
        rows = nb[valid]
        seg = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(valid.sum(1), 0)])
        _CACHE["p"] = dict(A=A, users=users, rows=rows, seg=seg, weights=w[valid].contiguous(),
                           name="ml-1m" if not QUICK else "synthetic")
    return _CACHE["p"]


def _plain_impls(p):
    A, users = p["A"], p["users"]
    n_items = A.shape[1]
    u = torch.from_numpy(users)
    implicit = (torch.from_numpy(A.indptr), torch.from_numpy(A.indices))  # 0/1 matrix: values are ones
    out = torch.empty(len(users), n_items)
    dense = torch.from_numpy(A.toarray())
    csr64 = rk.as_csr(A, "A", values_dtype=torch.float32)
    return {
        "cpu": lambda: rk.gather_rows(implicit, u, out=out, n_cols=n_items, backend="cpu"),
        "cpu (scipy input)": lambda: rk.gather_rows(A, u, out=out, backend="cpu"),
        "cpu (new output)": lambda: rk.gather_rows(implicit, u, n_cols=n_items, backend="cpu"),
        "scipy": lambda: torch.from_numpy(A[users].toarray()),
        "dense copy": lambda: dense.index_select(0, u),
        "reference": lambda: reference.gather_rows(csr64.indptr, csr64.indices, None, u, None, None, n_items),
    }


def _segmented_impls(p):
    A, rows, seg, w = p["A"], p["rows"], p["seg"], p["weights"]
    n_users, n_items = A.shape
    implicit = (torch.from_numpy(A.indptr), torch.from_numpy(A.indices))
    out = torch.empty(seg.shape[0] - 1, n_items)
    rows_np, seg_np, w_np = rows.numpy(), seg.numpy(), w.numpy()
    csr64 = rk.as_csr(A, "A", values_dtype=torch.float32)

    def scipy_matmul():
        W = sp.csr_matrix((w_np, rows_np, seg_np), shape=(len(seg_np) - 1, n_users))
        return torch.from_numpy((W @ A).toarray())

    return {
        "cpu": lambda: rk.gather_rows(implicit, rows, segments=seg, weights=w, out=out, n_cols=n_items,
                                      backend="cpu"),
        "cpu (scipy input)": lambda: rk.gather_rows(A, rows, segments=seg, weights=w, out=out, backend="cpu"),
        "scipy": scipy_matmul,
        "reference": lambda: reference.gather_rows(csr64.indptr, csr64.indices, None, rows, seg, w, n_items),
    }


IMPLS = ["cpu", "cpu (scipy input)", "cpu (new output)", "scipy", "dense copy", "reference"]


def _run(benchmark, copy_bandwidth, form, impl):
    if rk.available_backends()["cpu"] is not None and impl.startswith("cpu"):
        pytest.skip(rk.available_backends()["cpu"])
    p = problem()
    if form not in _CACHE:  # built once: the dense copy alone is 67 MB
        _CACHE[form] = _plain_impls(p) if form == "plain" else _segmented_impls(p)
    impls = _CACHE[form]
    if impl not in impls:
        pytest.skip(f"{impl} is not a {form} implementation")
    fn = impls[impl]
    # Same result as scipy (0/1 values: exact for the plain form; float32 sums for the segmented one).
    torch.testing.assert_close(fn(), impls["scipy"](), rtol=1e-5, atol=1e-5)
    A = p["A"]
    B = len(p["users"]) if form == "plain" else p["seg"].shape[0] - 1
    rows = torch.from_numpy(p["users"]) if form == "plain" else p["rows"]
    nnz = int((torch.from_numpy(A.indptr)[rows + 1] - torch.from_numpy(A.indptr)[rows]).sum())
    traffic = B * A.shape[1] * 4 + nnz * 4 + rows.shape[0] * (8 + 8 + (4 if form == "segmented" else 0))
    if form == "plain":
        group = f"gather_rows plain {p['name']}: {B} users x {A.shape[1]} items"
    else:
        group = f"gather_rows segmented {p['name']}: {B} users x {NEIGHBORS} weighted neighbors ({nnz} entries)"
    benchmark.group = group
    benchmark.extra_info.update(B=B, n_items=A.shape[1], gathered_entries=nnz)
    slow = impl == "reference" or (impl == "scipy" and form == "segmented")
    benchmark.pedantic(fn, rounds=(5 if QUICK else 15) if slow else (20 if QUICK else 200), warmup_rounds=2)
    record(benchmark, group, impl, floor_s=traffic / copy_bandwidth, baseline="scipy",
           note=f"floor: {traffic / 1e6:.1f} MB at {copy_bandwidth / 1e9:.1f} GB/s")


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_rows_plain(benchmark, copy_bandwidth, impl):
    _run(benchmark, copy_bandwidth, "plain", impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_rows_segmented(benchmark, copy_bandwidth, impl):
    _run(benchmark, copy_bandwidth, "segmented", impl)
