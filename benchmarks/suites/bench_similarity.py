"""top_similar_users on ML-1M's training matrix (5,949 users), m = 10.

``blocked`` is refit.similarity.top_similar_users (exact ties, memory
O(block x n_users)). ``dense`` is the textbook computation for scale: the full
n_users x n_users cosine matrix from a dense copy of the data, then
``torch.topk`` (arbitrary order among ties; 5,949^2 floats = 141 MB here,
quadratic in the number of users).

    flock /tmp/refit-bench.lock pytest benchmarks/suites/bench_similarity.py --benchmark-only
"""

import pytest
import torch

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record

_CACHE = {}


def train_matrix():
    if "A" not in _CACHE:
        from refit.data import load_dataset

        if QUICK:
            _CACHE["A"], _CACHE["name"] = load_dataset("synthetic").train, "synthetic"
        else:
            path = shared_data()
            if path is None:
                pytest.skip("the ML-1M split is not in ../shared/data (or $REFIT_DATA)")
            _CACHE["A"], _CACHE["name"] = load_dataset(path).train, "ml-1m"
    return _CACHE["A"], _CACHE["name"]


def dense_top(A, m):
    x = torch.from_numpy(A.toarray())
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = x @ x.T
    sim.fill_diagonal_(-1.0)
    return torch.topk(sim, m, dim=1).indices


@pytest.mark.parametrize("impl", ["blocked", "dense"])
def test_top_similar_users(benchmark, impl):
    from refit.similarity import top_similar_users

    A, name = train_matrix()
    fn = (lambda: top_similar_users(A, 10)) if impl == "blocked" else (lambda: dense_top(A, 10))
    group = f"top_similar_users {name}: {A.shape[0]} users, m = 10"
    benchmark.group = group
    benchmark.pedantic(fn, rounds=3 if QUICK else 5, warmup_rounds=1)
    record(benchmark, group, impl, baseline="dense")
