"""topk_hits: full-ranking evaluation of ML-1M and the ReFiT reward.

Data: DiffRec's ML-1M split (5,949 users x 2,810 items) from
``$REFIT_DATA/ml-1m_clean`` or ``../shared/data/ml-1m_clean``; skipped when
absent. Scores are random (uniform, seeded), computed once outside the timing.

Full evaluation (test protocol: train + valid masked, test items as
positives, ks 10/20/50/100, batches of 400 users as in DiffRec) with

* ``cpu``: ``refit.evaluate.evaluate`` on the cpu kernel;
* ``reference``: a vectorised PyTorch path per batch: mask the history with
  -inf, ``torch.topk``, gather hits from a dense test matrix, cumulative sums
  for hits and DCG, metrics from those (its "eager" row in the summary);
* ``reference-compiled``: ``torch.compile`` of that batch function;
* ``python-loop``: DiffRec's metric code: ``torch.topk`` per batch (history
  masked with -inf from the dense matrix), then the per-user, per-k Python
  loop of ``computeTopNAccuracy`` over precomputed ground-truth lists;
* ``diffrec-evaluate``: DiffRec's ``evaluate()`` as written: it also builds
  the ground-truth lists from the scipy test matrix and masks the history
  through ``his_data.nonzero()`` of the scipy batch on every call;
* ``exact-reference``: ``evaluate`` on ``refit_kernels.reference`` (full sort).

The dense history and test matrices of the PyTorch paths, the ground-truth
lists of ``python-loop`` and the merged exclusion CSR of the kernel are all
built once, outside the timing.

The floor of the evaluation is the bytes that must be read once (the scores,
and the int64 column indices of the exclusions and positives) over this
machine's copy bandwidth, measured in the same run.

Reward (ReFiT's N_K and N_sim-K at K = 20): B users (64 and 400) with 20 % of
their training items hidden as positives and the rest excluded, and their 10
most cosine-similar users (by training items) as neighbors whose training
items are the neighbor sets: ``cpu`` (``rk.topk_hits``), the vectorised
PyTorch path (mask, ``torch.topk``, gather from dense positives and neighbor
rows) eager and compiled, and the exact reference.

    flock /tmp/refit-bench.lock pytest benchmarks/suites/bench_topk_hits.py --benchmark-only
"""

import math
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit_kernels as rk
from refit.evaluate import evaluate, union_csr

from benchmarks.paths import shared_data
from benchmarks.suites._bench import QUICK, record

KS = (10, 20, 50, 100)
BATCH = 400
REWARD_K = 20
N_NEIGHBORS = 10
REWARD_BATCHES = (64, 400)


_CACHE = {}


def ml1m():
    """Train / valid / test CSR matrices (canonical), and random scores; cached."""
    if "data" not in _CACHE:
        path = shared_data("ml-1m_clean", marker="test_list.npy")
        if path is None:
            pytest.skip("ML-1M not found in $REFIT_DATA or ../shared/data (ml-1m_clean)")
        pairs = {n: np.load(os.path.join(path, f"{n}_list.npy")) for n in ("train", "valid", "test")}
        n_users = 1 + max(int(p[:, 0].max()) for p in pairs.values())
        n_items = 1 + max(int(p[:, 1].max()) for p in pairs.values())
        mats = {}
        for name, p in pairs.items():
            m = sp.csr_matrix((np.ones(len(p), np.float32), (p[:, 0], p[:, 1])), shape=(n_users, n_items))
            m.sum_duplicates()
            mats[name] = m
        if QUICK:
            mats = {n: m[:300] for n, m in mats.items()}
            n_users = 300
        scores = torch.rand(n_users, n_items, generator=torch.Generator().manual_seed(0))
        _CACHE["data"] = (mats, scores)
    return _CACHE["data"]


# --- full evaluation ------------------------------------------------------------------------

def _torch_batch_metrics(scores, history, test, n_pos, disc, idcg):
    """Sums over a batch of Recall, NDCG, Precision, MRR at every k: the vectorised PyTorch path."""
    kmax = KS[-1]
    masked = scores.masked_fill(history, -math.inf)
    top = torch.topk(masked, kmax, dim=1).indices
    hit = test.gather(1, top).to(torch.float32)
    hits = hit.cumsum(1)
    dcg = (hit * disc).cumsum(1)
    first = torch.where(hit.any(1), hit.argmax(1), kmax)
    has = n_pos > 0
    npos = n_pos.clamp(min=1).to(torch.float32)
    sums = []
    for k in KS:
        h = hits[:, k - 1]
        ideal = idcg[n_pos.clamp(max=k)]
        sums += [torch.where(has, h / npos, 0.0).sum(), torch.where(has, dcg[:, k - 1] / ideal.clamp(min=1e-9), 0.0).sum(),
                 torch.where(has, h / k, 0.0).sum(), torch.where(has & (first < k), 1.0 / (first + 1.0), 0.0).sum()]
    return torch.stack(sums)


