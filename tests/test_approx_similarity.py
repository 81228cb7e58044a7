"""refit.similarity.approximate_similar_users and similar_users: the approximate similar-user table."""

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit.similarity as sim
from refit.data import load_dataset
from refit.similarity import approximate_similar_users, similar_users, top_similar_users

pytest.importorskip("pynndescent")


def random_binary(n_users, n_items, density, seed, empty_users=()):
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < density).astype(np.float32)
    dense[list(empty_users)] = 0
    return sp.csr_matrix(dense)


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hit = total = 0
    for a, e in zip(approx.tolist(), exact.tolist()):
        e = [v for v in e if v >= 0]
        total += len(e)
        hit += len(set(e) & set(a))
    return hit / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_candidate_gives_the_exact_table(seed):
    # width >= n - 1: every user is a candidate, so exact scoring must give exactly the exact table.
    A = random_binary(60, 25, 0.15, seed, empty_users=(3, 40))
    got, got_sim = approximate_similar_users(A, m=10, width=59, seed=seed, return_similarity=True)
    want, want_sim = top_similar_users(A, m=10, return_similarity=True)
    assert got.dtype == torch.int64 and got.shape == (60, 10) and got_sim.dtype == torch.float64
    assert torch.equal(got, want)
    torch.testing.assert_close(got_sim, want_sim, rtol=1e-12, atol=1e-12)
    assert (got[3] == -1).all() and (got[40] == -1).all() and (got_sim[3] == 0).all()


def test_weighted_rows_with_every_candidate_give_the_exact_table():
    rng = np.random.default_rng(5)
    A = random_binary(50, 30, 0.2, 5)
    A.data = rng.integers(1, 6, size=A.nnz).astype(np.float64)  # ratings as values
    got, got_sim = approximate_similar_users(A, m=6, width=49, return_similarity=True)
    want, want_sim = top_similar_users(A, m=6, return_similarity=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_sim, want_sim, rtol=1e-12, atol=1e-12)


def test_padding_self_and_order_on_a_hand_case():
    # User 0 shares items with users 1 and 2 only; user 3 shares nothing; user 4 has no items.
    dense = np.zeros((5, 8), dtype=np.float32)
    dense[0, [0, 1, 2]] = 1
    dense[1, [0, 1]] = 1     # cos(0, 1) = 2 / sqrt(6)
    dense[2, [2, 7]] = 1     # cos(0, 2) = 1 / sqrt(6)
    dense[3, [5, 6]] = 1
    got, s = approximate_similar_users(sp.csr_matrix(dense), m=3, width=3, return_similarity=True)
    assert got[0].tolist() == [1, 2, -1]
    torch.testing.assert_close(s[0], torch.tensor([2 / math.sqrt(6), 1 / math.sqrt(6), 0.0], dtype=torch.float64))
    assert got[3].tolist() == [-1, -1, -1] and got[4].tolist() == [-1, -1, -1]
    assert all(u not in got[u].tolist() for u in range(5))


def test_returned_neighbours_are_in_exact_order_with_positive_similarity():
    A = load_dataset("synthetic", n_users=400, n_items=120).train
    got, s = approximate_similar_users(A, m=10, width=15, seed=3, return_similarity=True)
    valid = got >= 0
    assert (s[valid] > 0).all() and (s[~valid] == 0).all()
    # Within a row the similarities do not increase, and padding only trails.
    assert (s[:, 1:] <= s[:, :-1] + 1e-12).all()
    assert not (~valid[:, :-1] & valid[:, 1:]).any()


def test_recall_against_the_exact_table_on_synthetic_data():
    # Fixed data and seed, one thread: a deterministic result. Measured: recall 0.951 at width 10 and
    # 0.9986 at width 30; random candidates would give about width / 1500.
    A = load_dataset("synthetic", n_users=1500, n_items=300, seed=2).train
    exact = top_similar_users(A, m=10)
    assert recall(approximate_similar_users(A, m=10, width=10, seed=0), exact) >= 0.9
    got = approximate_similar_users(A, m=10, width=30, seed=0)
    assert recall(got, exact) >= 0.99
    assert torch.equal(got, approximate_similar_users(A, m=10, width=30, seed=0))


def test_candidates_per_step_reach_the_descent_and_raise_recall():
    # The same data as above at width 10, where the default descent tries at most 11 candidates per
    # step: 40 of them find more of the exact table (measured: 0.951 -> 0.975; 20 gave 0.970).
    A = load_dataset("synthetic", n_users=1500, n_items=300, seed=2).train
    exact = top_similar_users(A, m=10)
    base = approximate_similar_users(A, m=10, width=10, seed=0)
    more = approximate_similar_users(A, m=10, width=10, candidates_per_step=40, seed=0)
    assert recall(more, exact) > recall(base, exact)
    assert torch.equal(more, approximate_similar_users(A, m=10, width=10, candidates_per_step=40, seed=0))


def test_the_default_candidates_per_step_grow_with_the_users(monkeypatch):
    assert sim.default_candidates_per_step(sim.MORE_CANDIDATES_ABOVE_USERS) is None
    assert sim.default_candidates_per_step(sim.MORE_CANDIDATES_ABOVE_USERS + 1) == sim.CANDIDATES_PER_STEP_LARGE
    # Without an explicit setting the table takes the default for its users: made to give 40 at
    # the test's 1,500 users, it is the table that 40 per step gives, not pynndescent's default's.
    A = load_dataset("synthetic", n_users=1500, n_items=300, seed=2).train
    asked = []
    monkeypatch.setattr(sim, "default_candidates_per_step", lambda n: asked.append(n) or 40)
    got = approximate_similar_users(A, m=10, width=10, seed=0)
    assert asked == [int((A.getnnz(axis=1) > 0).sum())]
    assert torch.equal(got, approximate_similar_users(A, m=10, width=10, candidates_per_step=40, seed=0))
    monkeypatch.undo()
    assert not torch.equal(got, approximate_similar_users(A, m=10, width=10, seed=0))


