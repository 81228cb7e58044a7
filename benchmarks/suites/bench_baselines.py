"""Fitting and evaluating the baselines on ML-1M's training matrix (5,949 users x 2,810 items).

Fits at the hyper-parameters tuned on ML-1M's validation split (``refit
baselines``: ItemKNN k = 100, EASE l2 = 1000), each against the textbook
dense computation for scale: EASE with ``numpy.linalg.inv`` of the dense Gram
matrix and dense scoring ``X @ B``; ItemKNN from the full dense cosine matrix
and ``torch.topk`` per column. ``evaluate`` is one full-ranking pass over all
users on the test split (train + valid masked) through ``refit.evaluate``.

    flock /tmp/refit-cpu.lock pytest benchmarks/suites/bench_baselines.py --benchmark-only
"""

import numpy as np
import pytest
import torch

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record

_CACHE = {}


def dataset():
    if "data" not in _CACHE:
        from refit.data import load_dataset

        if QUICK:
            _CACHE["data"], _CACHE["name"] = load_dataset("synthetic"), "synthetic"
        else:
            path = shared_data()
            if path is None:
                pytest.skip("the ML-1M split is not in ../shared/data (or $REFIT_DATA)")
            _CACHE["data"], _CACHE["name"] = load_dataset(path), "ml-1m"
    return _CACHE["data"], _CACHE["name"]


def ease_textbook(train, l2):
    X = train.toarray().astype(np.float64)
    G = X.T @ X
    P = np.linalg.inv(G + l2 * np.eye(G.shape[0]))
    B = P / (-np.diag(P))
    np.fill_diagonal(B, 0.0)
    return B


def knn_textbook(train, k):
    X = torch.from_numpy(train.toarray())
    n = X.norm(dim=0)
    S = (X.T @ X) / (n[:, None] * n[None, :]).clamp(min=1e-12)
    S.fill_diagonal_(0.0)
    top = torch.topk(S, k, dim=0)
    W = torch.zeros_like(S).scatter_(0, top.indices, top.values)
    return W


@pytest.mark.parametrize("impl", ["refit", "textbook"])
@pytest.mark.parametrize("model", ["ease", "itemknn"])
def test_fit(benchmark, model, impl):
    from refit.baselines import EASE, ItemKNN

    data, name = dataset()
    if model == "ease":
        fn = (lambda: EASE(l2=1000.0).fit(data.train)) if impl == "refit" else (
            lambda: ease_textbook(data.train, 1000.0))
        group = f"EASE fit (l2 = 1000), {name} {data.n_users} x {data.n_items}"
    else:
        fn = (lambda: ItemKNN(k=100).fit(data.train)) if impl == "refit" else (lambda: knn_textbook(data.train, 100))
        group = f"ItemKNN fit (k = 100), {name} {data.n_users} x {data.n_items}"
    benchmark.group = group
    benchmark.pedantic(fn, rounds=3 if QUICK else 5, warmup_rounds=1)
    record(benchmark, group, impl, baseline="textbook")


@pytest.mark.parametrize("model", ["most-popular", "itemknn", "ease"])
def test_evaluate(benchmark, model):
    from refit.baselines import EASE, ItemKNN, MostPopular, evaluate_baseline

    data, name = dataset()
    fitted = {"most-popular": MostPopular, "itemknn": lambda: ItemKNN(k=100),
              "ease": lambda: EASE(l2=1000.0)}[model]().fit(data.train)
    group = f"baseline evaluation, test split, all users, {name}"
    benchmark.group = group
    benchmark.pedantic(lambda: evaluate_baseline(fitted, data, ("test",)), rounds=3 if QUICK else 5,
                       warmup_rounds=1)
    record(benchmark, group, model)