def _compute_top_n_accuracy(ground_truth, predicted, top_n):
    """DiffRec's evaluate_utils.computeTopNAccuracy (per user, per k, Python)."""
    out = []
    for k in top_n:
        s_p = s_r = s_n = s_m = 0.0
        for i in range(len(predicted)):
            if len(ground_truth[i]) != 0:
                mrr_flag, user_hit, user_mrr, dcg, idcg, idcg_count = True, 0, 0.0, 0.0, 0.0, len(ground_truth[i])
                for j in range(k):
                    if predicted[i][j] in ground_truth[i]:
                        dcg += 1.0 / math.log2(j + 2)
                        if mrr_flag:
                            user_mrr = 1.0 / (j + 1.0)
                            mrr_flag = False
                        user_hit += 1
                    if idcg_count > 0:
                        idcg += 1.0 / math.log2(j + 2)
                        idcg_count -= 1
                s_p += user_hit / k
                s_r += user_hit / len(ground_truth[i])
                s_n += dcg / idcg if idcg != 0 else 0.0
                s_m += user_mrr
        n = len(predicted)
        out.append((s_r / n, s_n / n, s_p / n, s_m / n))
    return out


def _eval_impls():
    mats, scores = ml1m()
    n_users, n_items = scores.shape
    exclude = union_csr([mats["train"], mats["valid"]], n_items)
    history = torch.from_numpy((mats["train"] + mats["valid"]).toarray() > 0)
    test_dense = torch.from_numpy(mats["test"].toarray() > 0)
    n_pos = torch.from_numpy(np.diff(mats["test"].indptr)).to(torch.int64)
    kmax = KS[-1]
    disc = 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float32) + 2.0)
    idcg = torch.cat([torch.zeros(1), torch.cumsum(disc, 0)])
    ground_truth = [mats["test"][u].indices.tolist() for u in range(n_users)]
    score_fn = lambda u: scores[int(u[0]):int(u[-1]) + 1]  # noqa: E731 - batches are contiguous ranges

    def torch_path(batch_fn):
        def run():
            total = torch.zeros(4 * len(KS), dtype=torch.float64)
            for s in range(0, n_users, BATCH):
                e = min(n_users, s + BATCH)
                total += batch_fn(scores[s:e], history[s:e], test_dense[s:e], n_pos[s:e], disc, idcg).double()
            return total / n_users
        return run

    def python_loop():
        predicted = []
        for s in range(0, n_users, BATCH):
            e = min(n_users, s + BATCH)
            masked = scores[s:e].masked_fill(history[s:e], -math.inf)
            predicted.extend(torch.topk(masked, kmax, dim=1).indices.tolist())
        return _compute_top_n_accuracy(ground_truth, predicted, KS)

    mask_his = (mats["train"] + mats["valid"]).tocsr()

    def diffrec_evaluate():
        # DiffRec's main.py evaluate(), as written, on precomputed predictions.
        target_items = [mats["test"][i, :].nonzero()[1].tolist() for i in range(n_users)]
        predict_items = []
        for s in range(0, n_users, BATCH):
            his_data = mask_his[s:s + BATCH]
            prediction = scores[s:s + BATCH].clone()
            prediction[his_data.nonzero()] = -np.inf
            _, indices = torch.topk(prediction, kmax)
            predict_items.extend(indices.cpu().numpy().tolist())
        return _compute_top_n_accuracy(target_items, predict_items, KS)

    def kernel(backend):
        return lambda: evaluate(score_fn, mats["test"], exclude, ks=KS, batch_size=BATCH, backend=backend)

    return {
        "cpu": kernel("cpu"),
        "reference": torch_path(_torch_batch_metrics),
        "reference-compiled": torch_path(torch.compile(_torch_batch_metrics, dynamic=False)),
        "python-loop": python_loop,
        "diffrec-evaluate": diffrec_evaluate,
        "exact-reference": kernel("reference"),
    }


_EVAL_IMPLS = {}


@pytest.mark.parametrize("impl", ["cpu", "reference", "reference-compiled", "python-loop", "diffrec-evaluate",
                                  "exact-reference"])
def test_full_evaluation_ml1m(benchmark, copy_bandwidth, impl):
    if rk.available_backends()["cpu"] is not None and impl == "cpu":
        pytest.skip(rk.available_backends()["cpu"])
    if not _EVAL_IMPLS:
        _EVAL_IMPLS.update(_eval_impls())
    fn = _EVAL_IMPLS[impl]
    _, scores = ml1m()
    group = f"topk_hits full evaluation ML-1M {tuple(scores.shape)} ks {KS} batch {BATCH} cpu"
    benchmark.group = group
    fn()  # compile / warm up outside the timing
    slow = impl in ("python-loop", "diffrec-evaluate", "exact-reference")
    benchmark.pedantic(fn, rounds=(2 if QUICK else 3) if slow else (3 if QUICK else 11), warmup_rounds=0)
    # Floor: what any implementation must read once: the scores, and the
    # column indices of the exclusions and the positives (int64).
    mats, _ = ml1m()
    n_bytes = scores.numel() * 4 + 8 * (mats["train"].nnz + mats["valid"].nnz + mats["test"].nnz)
    record(benchmark, group, impl, floor_s=n_bytes / copy_bandwidth,
           note=f"floor: {n_bytes / 1e6:.0f} MB read at {copy_bandwidth / 1e9:.1f} GB/s")


