"""refit.evaluate: the fast path (topk_hits) against a per-user Python
implementation of DiffRec's evaluation protocol.

The Python version below is written the way DiffRec writes it
(``evaluate_utils.computeTopNAccuracy``): per user, per k, a loop over the
ranked list testing membership in the user's test items. It differs from
DiffRec's only in not rounding the averages to 4 decimals, and in the ranking
it is given: the full ranking of the contract (ties by lower id, history never
ranked) instead of torch.topk over -inf-masked scores.
"""

import math
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit_kernels as rk
from refit.evaluate import DEFAULT_KS, evaluate, metrics_from_hits, union_csr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_items(scores_row, banned, kmax):
    """The contract's ranking of one user: higher score first, ties by lower id, history never ranked."""
    items = [i for i in range(len(scores_row)) if i not in banned]
    return sorted(items, key=lambda i: (-scores_row[i], i))[:kmax]


def compute_top_n_accuracy(ground_truth, predicted, top_n, exclude_users_without_positives=False):
    """DiffRec's computeTopNAccuracy, written out per user (unrounded)."""
    precision, recall, ndcg, mrr = [], [], [], []
    n_users = len(predicted)
    if exclude_users_without_positives:
        n_users = sum(1 for gt in ground_truth if len(gt) != 0)
    for k in top_n:
        sum_precision = sum_recall = sum_ndcg = sum_mrr = 0.0
        for i in range(len(predicted)):
            if len(ground_truth[i]) == 0:
                continue
            mrr_flag = True
            user_hit = 0
            user_mrr = 0.0
            dcg = idcg = 0.0
            idcg_count = len(ground_truth[i])
            for j in range(k):
                if j < len(predicted[i]) and predicted[i][j] in ground_truth[i]:
                    dcg += 1.0 / math.log2(j + 2)
                    if mrr_flag:
                        user_mrr = 1.0 / (j + 1.0)
                        mrr_flag = False
                    user_hit += 1
                if idcg_count > 0:
                    idcg += 1.0 / math.log2(j + 2)
                    idcg_count -= 1
            sum_precision += user_hit / k
            sum_recall += user_hit / len(ground_truth[i])
            sum_ndcg += dcg / idcg if idcg != 0 else 0.0
            sum_mrr += user_mrr
        precision.append(sum_precision / n_users)
        recall.append(sum_recall / n_users)
        ndcg.append(sum_ndcg / n_users)
        mrr.append(sum_mrr / n_users)
    return precision, recall, ndcg, mrr


def python_evaluate(scores, positives, excludes, ks, users=None, exclude_users_without_positives=False):
    """The whole protocol in Python: rank every user, then computeTopNAccuracy."""
    scores = scores.double().numpy()
    n_users = positives.shape[0]
    users = list(range(n_users)) if users is None else [int(u) for u in users]
    if exclude_users_without_positives:
        users = [u for u in users if positives[u].nnz > 0]
    history = [set() for _ in range(n_users)]
    for m in excludes:
        for u in range(n_users):
            history[u].update(m[u].indices.tolist())
    predicted = [rank_items(scores[u], history[u], max(ks)) for u in users]
    ground_truth = [positives[u].indices.tolist() for u in users]
    p, r, n, m = compute_top_n_accuracy(ground_truth, predicted, ks, exclude_users_without_positives)
    out = {"n_users": len(users)}
    for j, k in enumerate(ks):
        out.update({f"precision@{k}": p[j], f"recall@{k}": r[j], f"ndcg@{k}": n[j], f"mrr@{k}": m[j]})
    return out


def make_data(n_users=60, n_items=45, seed=0, levels=5, continuous=False):
    """Scores with many ties, train/valid histories and test items; some users have no test items."""
    g = np.random.default_rng(seed)
    if continuous:
        scores = torch.from_numpy(g.standard_normal((n_users, n_items)).astype(np.float32))
    else:
        scores = torch.from_numpy(g.integers(0, levels, (n_users, n_items)).astype(np.float32))
        scores[torch.from_numpy(g.random((n_users, n_items)) < 0.05)] = -math.inf
    split = g.random((n_users, n_items))
    train = sp.csr_matrix((split < 0.25).astype(np.float32))
    valid = sp.csr_matrix(((split >= 0.25) & (split < 0.35)).astype(np.float32))
    test = (split >= 0.35) & (split < 0.45)
    test[g.random(n_users) < 0.2] = False  # users without test items
    test = sp.csr_matrix(test.astype(np.float32))
    return scores, train, valid, test