@pytest.mark.parametrize("kwargs, match", [
    ({"m": 0}, "m must be an int >= 1"),
    ({"m": 5, "width": 4}, "width must be >= m=5"),
    ({"width": True}, "width must be an int"),
    ({"n_jobs": 0}, "n_jobs must be an int >= 1"),
    ({"measure": "overlap"}, "cosine only"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"candidates_per_step": 0}, "candidates_per_step must be None or an int >= 1"),
    ({"candidates_per_step": 2.0}, "candidates_per_step must be None or an int >= 1"),
])
def test_refusals(kwargs, match):
    A = random_binary(20, 10, 0.3, 0)
    with pytest.raises(ValueError, match=match):
        approximate_similar_users(A, **kwargs)


def test_missing_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynndescent", None)  # import fails
    A = random_binary(20, 10, 0.3, 0)
    with pytest.raises(ImportError, match=r"refit-kernels\[ann\]"):
        approximate_similar_users(A, m=3)
    with pytest.raises(ImportError, match="pynndescent"):
        similar_users(A, m=3, method="approximate")
    assert not sim.approximate_available()
    # auto above the threshold without it: the exact table, with a warning that says why.
    monkeypatch.setattr(sim, "APPROXIMATE_ABOVE_USERS", 10)
    with pytest.warns(RuntimeWarning, match="computing it exactly"):
        got = similar_users(A, m=3)
    assert torch.equal(got, top_similar_users(A, m=3))


def test_similar_users_dispatch(monkeypatch):
    A = random_binary(40, 12, 0.3, 1)
    calls = []
    real = sim.approximate_similar_users
    monkeypatch.setattr(sim, "approximate_similar_users", lambda *a, **k: calls.append(k) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(similar_users(A, m=4), top_similar_users(A, m=4))  # 40 users: exact
    assert calls == []
    monkeypatch.setattr(sim, "APPROXIMATE_ABOVE_USERS", 39)
    similar_users(A, m=4, width=6, candidates_per_step=9, block_size=3)  # block_size is the exact path's: not passed on
    assert calls and calls[0]["width"] == 6 and calls[0]["candidates_per_step"] == 9 and "block_size" not in calls[0]
    with pytest.raises(ValueError, match="method must be"):
        similar_users(A, m=4, method="fast")
    with pytest.raises(TypeError, match="unknown option"):
        similar_users(A, m=4, widht=6)
    with pytest.raises(ValueError, match="user_range is for the exact path"):
        similar_users(A, m=4, method="approximate", user_range=(0, 5))


def test_finetune_config_refuses_an_unknown_method():
    from refit.posttrain.config import FinetuneConfig

    with pytest.raises(ValueError, match="similar_users_method"):
        FinetuneConfig(similar_users_method="fast")


def test_refit_takes_a_precomputed_table():
    from refit.diffusion import GaussianDiffusion
    from refit.families.diffrec.denoisers import build_model
    from refit.families.diffrec.pretrain import PretrainConfig
    from refit.families.diffrec.recommender import RowRecommender
    from refit.posttrain.config import FinetuneConfig
    from refit.posttrain.trainer import ReFiT

    data = load_dataset("synthetic", n_users=120, n_items=60)
    cfg = PretrainConfig(dims=(16,))
    torch.manual_seed(0)
    policy = RowRecommender("diffrec", build_model("diffrec", cfg.model_config(data.n_items)),
                         GaussianDiffusion(cfg.diffusion_config()))
    config = FinetuneConfig(checkpoint="", batch_size=8, similar_users=5, seed=0)
    computed = ReFiT(policy, data, config).neighbors
    table = approximate_similar_users(data.train, m=5, width=8)
    assert torch.equal(ReFiT(policy, data, config, neighbors=table).neighbors, table)
    assert computed.shape == table.shape
    with pytest.raises(ValueError, match=r"neighbors must be an int64 tensor of shape \(120, 5\)"):
        ReFiT(policy, data, config, neighbors=table[:, :4])
    with pytest.raises(ValueError, match="neighbors: ids must be"):
        ReFiT(policy, data, config, neighbors=torch.full((120, 5), 120, dtype=torch.int64))


def test_leaves_torchs_thread_count_as_it_was():
    """numba's OpenMP layer may load the libgomp torch uses, and its first start set that library's thread
    count to the core count: every later torch op then ran on all cores whatever the caller had chosen.
    Only a process's first graph showed it, hence a fresh one."""
    code = ("import torch, numpy as np, scipy.sparse as sp\n"
            "from refit.similarity import approximate_similar_users\n"
            "torch.set_num_threads(1)\n"
            "A = sp.csr_matrix((np.random.default_rng(0).random((300, 80)) < 0.1).astype(np.float32))\n"
            "approximate_similar_users(A, m=5, width=10)\n"
            "print(torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env["NUMBA_NUM_THREADS"] = "2"  # what numba takes on a 2-core machine, also on larger ones
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "1"