def test_evaluation_agrees_with_the_python_loop():
    """The benchmark compares like with like: the kernel's metrics are DiffRec's (random scores have no ties)."""
    if not _EVAL_IMPLS:
        _EVAL_IMPLS.update(_eval_impls())
    got = _EVAL_IMPLS["cpu"]()
    want = _EVAL_IMPLS["python-loop"]()
    for j, k in enumerate(KS):
        for m, name in enumerate(("recall", "ndcg", "precision", "mrr")):
            assert math.isclose(got[f"{name}@{k}"], want[j][m], rel_tol=1e-5), (name, k)


# --- the ReFiT reward --------------------------------------------------------------------------

def _reward_inputs(B):
    key = ("reward", B)
    if key not in _CACHE:
        mats, scores = ml1m()
        n_users, n_items = scores.shape
        g = np.random.default_rng(B)
        users = np.sort(g.choice(n_users, size=min(B, n_users), replace=False))
        train = mats["train"]
        # Hide 20 % of each user's training items: those are the positives, the rest is excluded.
        hidden = train.copy()
        hidden.data = (g.random(hidden.nnz) < 0.2).astype(np.float32)
        hidden.eliminate_zeros()
        visible = train - hidden
        visible.eliminate_zeros()
        # The 10 most cosine-similar users by training items (not the user itself).
        norm = sp.diags(1.0 / np.sqrt(np.maximum(train.getnnz(axis=1), 1)))
        unit = (norm @ train).tocsr()
        sim = (unit[users] @ unit.T).toarray()
        sim[np.arange(len(users)), users] = -np.inf
        nbrs = np.argsort(-sim, axis=1, kind="stable")[:, :N_NEIGHBORS]
        batch_scores = scores[torch.from_numpy(users)].clone()
        _CACHE[key] = dict(
            scores=batch_scores, users=torch.from_numpy(users), neighbors=torch.from_numpy(nbrs),
            exclude=rk.as_csr(visible, "exclude"), positives=rk.as_csr(hidden, "positives"),
            neighbor_sets=rk.as_csr(train, "neighbor_sets"),
            dense=dict(visible=torch.from_numpy(visible.toarray() > 0), hidden=torch.from_numpy(hidden.toarray() > 0),
                       train=torch.from_numpy(train.toarray() > 0)),
        )
    return _CACHE[key]


def _torch_reward(scores, visible, hidden, train, users, nbrs):
    """The vectorised PyTorch reward: mask, torch.topk, gather hits from dense rows."""
    top = torch.topk(scores.masked_fill(visible[users], -math.inf), REWARD_K, dim=1).indices
    n_k = hidden[users].gather(1, top).sum(1)
    n_sim = train[nbrs[:, :, None], top[:, None, :]].sum((1, 2)) / nbrs.shape[1]
    return 0.5 * n_k / REWARD_K + 0.5 * n_sim / REWARD_K


def _reward_impls(B):
    x = _reward_inputs(B)
    csr = lambda c: (c.indptr, c.indices)  # noqa: E731

    def kernel(backend):
        def run():
            out = rk.topk_hits(x["scores"], REWARD_K, users=x["users"], exclude=csr(x["exclude"]),
                               positives=csr(x["positives"]), neighbors=x["neighbors"],
                               neighbor_sets=csr(x["neighbor_sets"]), backend=backend)
            return 0.5 * out.hits[:, 0] / REWARD_K + 0.5 * out.neighbor_hits[:, 0] / REWARD_K
        return run

    d = x["dense"]
    compiled = torch.compile(_torch_reward, dynamic=False)
    return {
        "cpu": kernel("cpu"),
        "reference": lambda: _torch_reward(x["scores"], d["visible"], d["hidden"], d["train"], x["users"], x["neighbors"]),
        "reference-compiled": lambda: compiled(x["scores"], d["visible"], d["hidden"], d["train"], x["users"],
                                               x["neighbors"]),
        "exact-reference": kernel("reference"),
    }


@pytest.mark.parametrize("B", REWARD_BATCHES)
@pytest.mark.parametrize("impl", ["cpu", "reference", "reference-compiled", "exact-reference"])
def test_reward(benchmark, B, impl):
    if rk.available_backends()["cpu"] is not None and impl == "cpu":
        pytest.skip(rk.available_backends()["cpu"])
    fn = _reward_impls(B)[impl]
    fn()
    group = f"topk_hits reward B={B} I=2810 M={N_NEIGHBORS} K={REWARD_K} cpu"
    benchmark.group = group
    benchmark.pedantic(fn, rounds=5 if QUICK else 51, warmup_rounds=2)
    record(benchmark, group, impl)


def test_reward_paths_agree():
    for B in REWARD_BATCHES:
        impls = _reward_impls(B)
        torch.testing.assert_close(impls["cpu"](), impls["reference"]().to(torch.float32))