def assert_same_metrics(got, want, what=""):
    assert got["n_users"] == want["n_users"], what
    assert set(got) == set(want), what
    for name, value in want.items():
        if name == "n_users":
            continue
        # Hits are integers, so recall, precision and MRR agree up to the order of
        # the float64 sums; NDCG uses the kernel's float32 DCG (relative error < 2^-23).
        tol = 1e-6 if name.startswith("ndcg") else 1e-12
        assert math.isclose(got[name], value, rel_tol=tol, abs_tol=1e-12), f"{what} {name}: {got[name]} != {value}"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exclude_empty", [False, True])
def test_matches_the_per_user_protocol(backend, seed, exclude_empty):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    scores, train, valid, test = make_data(seed=seed, continuous=seed == 2)
    ks = (1, 5, 10, 45)
    got = evaluate(lambda u: scores[u], test, [train, valid], ks=ks, batch_size=7, backend=backend,
                   exclude_users_without_positives=exclude_empty)
    want = python_evaluate(scores, test, [train, valid], ks, exclude_users_without_positives=exclude_empty)
    assert_same_metrics(got, want, f"seed {seed}")
    assert got["n_users"] == (60 if not exclude_empty else sum(test[u].nnz > 0 for u in range(60)))


def test_default_ks_subset_of_users_and_single_exclude():
    scores, train, _, test = make_data(n_users=50, n_items=120, seed=3)
    users = np.array([3, 7, 8, 20, 21, 22, 40, 49])
    got = evaluate(lambda u: scores[u], test, train, users=users, batch_size=3)
    want = python_evaluate(scores, test, [train], DEFAULT_KS, users=users)
    assert_same_metrics(got, want)
    assert sorted(k for k in got if k.startswith("recall")) == sorted(f"recall@{k}" for k in DEFAULT_KS)


def test_triton_backend_agrees():
    if rk.available_backends()["triton"] is not None:
        pytest.skip(rk.available_backends()["triton"])
    scores, train, valid, test = make_data(n_users=6, n_items=20, seed=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = evaluate(lambda u: scores[u].to(device), test, [train, valid], ks=(2, 8), backend="triton")
    assert_same_metrics(got, python_evaluate(scores, test, [train, valid], (2, 8)))


def test_score_fn_sees_users_in_batches():
    scores, train, _, test = make_data(n_users=23, seed=5)
    seen = []

    def score_fn(u):
        seen.append(u.clone())
        return scores[u]

    evaluate(score_fn, test, train, ks=(3,), batch_size=10)
    assert [len(s) for s in seen] == [10, 10, 3]
    assert torch.equal(torch.cat(seen), torch.arange(23))


def test_no_exclusion_and_progress_bar(capsys):
    scores, _, _, test = make_data(n_users=12, seed=6)
    got = evaluate(lambda u: scores[u], test, None, ks=(4,), progress=True, batch_size=5)
    assert_same_metrics(got, python_evaluate(scores, test, [], (4,)))
    assert "evaluate" in capsys.readouterr().err


def test_non_canonical_scipy_inputs_are_accepted():
    """Duplicate and unsorted entries, as scipy builds them from (user, item) pairs, are summed and sorted."""
    scores, train, _, test = make_data(n_users=15, seed=7)
    rows, cols = test.nonzero()
    dup = sp.csr_matrix((np.ones(2 * len(rows)), (np.concatenate([rows, rows]), np.concatenate([cols, cols]))),
                        shape=test.shape)
    dup.has_sorted_indices = False
    got = evaluate(lambda u: scores[u], dup, train, ks=(5,))
    assert_same_metrics(got, python_evaluate(scores, test, [train], (5,)))


def test_checked_csr_objects_are_accepted():
    scores, train, valid, test = make_data(n_users=10, seed=9)
    merged = union_csr([train, valid], test.shape[1])
    got = evaluate(lambda u: scores[u], rk.as_csr(test, "test"), merged, ks=(3,))
    assert_same_metrics(got, python_evaluate(scores, test, [train, valid], (3,)))


def test_union_csr():
    a = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    b = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=np.float32))
    u = union_csr([a, b], 4)
    assert u.indptr.tolist() == [0, 3, 4, 5] and u.indices.tolist() == [0, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="rows"):
        union_csr([a, b[:2]], 4)


