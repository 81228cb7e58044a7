"""refit.similarity: top_similar_users against exact dense computations; neighbor_profiles."""

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from _testing import shared_dataset
from refit.similarity import neighbor_profiles, top_similar_users


def random_binary(n_users, n_items, density, seed, empty_users=()):
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < density).astype(np.float32)
    dense[list(empty_users)] = 0
    return sp.csr_matrix(dense)


def exact_neighbors(dense: np.ndarray, m: int):
    """Dense, exact: rank v for u by sign(dot) * dot^2 / |x_v|^2 as a Fraction; ties to the lower id."""
    dense = np.asarray(dense)
    n = dense.shape[0]
    ints = dense.astype(np.int64)
    assert np.array_equal(ints, dense), "exact reference needs integer entries"
    dots = ints @ ints.T
    sq = (ints * ints).sum(1)
    out = np.full((n, m), -1, dtype=np.int64)
    for u in range(n):
        cands = [v for v in range(n) if v != u and sq[u] > 0 and sq[v] > 0 and dots[u, v] > 0]
        cands.sort(key=lambda v: (-Fraction(int(dots[u, v]) ** 2, int(sq[v])), v))
        out[u, : min(m, len(cands))] = cands[:m]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", [None, 1, 7])
def test_exact_against_dense_on_binary_data(seed, block_size):
    A = random_binary(60, 25, 0.15, seed, empty_users=(3, 40))
    got = top_similar_users(A, m=10, block_size=block_size)
    want = exact_neighbors(A.toarray(), 10)
    assert got.dtype == torch.int64 and got.shape == (60, 10)
    np.testing.assert_array_equal(got.numpy(), want)
    assert (got[3] == -1).all() and (got[40] == -1).all()


def test_ties_go_to_the_lower_id():
    # User 0 overlaps users 1..6 in exactly one item each, every one with 2 items: all tie.
    rows = [[0, 1, 2, 3, 4, 5]] + [[k - 1, 10 + k] for k in range(1, 7)] + [[20]]
    dense = np.zeros((8, 30), dtype=np.float32)
    for u, items in enumerate(rows):
        dense[u, items] = 1
    got = top_similar_users(sp.csr_matrix(dense), m=4)
    assert got[0].tolist() == [1, 2, 3, 4]
    # A tie in the similarity value across different overlaps: 1/sqrt(2*2) == 2/sqrt(2*8).
    dense = np.zeros((3, 12), dtype=np.float32)
    dense[0, [0, 1]] = 1
    dense[1, [0, 5]] = 1                          # dot 1, |x|^2 2: cos = 1/2
    dense[2, [0, 1, 6, 7, 8, 9, 10, 11]] = 1      # dot 2, |x|^2 8: cos = 2/4 = 1/2
    got, sim = top_similar_users(sp.csr_matrix(dense), m=2, return_similarity=True)
    assert got[0].tolist() == [1, 2]
    assert sim[0].tolist() == [0.5, 0.5]
    dense[[1, 2]] = dense[[2, 1]]  # swap the two users: still the lower id first
    assert top_similar_users(sp.csr_matrix(dense), m=2)[0].tolist() == [1, 2]


