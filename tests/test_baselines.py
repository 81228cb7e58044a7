"""Baselines: each model against a direct dense computation, the tuning, the cache and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refit.baselines import (
    EASE,
    BaselineResult,
    ItemKNN,
    MostPopular,
    best_baseline,
    cached_baselines,
    evaluate_baseline,
    fit_baselines,
)
from refit.data import InteractionData, load_dataset
from refit.evaluate import evaluate


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_users=300, n_items=120, seed=3)


def _dense(m):
    return np.asarray(m.toarray(), dtype=np.float64)


def _knn_dense(X, k, shrink=0.0):
    """ItemKNN written out: full cosine matrix, column i keeps its k largest entries (ties: lower row id)."""
    norms = np.sqrt((X * X).sum(0))
    S = X.T @ X / (np.outer(norms, norms) + shrink + 1e-300)
    S[np.outer(norms, norms) + shrink == 0] = 0.0
    np.fill_diagonal(S, 0.0)
    W = np.zeros_like(S)
    for i in range(S.shape[1]):
        order = sorted(range(S.shape[0]), key=lambda j: (-S[j, i], j))[:k]
        for j in order:
            if S[j, i] > 0:
                W[j, i] = S[j, i]
    return X @ W


def test_most_popular_ranks_by_training_count(data):
    m = MostPopular().fit(data.train)
    users = torch.tensor([0, 5, 299])
    s = m.scores(users)
    counts = _dense(data.train).sum(0)
    assert s.shape == (3, data.n_items) and s.dtype == torch.float32
    np.testing.assert_array_equal(s.numpy(), np.broadcast_to(counts, (3, data.n_items)))


@pytest.mark.parametrize("k", [1, 7, 119, 500])
def test_itemknn_matches_the_dense_definition(data, k):
    X = _dense(data.train)
    users = torch.arange(0, 300, 7)
    got = ItemKNN(k=k, block=50).fit(data.train).scores(users).numpy()
    np.testing.assert_allclose(got, _knn_dense(X, k)[users.numpy()], rtol=1e-5, atol=1e-6)


def test_itemknn_ties_items_without_interactions_and_shrink():
    # Items 0 and 1 are identical (ties), item 4 has no interactions (similarity 0, never a neighbour).
    X = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=np.float32)
    train = sp.csr_matrix(X)
    for k, shrink in ((1, 0.0), (2, 0.0), (2, 3.0), (4, 1.0)):
        m = ItemKNN(k=k, shrink=shrink).fit(train)
        np.testing.assert_allclose(m.scores(torch.arange(4)).numpy(), _knn_dense(X.astype(np.float64), k, shrink),
                                   rtol=1e-5, atol=1e-7)
        assert m.scores(torch.arange(4))[:, 4].abs().max() == 0


def test_itemknn_switches_k_without_refitting(data):
    m = ItemKNN(k=50).fit(data.train, k_max=100)
    for k in (5, 100, 50):
        m.set_k(k)
        direct = ItemKNN(k=k).fit(data.train)
        torch.testing.assert_close(m.scores(torch.arange(40)), direct.scores(torch.arange(40)))
    with pytest.raises(ValueError, match="exceeds"):
        ItemKNN(k=5).fit(data.train).set_k(10)


def _ease_dense(X, l2):
    G = X.T @ X
    P = np.linalg.inv(G + l2 * np.eye(G.shape[0]))
    B = np.eye(G.shape[0]) - P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return B


@pytest.mark.parametrize("l2", [0.5, 30.0, 1e4])
def test_ease_matches_the_closed_form_and_its_optimality(data, l2):
    X = _dense(data.train)
    m = EASE(l2=l2).fit(data.train)
    B = m.B.double().numpy()
    np.testing.assert_allclose(B, _ease_dense(X, l2), rtol=1e-4, atol=1e-6)
    assert np.all(np.diag(B) == 0)
    # Optimality of min ||X - XB||^2 + l2 ||B||^2 s.t. diag(B) = 0: the gradient is zero off the diagonal.
    G = X.T @ X
    grad = (G + l2 * np.eye(len(G))) @ B - G
    off = grad - np.diag(np.diag(grad))
    assert np.abs(off).max() <= 1e-3 * max(1.0, np.abs(G).max())
    users = torch.tensor([3, 4, 200])
    np.testing.assert_allclose(m.scores(users).numpy(), X[users.numpy()] @ B, rtol=1e-5, atol=1e-5)


def test_ease_refuses_item_counts_that_cannot_fit():
    train = sp.csr_matrix((np.ones(1), ([0], [0])), shape=(2, 5000))
    with pytest.raises(ValueError, match="GiB"):
        EASE(l2=1.0, max_bytes=100 << 20).fit(train)


def test_bad_arguments_are_named(data):
    with pytest.raises(ValueError, match="k must be"):
        ItemKNN(k=0)
    with pytest.raises(ValueError, match="shrink"):
        ItemKNN(shrink=-1)
    with pytest.raises(ValueError, match="l2"):
        EASE(l2=0)
    with pytest.raises(RuntimeError, match="fit"):
        MostPopular().scores(torch.tensor([0]))
    with pytest.raises(IndexError, match="users"):
        MostPopular().fit(data.train).scores(torch.tensor([300]))
    with pytest.raises(TypeError, match="scipy.sparse"):
        EASE().fit(np.ones((3, 3)))
    with pytest.raises(ValueError, match="unknown baselines"):
        fit_baselines(data, include=["svd"])
    with pytest.raises(ValueError, match="knn_grid"):
        fit_baselines(data, knn_grid=[0])


def test_evaluation_uses_the_shared_protocol(data):
    m = EASE(l2=20.0).fit(data.train)
    res = evaluate_baseline(m, data, ("valid", "test"), ks=(10, 20))
    direct = evaluate(m.scores, data.test, [data.train, data.valid], ks=(10, 20))
    assert res["test"] == direct
    direct_valid = evaluate(m.scores, data.valid, [data.train], ks=(10, 20))
    assert res["valid"] == direct_valid


def test_tuning_picks_the_best_validation_value(data):
    results = fit_baselines(data, ks=(10, 20), knn_grid=(2, 10, 40, 1000), ease_grid=(0.1, 50.0, 1e5))
    names = [r.name for r in results]
    assert names == ["most-popular", "itemknn", "ease"]
    knn, ease = results[1], results[2]
    # 1000 exceeds the 119 other items: capped, tried once.
    assert [g["k"] for g in knn.grid] == [2, 10, 40, 119]
    for r, cls, key in ((knn, ItemKNN, "k"), (ease, EASE, "l2")):
        values = [g["valid recall@20"] for g in r.grid]
        best = r.grid[int(np.argmax(values))][key]
        assert r.params[key] == best
        # Each grid value's recorded validation metric is that of a model fitted at that value alone.
        for g in r.grid:
            alone = cls(**{key: g[key]}).fit(data.train)
            assert evaluate_baseline(alone, data, ("valid",), ks=(20,))["valid"]["recall@20"] == \
                pytest.approx(g["valid recall@20"], abs=1e-12)
        assert r.fit_s > 0 and r.tune_s > 0 and r.eval_s > 0
    # On data with taste clusters, the personalised baselines beat popularity.
    assert knn.test["recall@20"] > results[0].test["recall@20"]
    assert ease.test["recall@20"] > results[0].test["recall@20"]
    assert best_baseline(results) is max(results, key=lambda r: r.valid["recall@20"])
    assert BaselineResult.from_dict(json.loads(json.dumps(ease.to_dict()))) == ease


def test_cache_is_reused_only_for_the_same_data(tmp_path, data):
    grids = dict(knn_grid=(5, 20), ease_grid=(10.0, 100.0), ks=(10, 20))
    first, path, cached = cached_baselines(data, str(tmp_path), **grids)
    assert not cached and os.path.exists(path)
    again, _, cached = cached_baselines(data, str(tmp_path), **grids)
    assert cached and [r.to_dict() for r in again] == [r.to_dict() for r in first]
    other = load_dataset("synthetic", n_users=300, n_items=120, seed=4)
    _, _, cached = cached_baselines(other, str(tmp_path), **grids)
    assert not cached
    _, _, cached = cached_baselines(other, str(tmp_path), **{**grids, "ease_grid": (10.0,)})
    assert not cached


def test_users_without_training_rows_get_scores():
    train = sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=np.float32))
    empty = sp.csr_matrix((3, 3), dtype=np.float32)
    data = InteractionData("t", 3, 3, train, empty, empty, np.arange(3), np.arange(3))
    for m in (MostPopular(), ItemKNN(k=2), EASE(l2=1.0)):
        s = m.fit(data.train).scores(torch.tensor([1]))
        assert s.shape == (1, 3) and torch.isfinite(s).all()


def _refit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "refit", "-q", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_baselines_and_evaluate_row(tmp_path):
    out = _refit("baselines", "--data", "synthetic", "--knn-grid", "5,20", "--ease-grid", "10,100", "--out", "b",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "most-popular" in out.stdout and "itemknn (k=" in out.stdout and "ease (l2=" in out.stdout
    assert "fit" in out.stdout and "recall@20" in out.stdout
    saved = json.load(open(tmp_path / "b" / "baselines.json"))
    assert [r["name"] for r in saved["results"]] == ["most-popular", "itemknn", "ease"]
    bad = _refit("baselines", "--data", "synthetic", "--ease-grid", "10,-1", cwd=tmp_path)
    assert bad.returncode == 2 and "positive numbers" in bad.stderr

    run = _refit("pretrain", "--data", "synthetic", "--steps", "5", "--epochs", "2", "--eval-every", "1",
                 "--batch-size", "200", "--dims", "32,64", "--out", "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    ev = _refit("evaluate", "--checkpoint", "run/best.pt", "--split", "test", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert "best baseline by valid recall@20" in ev.stdout and "written to" in ev.stdout
    assert os.path.exists(tmp_path / "run" / "baselines.json")
    ev2 = _refit("evaluate", "--checkpoint", "run/best.pt", "--split", "test", "--json", cwd=tmp_path)
    res = json.loads(ev2.stdout)
    cache = json.load(open(tmp_path / "run" / "baselines.json"))
    best = max(cache["results"], key=lambda r: r["valid"]["recall@20"])
    assert res["best_baseline"]["test"] == best["test"]
    assert _refit("evaluate", "--checkpoint", "run/best.pt", "--no-baselines", cwd=tmp_path).stdout.count(
        "baseline") == 0