def test_metrics_from_hits_by_hand():
    """Two users: one with 3 positives and hits at ranks 1 and 4, one with none."""
    out = rk.TopKHits(hits=torch.tensor([[0, 2], [0, 0]]),
                      dcg=torch.tensor([[0.0, 1 / math.log2(3) + 1 / math.log2(6)], [0.0, 0.0]]),
                      neighbor_hits=torch.zeros(2, 2), first_hit=torch.tensor([1, -1]), indices=None)
    m = metrics_from_hits(out, torch.tensor([3, 0]), (1, 5))
    idcg5 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["precision@5"].tolist() == [2 / 5, 0.0] and m["recall@5"].tolist() == [2 / 3, 0.0]
    assert m["mrr@1"].tolist() == [0.0, 0.0] and m["mrr@5"].tolist() == [0.5, 0.0]
    assert math.isclose(m["ndcg@5"][0].item(), (1 / math.log2(3) + 1 / math.log2(6)) / idcg5, rel_tol=1e-6)


def test_bad_arguments():
    scores, train, _, test = make_data(n_users=5, seed=8)
    with pytest.raises(ValueError, match="score_fn must return"):
        evaluate(lambda u: scores[u][:, None], test, train)
    with pytest.raises(IndexError, match="users"):
        evaluate(lambda u: scores[u], test, train, users=[0, 9])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(lambda u: scores[u], test, train, batch_size=0)
    with pytest.raises(ValueError, match="columns"):
        evaluate(lambda u: scores[u][:, :-1], test, train)


def _ml1m_dir():
    base = os.environ.get("REFIT_DATA") or os.path.join(ROOT, "..", "shared", "data")
    path = os.path.join(base, "ml-1m_clean")
    return path if os.path.exists(os.path.join(path, "test_list.npy")) else None


@pytest.mark.skipif(_ml1m_dir() is None, reason="ML-1M not found in $REFIT_DATA or ../shared/data (ml-1m_clean)")
def test_ml1m_random_scores_subset():
    """DiffRec's ML-1M split: the kernel path equals the per-user protocol on 150 users."""
    path = _ml1m_dir()
    pairs = {name: np.load(os.path.join(path, f"{name}_list.npy")) for name in ("train", "valid", "test")}
    n_users = 1 + max(int(p[:, 0].max()) for p in pairs.values())
    n_items = 1 + max(int(p[:, 1].max()) for p in pairs.values())
    mats = {n: sp.csr_matrix((np.ones(len(p), np.float32), (p[:, 0], p[:, 1])), shape=(n_users, n_items))
            for n, p in pairs.items()}
    scores = torch.rand(n_users, n_items, generator=torch.Generator().manual_seed(0))
    users = np.random.default_rng(0).choice(n_users, 150, replace=False)
    got = evaluate(lambda u: scores[u], mats["test"], [mats["train"], mats["valid"]], users=users, batch_size=64)
    sub = {n: m for n, m in mats.items()}
    want = python_evaluate(scores, sub["test"], [sub["train"], sub["valid"]], DEFAULT_KS, users=users)
    assert_same_metrics(got, want, "ml-1m")


def test_evaluate_many_scores_once_and_equals_separate_evaluations():
    import numpy as np
    import scipy.sparse as sp

    from refit.evaluate import evaluate, evaluate_many

    rng = np.random.default_rng(3)
    n_users, n_items = 37, 60
    mats = [sp.csr_matrix((rng.random((n_users, n_items)) < p).astype(np.float32)) for p in (0.2, 0.05, 0.05)]
    train, valid, test = mats[0], mats[1] - mats[1].multiply(mats[0]), mats[2] - mats[2].multiply(mats[0])
    valid.eliminate_zeros()
    test.eliminate_zeros()
    table = torch.from_numpy(rng.standard_normal((n_users, n_items)).astype(np.float32))
    calls = []

    def score_fn(users):
        calls.append(users.clone())
        return table[users]

    both = evaluate_many(score_fn, {"valid": (valid, [train]), "test": (test, [train, valid])}, ks=(5, 10),
                         batch_size=16)
    assert len(calls) == 3 and torch.equal(torch.cat(calls), torch.arange(n_users))
    for name, (pos, ex) in {"valid": (valid, [train]), "test": (test, [train, valid])}.items():
        alone = evaluate(lambda u: table[u], pos, ex, ks=(5, 10), batch_size=16)
        assert both[name] == alone
    dropped = evaluate_many(lambda u: table[u], {"test": (test, [train])}, ks=(5,), exclude_users_without_positives=True)
    assert dropped["test"]["n_users"] == int((np.diff(test.indptr) > 0).sum())