def test_padding_when_fewer_users_qualify():
    dense = np.zeros((5, 6), dtype=np.float32)
    dense[0, [0, 1]] = 1
    dense[1, [1]] = 1
    dense[2, [4]] = 1     # shares nothing with 0 or 1
    # user 3 and 4: no interactions
    got = top_similar_users(sp.csr_matrix(dense), m=3)
    assert got.tolist() == [[1, -1, -1], [0, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]
    # m larger than the number of users
    assert top_similar_users(sp.csr_matrix(dense), m=8).shape == (5, 8)


def test_weighted_rows_against_dense_float64():
    """Valued rows (integers, so every product and sum is exact): same as the exact dense ranking."""
    rng = np.random.default_rng(5)
    dense = (rng.random((40, 20)) < 0.3) * rng.integers(1, 6, size=(40, 20))
    dense[7] = 0
    got, sim = top_similar_users(sp.csr_matrix(dense.astype(np.float32)), m=6, return_similarity=True)
    np.testing.assert_array_equal(got.numpy(), exact_neighbors(dense, 6))
    norms = np.sqrt((dense.astype(np.float64) ** 2).sum(1))
    cos = (dense @ dense.T) / np.maximum(np.outer(norms, norms), 1e-300)
    want_sim = np.where(got.numpy() >= 0, cos[np.arange(40)[:, None], got.clamp(min=0).numpy()], 0.0)
    np.testing.assert_allclose(sim.numpy(), want_sim, rtol=1e-12, atol=0)


def test_matrix_forms_and_bad_arguments():
    A = random_binary(20, 10, 0.3, 9)
    want = top_similar_users(A, m=3)
    t = torch.sparse_csr_tensor(torch.from_numpy(A.indptr).long(), torch.from_numpy(A.indices).long(),
                                torch.from_numpy(A.data), size=A.shape)
    assert torch.equal(top_similar_users(t, m=3), want)
    with pytest.raises(ValueError, match="m must be"):
        top_similar_users(A, m=0)
    with pytest.raises(ValueError, match="block_size"):
        top_similar_users(A, m=2, block_size=0)
    with pytest.raises(ValueError, match="column count"):
        top_similar_users((torch.from_numpy(A.indptr), torch.from_numpy(A.indices)), m=2)


def test_neighbor_profiles():
    A = random_binary(30, 12, 0.3, 11)
    nb = top_similar_users(A, m=4)
    nb[2, 2:] = -1  # fewer neighbors
    nb[5] = -1      # none
    dense = torch.from_numpy(A.toarray()).double()
    prof = neighbor_profiles(A, nb)
    for u in range(30):
        valid = nb[u][nb[u] >= 0]
        want = dense[valid].mean(0) if len(valid) else torch.zeros(12, dtype=torch.float64)
        torch.testing.assert_close(prof[u].double(), want, rtol=1e-6, atol=1e-7)
    w = torch.rand(nb.shape, generator=torch.Generator().manual_seed(0))
    summed = neighbor_profiles(A, nb, weights=w, mean=False)
    for u in (0, 2, 5):
        valid = nb[u] >= 0
        want = (w[u][valid, None].double() * dense[nb[u][valid]]).sum(0)
        torch.testing.assert_close(summed[u].double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(shared_dataset() is None, reason="the ML-1M split is not in ../shared/data (or $REFIT_DATA)")
def test_ml1m_blocks_agree_and_stay_small():
    from refit.data import load_dataset

    data = load_dataset(shared_dataset())
    A = data.train
    users = np.arange(0, data.n_users, 97)
    got = top_similar_users(A, m=10)
    assert got.shape == (data.n_users, 10) and bool((got >= 0).all())  # every ML-1M user has 10 neighbors
    # Exact check of a sample of rows against a dense computation of their similarities.
    dense = torch.from_numpy(A.toarray()).double()
    dots = dense[users] @ dense.T
    sq = dense.sum(1)
    key = dots * dots / sq
    key[torch.arange(len(users)), torch.from_numpy(users)] = -math.inf
    for row, u in enumerate(users):
        k = key[row].tolist()
        order = sorted(range(data.n_users), key=lambda v: (-k[v], v))[:10]
        assert got[u].tolist() == order, f"user {u}"


def test_overlap_measure_ranks_by_shared_items():
    import numpy as np
    import scipy.sparse as sp

    from refit.similarity import top_similar_users

    rng = np.random.default_rng(5)
    dense = (rng.random((30, 25)) < 0.3).astype(np.float32)
    dense[7] = 0  # a user without interactions
    ids, sims = top_similar_users(sp.csr_matrix(dense), m=4, measure="overlap", return_similarity=True)
    overlap = dense @ dense.T
    for u in range(30):
        cand = [(-overlap[u, v], v) for v in range(30) if v != u and overlap[u, v] > 0 and dense[u].any() and dense[v].any()]
        want = [v for _, v in sorted(cand)[:4]]
        want += [-1] * (4 - len(want))
        assert ids[u].tolist() == want, u
        assert sims[u, : len(cand[:4])].tolist() == [overlap[u, v] for v in want if v >= 0]
