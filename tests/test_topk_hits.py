"""topk_hits: every backend against the reference, the reference against a
per-row Python ranking, and clear errors for bad input from every backend.

Cases are heavy with what makes ranking hard: scores drawn from a few levels
(many ties, +0.0 and -0.0 among them), -inf scores, rows with everything or
nearly everything excluded, empty positive sets, empty neighbor sets, rows
whose neighbors are all padding, and k = I. Integer outputs (hits, first_hit,
indices) must equal the reference exactly; float outputs (dcg, neighbor_hits)
are float32 roundings of the float64 truth, so they must be within one
float32 epsilon of it, relatively.
"""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit_kernels as rk
from refit_kernels import reference
from refit_kernels.sparse import as_csr

from _testing import stable_seed, GPU, backend_params, describe_mismatch

F32_EPS = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --- cases ------------------------------------------------------------------------

def random_csr(g, n_rows, n_cols, density):
    """scipy CSR (n_rows, n_cols) with sorted unique indices, each entry present with `density`."""
    return sp.csr_matrix((g.random((n_rows, n_cols)) < density).astype(np.float32))


def make_case(B, I, *, M=3, n_sets=7, seed=0, dtype=torch.float32, levels=4, p_excl=0.3, p_pos=0.25,
              p_set=0.3, p_ninf=0.1, with_users=False, continuous=False, device="cpu"):
    """Keyword arguments of one topk_hits call (scores, exclude, positives, neighbors, neighbor_sets[, users]).

    Scores take `levels` values (-1, 0, 1, ...), zeros with random signs, and
    -inf with probability p_ninf; with `continuous`, normal draws instead.
    Row 0 has everything excluded, row 1 only two rankable items, the last
    row no positives, row 1 only padding as neighbors; neighbor set 0 is empty.
    """
    g = np.random.default_rng(seed)
    if continuous:
        vals = g.standard_normal((B, I))
    else:
        vals = g.integers(0, levels, (B, I)).astype(np.float64) - 1.0
        vals[(vals == 0) & (g.random((B, I)) < 0.5)] = -0.0
    vals[g.random((B, I)) < p_ninf] = -np.inf
    n_rows = B + 5 if with_users else B
    excl = g.random((n_rows, I)) < p_excl
    pos = g.random((n_rows, I)) < p_pos
    users = g.choice(n_rows, size=B, replace=True) if with_users else np.arange(B)
    if B > 0:
        excl[users[0]] = True
        pos[users[-1]] = False
    if B > 1 and users[1] != users[0]:
        excl[users[1]] = True
        excl[users[1], g.choice(I, size=min(I, 2), replace=False)] = False
    sets = g.random((n_sets, I)) < p_set
    sets[0] = False
    nbrs = g.integers(-1, n_sets, (B, M))
    if B > 1:
        nbrs[1] = -1
    case = dict(
        scores=torch.from_numpy(vals).to(dtype).to(device),
        exclude=sp.csr_matrix(excl.astype(np.float32)),
        positives=sp.csr_matrix(pos.astype(np.float32)),
        neighbors=torch.from_numpy(nbrs).to(device),
        neighbor_sets=sp.csr_matrix(sets.astype(np.float32)),
    )
    if with_users:
        case["users"] = torch.from_numpy(users).to(device)
    return case


def plain_args(scores, ks, users=None, exclude=None, positives=None, neighbors=None, neighbor_sets=None,
               return_indices=False):
    """The arguments of the registered ops (plain tensors on the scores' device)."""
    def parts(x):
        if x is None:
            return None, None
        if isinstance(x, tuple) and all(isinstance(t, torch.Tensor) for t in x):
            return x[0].to(torch.int64), x[1].to(torch.int64)  # unchecked: the kernels check
        c = as_csr(x, "x", n_cols=scores.shape[1], device=scores.device)
        return c.indptr, c.indices

    nb = None if neighbors is None else neighbors.to(torch.int64)
    us = None if users is None else users.to(torch.int64)
    return (scores, list(ks), us, *parts(exclude), *parts(positives), nb, *parts(neighbor_sets), return_indices)


def truth(case, ks, return_indices=True):
    """The reference on the case: (hits, dcg float64, neighbor_hits float64, first_hit, indices) on the CPU."""
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out = reference.topk_hits(*plain_args(ks=ks, return_indices=return_indices, **cpu))
    return rk.TopKHits(*out)


def assert_matches(out, want, what, indices=True):
    B, n_k = want.hits.shape
    assert out.hits.dtype == torch.int64 and out.first_hit.dtype == torch.int64, what
    assert out.dcg.dtype == torch.float32 and out.neighbor_hits.dtype == torch.float32, what
    assert out.hits.shape == (B, n_k) and out.dcg.shape == (B, n_k) and out.neighbor_hits.shape == (B, n_k), what
    assert out.first_hit.shape == (B,), what
    for name in ("hits", "first_hit") + (("indices",) if indices else ()):
        got, exp = getattr(out, name).cpu(), getattr(want, name).cpu()
        assert torch.equal(got, exp), f"{what}: {name} differs\n{describe_mismatch(got, exp)}"
    for name in ("dcg", "neighbor_hits"):
        got, exp = getattr(out, name).cpu().double(), getattr(want, name).cpu().double()
        err = (got - exp).abs()
        assert bool((err <= F32_EPS * exp.abs()).all()), f"{what}: {name} differs\n{describe_mismatch(got, exp)}"


# --- the reference against a per-row Python ranking --------------------------------------

def python_topk_hits(scores, ks, users, exclude, positives, neighbors, neighbor_sets):
    """Straightforward per-row Python of the contract (DESIGN.md, Op 2)."""
    s = scores.double().tolist()
    B = len(s)
    kmax = ks[-1]
    rows_of = lambda m, r: set(m[r].indices.tolist())  # noqa: E731
    out = {"hits": [], "dcg": [], "nbr": [], "first": [], "indices": []}
    for b in range(B):
        u = int(users[b]) if users is not None else b
        banned = rows_of(exclude, u)
        items = [i for i in range(len(s[b])) if i not in banned]
        ranked = sorted(items, key=lambda i: (-s[b][i], i))[:kmax]
        pos = rows_of(positives, u)
        hit = [i in pos for i in ranked]
        out["hits"].append([sum(hit[:k]) for k in ks])
        out["dcg"].append([sum(1 / math.log2(r + 2) for r in range(min(k, len(hit))) if hit[r]) for k in ks])
        out["first"].append(next((r for r, h in enumerate(hit) if h), -1))
        valid = [int(v) for v in neighbors[b] if v >= 0]
        sets = [rows_of(neighbor_sets, v) for v in valid]
        out["nbr"].append([sum(len(set(ranked[:k]) & st) for st in sets) / len(sets) if sets else 0.0 for k in ks])
        out["indices"].append(ranked + [-1] * (kmax - len(ranked)))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_users", [False, True])
def test_reference_is_the_contract(seed, with_users):
    B, I = 6, 23
    ks = (1, 4, 10, I)
    case = make_case(B, I, seed=seed, with_users=with_users, continuous=seed % 3 == 2)
    got = truth(case, ks)
    want = python_topk_hits(case["scores"], ks, case.get("users"), case["exclude"], case["positives"],
                            case["neighbors"], case["neighbor_sets"])
    assert got.hits.tolist() == want["hits"]
    assert got.first_hit.tolist() == want["first"]
    assert got.indices.tolist() == want["indices"]
    torch.testing.assert_close(got.dcg, torch.tensor(want["dcg"], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.neighbor_hits, torch.tensor(want["nbr"], dtype=torch.float64), rtol=1e-12, atol=0)


def test_hand_worked_example():
    """Three rows worked out by hand: ties by id, -0.0 == +0.0, -inf ranked, exclusions."""
    inf = float("inf")
    scores = torch.tensor([
        [0.5, 2.0, 0.5, -inf, 2.0, -0.0],   # rank: 1, 4, 0, 2, 5, 3
        [0.0, -0.0, 1.0, 0.0, -inf, 1.0],   # exclude 2: rank 5, 0, 1, 3, 4
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],     # exclude all but 4 and 1: rank 1, 4
    ])
    exclude = (torch.tensor([0, 0, 1, 5]), torch.tensor([2, 0, 2, 3, 5]))
    positives = (torch.tensor([0, 2, 3, 4]), torch.tensor([0, 5, 4, 4]))
    neighbors = torch.tensor([[0, 1], [-1, -1], [1, -1]])
    sets = (torch.tensor([0, 3, 5]), torch.tensor([1, 2, 3, 1, 4]))
    for backend in ("reference", "cpu"):
        out = rk.topk_hits(scores, (1, 3, 6), exclude=exclude, positives=positives, neighbors=neighbors,
                           neighbor_sets=sets, return_indices=True, backend=backend)
        assert out.indices.tolist() == [[1, 4, 0, 2, 5, 3], [5, 0, 1, 3, 4, -1], [1, 4, -1, -1, -1, -1]]
        # Positives: row 0 {0, 5} at ranks 2 and 4; row 1 {4} at rank 4; row 2 {4} at rank 1.
        assert out.hits.tolist() == [[0, 1, 2], [0, 0, 1], [0, 1, 1]]
        assert out.first_hit.tolist() == [2, 4, 1]
        d = lambda r: 1 / math.log2(r + 2)  # noqa: E731
        torch.testing.assert_close(out.dcg, torch.tensor([[0, d(2), d(2) + d(4)], [0, 0, d(4)], [0, d(1), d(1)]]).float())
        # Row 0: set 0 = {1, 2, 3}, set 1 = {1, 4}; top-1 {1}: 1, 1; top-3 {1, 4, 0}: 1, 2;
        # top-6: 3, 2. Row 2: set 1 = {1, 4}; top-1 {1}: 1; top-3 = top-6 = {1, 4}: 2.
        torch.testing.assert_close(out.neighbor_hits, torch.tensor([[1.0, 1.5, 2.5], [0, 0, 0], [1, 2, 2]]))


# --- every backend against the reference ----------------------------------------------

# (B, I, ks): small enough for Triton's interpreter, with k = I and Kmax < I.
SHAPES = [(5, 9, (1, 3, 9)), (6, 37, (2, 5, 16))]


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(bd, dtype, shape):
    backend, device = bd
    B, I, ks = shape
    case = make_case(B, I, seed=stable_seed(shape, str(dtype)), dtype=dtype, device=device,
                     with_users=True)
    out = rk.topk_hits(ks=ks, return_indices=True, backend=backend, **case)
    assert_matches(out, truth(case, ks), f"{backend} {dtype}")


@pytest.mark.parametrize("bd", backend_params())
def test_float64_scores(bd):
    backend, device = bd
    case = make_case(5, 20, seed=4, dtype=torch.float64, device=device, continuous=True)
    ks = (1, 7)
    if backend in ("cuda", "triton"):
        with pytest.raises(rk.BackendUnavailable, match="float64"):
            rk.topk_hits(ks=ks, backend=backend, **case)
        return
    # Differences below float32 resolution must still order the items.
    case["scores"][:, :10] = 1.0 + torch.arange(10, dtype=torch.float64) * 1e-12
    assert_matches(rk.topk_hits(ks=ks, return_indices=True, backend=backend, **case), truth(case, ks), backend)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cpu_larger_cases(seed, dtype):
    """Bigger rows than Triton's interpreter can take, continuous and tied scores, Kmax near I."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    B, I = 40, 700
    for ks, continuous in (((10, 20, 50, 100), True), ((1, 600, 700), False)):
        case = make_case(B, I, M=10, n_sets=30, seed=seed, dtype=dtype, continuous=continuous,
                         with_users=seed % 2 == 0, p_excl=0.1, p_pos=0.05, p_set=0.05)
        out = rk.topk_hits(ks=ks, return_indices=True, backend="cpu", **case)
        assert_matches(out, truth(case, ks), f"cpu {dtype} ks={ks}")


@pytest.mark.parametrize("bd", backend_params())
def test_csr_forms_and_index_dtypes(bd):
    """scipy, torch sparse CSR and (indptr, indices[, values]) tuples of int32 or int64 give one answer."""
    backend, device = bd
    case = make_case(4, 12, seed=5, device=device, with_users=True)
    ks = (2, 5)
    want = truth(case, ks)
    forms = {
        "torch-csr": lambda m: torch.from_numpy(m.toarray()).to_sparse_csr().to(device),
        "tuple-int32": lambda m: (torch.from_numpy(m.indptr.astype(np.int32)).to(device),
                                  torch.from_numpy(m.indices.astype(np.int32)).to(device)),
        "numpy-tuple-values": lambda m: (m.indptr, m.indices, m.data),
        "checked-CSR": lambda m: as_csr(m, "x", device=device),
    }
    for name, form in forms.items():
        kw = dict(case)
        for arg in ("exclude", "positives", "neighbor_sets"):
            kw[arg] = form(case[arg])
        kw["users"] = case["users"].to(torch.int32)
        kw["neighbors"] = case["neighbors"].to(torch.int32)
        assert_matches(rk.topk_hits(ks=ks, return_indices=True, backend=backend, **kw), want, name)


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("layout", ["strided-rows", "strided-items", "transposed"])
def test_non_contiguous_scores(bd, layout):
    backend, device = bd
    case = make_case(5, 14, seed=6, device=device)
    s = case["scores"]
    if layout == "strided-rows":
        big = torch.zeros(10, 14, device=device)
        big[::2] = s
        nc = big[::2]
    elif layout == "strided-items":
        big = torch.zeros(5, 28, device=device)
        big[:, ::2] = s
        nc = big[:, ::2]
    else:
        nc = s.t().contiguous().t()
    assert not nc.is_contiguous() and torch.equal(nc, s)
    ks = (3, 14)
    out = rk.topk_hits(ks=ks, return_indices=True, backend=backend, **{**case, "scores": nc})
    assert_matches(out, truth(case, ks), layout)


@pytest.mark.parametrize("bd", backend_params())
def test_edge_cases(bd):
    backend, device = bd
    run = lambda **kw: rk.topk_hits(backend=backend, **kw)  # noqa: E731
    # No rows at all.
    out = run(scores=torch.zeros(0, 5, device=device), ks=(2,), return_indices=True)
    assert out.hits.shape == (0, 1) and out.indices.shape == (0, 2) and out.first_hit.shape == (0,)
    # One item; every score -inf; k = I = 1.
    out = run(scores=torch.full((3, 1), -math.inf, device=device), ks=1, return_indices=True,
              positives=(torch.tensor([0, 1, 1, 1]), torch.tensor([0])))
    assert out.indices.tolist() == [[0], [0], [0]] and out.hits.tolist() == [[1], [0], [0]]
    assert out.first_hit.tolist() == [0, -1, -1]
    # Nothing given but scores: zeros and -1 in the shapes of the contract, no indices.
    s = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]], device=device)
    out = run(scores=s, ks=(1, 2))
    assert out.indices is None
    assert out.hits.tolist() == [[0, 0], [0, 0]] and out.first_hit.tolist() == [-1, -1]
    assert out.dcg.abs().sum() == 0 and out.neighbor_hits.abs().sum() == 0
    # Neighbors with M = 0.
    out = run(scores=s, ks=(1,), neighbors=torch.zeros(2, 0, dtype=torch.int64, device=device),
              neighbor_sets=(torch.tensor([0, 1]), torch.tensor([1])))
    assert out.neighbor_hits.tolist() == [[0.0], [0.0]]


@pytest.mark.parametrize("bd", backend_params())
def test_large_kmax_when_supported(bd):
    """Kmax = I = 1100 and 1025, past the GPU kernels' limit of 1024: cpu and reference rank it,
    cuda and triton refuse with a reason."""
    backend, device = bd
    case = make_case(3, 1100, seed=8, device=device, continuous=True, p_excl=0.05)
    ks = (1, 1025, 1100)
    if backend in ("cuda", "triton"):
        with pytest.raises(rk.BackendUnavailable, match="1024"):
            rk.topk_hits(ks=ks, backend=backend, **case)
        return
    assert_matches(rk.topk_hits(ks=ks, return_indices=True, backend=backend, **case), truth(case, ks), backend)


@pytest.mark.parametrize("pattern", ["ascending", "descending", "organ-pipe", "all-ties", "sawtooth"])
def test_cpu_structured_rows(pattern):
    """Orderings that trouble selection algorithms (sorted runs, organ pipes, all ties)."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    I = 1500
    ramp = torch.arange(I, dtype=torch.float32)
    row = {"ascending": ramp, "descending": -ramp, "all-ties": torch.zeros(I), "sawtooth": ramp % 7,
           "organ-pipe": torch.cat([ramp[:I // 2], ramp[:I - I // 2].flip(0)])}[pattern]
    case = {"scores": row.repeat(4, 1), "positives": (torch.tensor([0, 3, 3, 6, 7]), torch.tensor([0, 750, 1499, 5, 9, 749, 12]))}
    for ks in ((10, 100), (1,), (I,)):
        assert_matches(rk.topk_hits(ks=ks, return_indices=True, backend="cpu", **case), truth(case, ks), f"{pattern} {ks}")


@pytest.mark.parametrize("where", ["inside", "across-kmax", "beyond-kmax", "at-threshold", "many"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_ties_among_the_selected_items(where, dtype):
    """The cpu kernel ranks its candidates by counting how many score at least as much, which is exact
    only without ties: ties among the top Kmax (inside, or across the Kmax-th place) must send the row
    to the ranking by keys, a tie after the top Kmax need not, and more candidates than the count takes
    (600 equal best scores) go to the keys from the start. Continuous rows of 3,000 items, Kmax 100."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    I, kmax = 3000, 100
    g = torch.Generator().manual_seed(stable_seed("ties", where, str(dtype)))
    scores = torch.rand(6, I, generator=g, dtype=torch.float64)
    order = scores.argsort(dim=1, descending=True)
    for b in range(scores.shape[0]):
        place = {"inside": [3 + b, 4 + b, 9 + b], "across-kmax": [kmax - 2 + b % 3, kmax - 1 + b % 3, kmax + b % 3],
                 "beyond-kmax": [kmax + 2 + b, kmax + 3 + b], "at-threshold": list(range(kmax + 5, kmax + 40)),
                 "many": list(range(0, 600))}[where]
        items = order[b, place]
        scores[b, items] = float(scores[b, items[0]])
    case = {"scores": scores.to(dtype), "exclude": random_csr(np.random.default_rng(1), 6, I, 0.05),
            "positives": random_csr(np.random.default_rng(2), 6, I, 0.05)}
    for ks in ((10, kmax), (1, 50, kmax)):
        assert_matches(rk.topk_hits(ks=ks, return_indices=True, backend="cpu", **case), truth(case, ks),
                       f"{where} {ks}")


def test_cpu_threads_give_identical_results(monkeypatch):
    # Tasks of a thousandth of the usual work, so this small input takes the threaded path (a region
    # runs on one thread below about 1 ms of work; see csrc/cpu/common.h).
    monkeypatch.setenv("REFIT_CPU_GRAIN_SCALE", "0.001")
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    case = make_case(200, 300, M=5, seed=9, continuous=True, p_excl=0.1)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rk.topk_hits(ks=(5, 50), return_indices=True, backend="cpu", **case)
        torch.set_num_threads(max(2, old))
        many = rk.topk_hits(ks=(5, 50), return_indices=True, backend="cpu", **case)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_dispatcher_prefers_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("REFIT_BACKEND", raising=False)
    case = make_case(3, 10, seed=1)
    # float64 runs on the cpu kernel too; its dcg is float32 like every backend's.
    out = rk.topk_hits(ks=(2,), **{**case, "scores": case["scores"].double()})
    assert out.dcg.dtype == torch.float32
    assert rk.dispatch.select("topk_hits", torch.device("cpu")) == (
        "cpu" if rk.available_backends()["cpu"] is None else "reference")


@pytest.mark.parametrize("bd", backend_params())
def test_bad_rows_that_are_not_read_are_no_error(bd):
    """Rows no call reads are not looked at, on every backend alike (the contract, see rk.topk_hits).

    Before, the reference read neighbor_sets row 0 for padding (-1) and
    raised a raw IndexError for its bad column id, where the kernels
    (rightly) did not read it.
    """
    backend, device = bd
    s = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]], device=device)
    sets = (torch.tensor([0, 2, 3, 5], device=device), torch.tensor([9, 1, 2, 0, 3], device=device))  # row 0 broken
    nb = torch.tensor([[1, -1], [2, 2]], device=device)
    pos = (torch.tensor([0, 2, 2, 3], device=device), torch.tensor([5, 2, 0], device=device))  # row 0 broken
    got = rk.topk_hits(s, (1, 2), users=torch.tensor([2, 1], device=device), positives=pos, neighbors=nb,
                       neighbor_sets=sets, backend=backend)
    assert got.hits.cpu().tolist() == [[1, 1], [0, 0]]
    assert got.neighbor_hits.cpu().tolist() == [[0.0, 1.0], [1.0, 1.0]]
    # The same rows, read, are errors.
    with pytest.raises(IndexError, match=r"neighbor_sets row 0 \(scores row 0\) has column index 9"):
        rk.topk_hits(s, 1, neighbors=torch.tensor([[1, 0], [2, 2]], device=device), neighbor_sets=sets,
                     backend=backend)
    with pytest.raises(IndexError, match=r"positives row 0 \(scores row 1\) has column index 5"):
        rk.topk_hits(s, 1, users=torch.tensor([2, 0], device=device), positives=pos, backend=backend)


@pytest.mark.parametrize("bd", backend_params())
def test_zero_row_csr_arguments(bd):
    """CSR arguments without rows: nothing is read when no row is named; any row named is an IndexError."""
    backend, device = bd
    s = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0]], device=device)
    empty = (torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
    got = rk.topk_hits(s, 2, neighbors=torch.full((2, 3), -1, device=device), neighbor_sets=empty,
                       return_indices=True, backend=backend)
    assert got.indices.cpu().tolist() == [[0, 2], [2, 1]] and got.neighbor_hits.abs().sum().item() == 0
    users = torch.tensor([0, 0], device=device)
    for arg in ("exclude", "positives"):
        with pytest.raises(IndexError, match=rf"users\[0\] = 0 is out of range for {arg} with 0 rows"):
            rk.topk_hits(s, 1, users=users, backend=backend, **{arg: empty})
    with pytest.raises(IndexError, match=r"neighbors\[0, 0\] = 0 is out of range for neighbor_sets with 0 rows"):
        rk.topk_hits(s, 1, neighbors=torch.tensor([[0], [-1]], device=device), neighbor_sets=empty, backend=backend)


def test_scores_requiring_grad_are_detached():
    s = torch.rand(3, 8, requires_grad=True)
    out = rk.topk_hits(s, (2,), positives=(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2])))
    assert not out.dcg.requires_grad


# --- property-based: any shape, any density -----------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 8), I=st.integers(1, 80), M=st.integers(0, 4), levels=st.integers(1, 6),
       p_excl=st.floats(0, 1), p_pos=st.floats(0, 1), p_set=st.floats(0, 1), p_ninf=st.floats(0, 1),
       n_k=st.integers(1, 4), with_users=st.booleans(), continuous=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference_on_any_case(B, I, M, levels, p_excl, p_pos, p_set, p_ninf, n_k, with_users,
                                           continuous, seed):
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    g = np.random.default_rng(seed)
    ks = tuple(sorted(set(int(k) for k in g.integers(1, I + 1, n_k))))
    case = make_case(B, I, M=M, seed=seed, levels=levels, p_excl=p_excl, p_pos=p_pos, p_set=p_set,
                     p_ninf=p_ninf, with_users=with_users, continuous=continuous)
    out = rk.topk_hits(ks=ks, return_indices=True, backend="cpu", **case)
    assert_matches(out, truth(case, ks), f"ks={ks}")


# --- bad input ----------------------------------------------------------------------------------

def _bad_cases():
    """(id, keyword arguments, exception, regex the message must match)."""
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 3.0]])
    nan = s.clone()
    nan[2, 1] = float("nan")
    good = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]))
    sets = (torch.tensor([0, 2, 3]), torch.tensor([0, 3, 1]))
    nb = torch.tensor([[0, -1], [1, 0], [-1, -1]])
    meta = torch.device("meta")
    return [
        ("int-scores", dict(scores=s.long(), ks=1), TypeError, "scores"),
        ("1d-scores", dict(scores=s[0], ks=1), ValueError, "scores must be 2-D"),
        ("not-a-tensor", dict(scores=s.tolist(), ks=1), TypeError, "scores"),
        ("ks-unsorted", dict(scores=s, ks=(3, 2)), ValueError, "strictly ascending"),
        ("ks-repeated", dict(scores=s, ks=(2, 2)), ValueError, "strictly ascending"),
        ("k-above-I", dict(scores=s, ks=(2, 5)), ValueError, r"1 <= k <= I = 4"),
        ("k-zero", dict(scores=s, ks=(0, 2)), ValueError, r"1 <= k <= I"),
        ("ks-empty", dict(scores=s, ks=()), ValueError, "at least one"),
        ("ks-float", dict(scores=s, ks=(1.5,)), TypeError, "ks"),
        ("nan", dict(scores=nan, ks=2, positives=good), ValueError, r"scores row 2 contains NaN \(first at column 1\)"),
        ("nan-in-excluded-item", dict(scores=nan, ks=1, exclude=(torch.tensor([0, 0, 0, 1]), torch.tensor([1]))),
         ValueError, "scores row 2 contains NaN"),
        ("exclude-column-range", dict(scores=s, ks=1, exclude=(torch.tensor([0, 0, 2, 2]), torch.tensor([1, 4]))),
         IndexError, r"exclude row 1 \(scores row 1\) has column index 4, out of range"),
        ("exclude-negative-column", dict(scores=s, ks=1, exclude=(torch.tensor([0, 1, 1, 1]), torch.tensor([-1]))),
         IndexError, r"exclude row 0 .* column index -1"),
        ("positives-unsorted", dict(scores=s, ks=1, positives=(torch.tensor([0, 0, 0, 2]), torch.tensor([3, 1]))),
         ValueError, r"positives row 2 \(scores row 2\) has column index 1 after a larger"),
        ("positives-duplicate", dict(scores=s, ks=1, positives=(torch.tensor([0, 2, 2, 2]), torch.tensor([1, 1]))),
         ValueError, r"positives row 0 .*sorted and unique"),
        ("neighbor-id-range", dict(scores=s, ks=1, neighbors=torch.tensor([[0, -1], [2, 0], [-1, -1]]),
                                   neighbor_sets=sets), IndexError, r"neighbors\[1, 0\] = 2 is out of range"),
        ("neighbor-id-below-padding", dict(scores=s, ks=1, neighbors=torch.tensor([[-2, 0], [0, 0], [0, 0]]),
                                           neighbor_sets=sets), IndexError, r"neighbors\[0, 0\] = -2"),
        ("neighbor-set-column", dict(scores=s, ks=1, neighbors=nb, neighbor_sets=(sets[0], torch.tensor([0, 9, 1]))),
         IndexError, r"neighbor_sets row 0 \(scores row 0\) has column index 9"),
        ("users-range", dict(scores=s, ks=1, positives=good, users=torch.tensor([0, 3, 1])),
         IndexError, r"users\[1\] = 3 is out of range for positives with 3 rows"),
        ("users-negative", dict(scores=s, ks=1, exclude=good, users=torch.tensor([0, 1, -1])),
         IndexError, r"users\[2\] = -1 is out of range for exclude"),
        ("rows-without-users", dict(scores=s[:2], ks=1, positives=good), ValueError, "positives has 3 rows but scores has B = 2"),
        ("users-shape", dict(scores=s, ks=1, positives=good, users=torch.tensor([0, 1])), ValueError, "users"),
        ("users-float", dict(scores=s, ks=1, positives=good, users=torch.tensor([0.0, 1.0, 2.0])), TypeError, "users"),
        ("neighbors-alone", dict(scores=s, ks=1, neighbors=nb), ValueError, "neighbors and neighbor_sets"),
        ("neighbor-sets-alone", dict(scores=s, ks=1, neighbor_sets=sets), ValueError, "neighbors and neighbor_sets"),
        ("neighbors-shape", dict(scores=s, ks=1, neighbors=nb[:2], neighbor_sets=sets), ValueError, "neighbors"),
        ("csr-columns", dict(scores=s, ks=1, positives=sp.csr_matrix(np.eye(3, 5))), ValueError, "positives: expected 4 columns"),
        ("csr-indptr", dict(scores=s, ks=1, exclude=(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]))),
         ValueError, "exclude: indptr must be non-decreasing"),
        ("users-device", dict(scores=s, ks=1, positives=good, users=torch.tensor([0, 1, 2], device=meta)),
         ValueError, "users is on meta"),
        ("positives-device", dict(scores=s, ks=1, positives=(good[0].to(meta), good[1].to(meta))), ValueError,
         "positives is on meta"),
        ("neighbor-sets-device", dict(scores=s, ks=1, neighbors=nb, neighbor_sets=(sets[0].to(meta), sets[1].to(meta))),
         ValueError, "neighbor_sets is on meta"),
        ("neighbors-device", dict(scores=s, ks=1, neighbors=nb.to(meta), neighbor_sets=sets), ValueError,
         "neighbors is on meta"),
        ("return-indices-type", dict(scores=s, ks=1, return_indices="yes"), TypeError, "return_indices"),
        ("checked-CSR-columns", dict(scores=s, ks=1, exclude=as_csr(sp.csr_matrix(np.eye(3, 5)), "exclude")),
         ValueError, "exclude: expected 4 columns"),
        # Layouts and devices the kernels cannot read.
        ("sparse-csr-scores", dict(scores=s.to_sparse_csr(), ks=1), TypeError, "scores must be a dense"),
        ("sparse-coo-scores", dict(scores=s.to_sparse(), ks=1), TypeError, "scores must be a dense"),
        ("meta-scores", dict(scores=s.to("meta"), ks=1), ValueError, "scores is a meta tensor"),
        ("meta-everything", dict(scores=s.to(meta), ks=1, positives=(good[0].to(meta), good[1].to(meta)),
                                 users=torch.tensor([0, 1, 2], device=meta)), ValueError, "scores is a meta tensor"),
        ("complex-scores", dict(scores=s.to(torch.complex64), ks=1), TypeError, "scores"),
        ("users-sparse", dict(scores=s, ks=1, positives=good, users=torch.tensor([0, 1, 2]).to_sparse()), TypeError,
         "users must be a dense"),
        ("neighbors-sparse", dict(scores=s, ks=1, neighbors=nb.to_sparse(), neighbor_sets=sets), TypeError,
         "neighbors must be a dense"),
        ("positives-sparse-part", dict(scores=s, ks=1, positives=(good[0].to_sparse(), good[1])), TypeError,
         "positives: indptr must be a dense"),
        # Floats and bools are never truncated into ids.
        ("users-float-numpy", dict(scores=s, ks=1, positives=good, users=np.array([0.0, 1.0, 2.0])), TypeError,
         "users"),
        ("users-bool", dict(scores=s, ks=1, positives=good, users=torch.tensor([False, True, True])), TypeError,
         "users"),
        ("neighbors-float", dict(scores=s, ks=1, neighbors=nb.double(), neighbor_sets=sets), TypeError, "neighbors"),
        ("neighbors-bool-numpy", dict(scores=s, ks=1, neighbors=nb.numpy() > 0, neighbor_sets=sets), TypeError,
         "neighbors"),
        ("ks-bool", dict(scores=s, ks=True), TypeError, "ks"),
        ("ks-meta", dict(scores=s, ks=torch.tensor([1, 2], device=meta)), ValueError, "ks is a meta tensor"),
        ("ks-sparse", dict(scores=s, ks=torch.tensor([1, 2]).to_sparse()), TypeError, "ks must be a dense"),
        ("ks-float-numpy", dict(scores=s, ks=np.array([1.0, 2.0])), TypeError, "ks"),
        ("ks-float-tensor", dict(scores=s, ks=torch.tensor([1.0, 2.0])), TypeError, "ks"),
        ("positives-float-indices", dict(scores=s, ks=1, positives=(good[0], good[1].double())), TypeError,
         "positives: indices"),
        ("exclude-float-indptr-numpy", dict(scores=s, ks=1, exclude=(good[0].numpy().astype(np.float32),
                                                                      good[1].numpy())), TypeError, "exclude: indptr"),
        ("neighbor-sets-list-indptr", dict(scores=s, ks=1, neighbors=nb, neighbor_sets=([0, 2, 3], [0, 3, 1])),
         TypeError, "neighbor_sets: indptr"),
        # A broken indptr anywhere in the matrix, whichever rows are read (the message of gather_rows too).
        ("indptr-ends-before-nnz", dict(scores=s, ks=1, positives=(good[0], torch.tensor([0, 1, 2, 3]))), ValueError,
         "positives: indptr must start at 0 and end at nnz = 4"),
        ("indptr-decreasing-unread-row", dict(scores=s, ks=1, neighbors=torch.full((3, 2), -1),
                                              neighbor_sets=(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]))),
         ValueError, r"neighbor_sets: indptr must be non-decreasing .*row 1 gives the entries 2 .. 1"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("backend", [b for b in rk.BACKENDS if b != "cuda"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_a_clear_error(backend, case):
    _, kwargs, exc, pattern = case
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    with pytest.raises(exc, match=pattern):
        rk.topk_hits(backend=backend, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no CUDA device")
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_a_clear_error_cuda(case):
    if rk.available_backends()["cuda"] is not None:
        pytest.skip(rk.available_backends()["cuda"])
    _, kwargs, exc, pattern = case
    moved = {k: (v.cuda() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v) for k, v in kwargs.items()}
    for k in ("exclude", "positives", "neighbor_sets"):
        if isinstance(moved.get(k), tuple):  # (lists and numpy arrays stay: they are what the case is about)
            moved[k] = tuple(t.cuda() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
                             for t in moved[k])
    if not isinstance(moved.get("scores"), torch.Tensor) or moved["scores"].dtype not in DTYPES:
        moved["scores"] = kwargs["scores"]  # the type errors come before any device question
    with pytest.raises(exc, match=pattern):
        rk.topk_hits(backend="cuda", **moved)


def _op_cases():
    """Bad plain arguments for the registered ops: static checks and the kernels' own checks."""
    s = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    ptr, idx = torch.tensor([0, 1, 2]), torch.tensor([0, 2])
    meta = torch.device("meta")
    nan = s.clone()
    nan[1, 2] = float("nan")
    a = lambda **kw: {**dict(scores=s, ks=[1], users=None, exclude=None, positives=None, neighbors=None,  # noqa: E731
                             neighbor_sets=None), **kw}
    return [
        ("int-scores", a(scores=s.int()), TypeError, "scores"),
        ("ks-unsorted", a(ks=[2, 1]), ValueError, "ascending"),
        ("k-above-I", a(ks=[4]), ValueError, "I = 3"),
        ("users-int32", a(users=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "users must be int64"),
        ("indptr-device", a(positives=(ptr.to(meta), idx)), ValueError, "positives is on meta"),
        ("indptr-without-indices", a(positives=(ptr, None)), ValueError, "together"),
        ("indptr-decreasing", a(positives=(torch.tensor([0, 2, 1]), idx)), ValueError,
         r"positives row 1 \(scores row 1\) has an invalid indptr range"),
        ("indptr-past-nnz", a(exclude=(torch.tensor([0, 1, 5]), idx)), ValueError, "exclude row 1 .*invalid indptr"),
        ("nan", a(scores=nan), ValueError, "scores row 1 contains NaN"),
        ("column-range", a(exclude=(ptr, torch.tensor([0, 3]))), IndexError, "exclude row 1 .*column index 3"),
        ("users-range", a(users=torch.tensor([0, 2]), positives=(ptr, idx)), IndexError, r"users\[1\] = 2"),
        ("neighbors-int32", a(neighbors=torch.tensor([[0], [1]], dtype=torch.int32), neighbor_sets=(ptr, idx)),
         TypeError, "neighbors must be int64"),
    ]


OP_BAD = _op_cases()


@pytest.mark.parametrize("op_name", ["topk_hits", "topk_hits_triton"])
@pytest.mark.parametrize("case", OP_BAD, ids=[c[0] for c in OP_BAD])
def test_ops_check_their_arguments(op_name, case):
    """The registered ops check too, so calling them directly is as safe as the API."""
    backend = "cpu" if op_name == "topk_hits" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    _, kw, exc, pattern = case
    split = lambda c: (None, None) if c is None else c  # noqa: E731
    args = (kw["scores"], kw["ks"], kw["users"], *split(kw["exclude"]), *split(kw["positives"]), kw["neighbors"],
            *split(kw["neighbor_sets"]), False)
    with pytest.raises(exc, match=pattern):
        getattr(torch.ops.refit, op_name)(*args)


# --- torch.library integration ---------------------------------------------------------------

@pytest.mark.parametrize("op_name", ["topk_hits", "topk_hits_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("full", [True, False], ids=["all-arguments", "scores-only"])
def test_opcheck(op_name, dtype, full):
    backend = "cpu" if op_name == "topk_hits" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    case = make_case(3, 11, seed=3, dtype=dtype, with_users=True)
    if not full:
        case = {"scores": case["scores"]}
    args = plain_args(ks=(2, 4), return_indices=full, **case)
    torch.library.opcheck(getattr(torch.ops.refit, op_name).default, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    case = make_case(4, 13, M=2, seed=7)
    pos = as_csr(case["positives"], "positives")
    ex = as_csr(case["exclude"], "exclude")
    sets = as_csr(case["neighbor_sets"], "neighbor_sets")

    def reward(scores, nbrs):
        # The ReFiT reward: alpha * N_K / K + (1 - alpha) * N_simK / K.
        out = rk.topk_hits(scores, (5,), exclude=(ex.indptr, ex.indices), positives=(pos.indptr, pos.indices),
                           neighbors=nbrs, neighbor_sets=(sets.indptr, sets.indices), backend=backend)
        return 0.5 * out.hits[:, 0] / 5 + 0.5 * out.neighbor_hits[:, 0] / 5

    compiled = torch.compile(reward, fullgraph=True)
    torch.testing.assert_close(compiled(case["scores"], case["neighbors"]), reward(case["scores"], case["neighbors"]))


# --- the CUDA kernel, executed on the CPU ------------------------------------------------------
#
# Without a GPU the CUDA source is still run: tests/cuda_emu provides host
# versions of the CUDA headers it includes (a block's threads as std::threads,
# __syncthreads() as a barrier, __shared__ as statics, real atomics), the
# kernel's <<<...>>> launch is rewritten into a call, and a small driver feeds
# it a case through files. It runs in a subprocess under a timeout, since a
# barrier that only part of a block reaches deadlocks.

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EMU_DIR = os.path.join(ROOT, "tests", "cuda_emu")
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.+?)>>>\s*\((.*?)\)\s*;", re.S)
_EMU_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    work = tmp_path_factory.mktemp("cuda_emu")
    with open(os.path.join(ROOT, "csrc", "cuda", "topk_hits_cuda.cu")) as f:
        source, launches = _LAUNCH.subn(r"emu_launch(\1, \2, \3);", f.read())
    assert launches == 1, "expected one kernel launch in topk_hits_cuda.cu"
    (work / "emulated.cpp").write_text(source)
    exe = work / "topk_hits_main"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-I", str(work), "-I", _EMU_DIR,
           "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", os.path.join(ROOT, "csrc", "include"),
           os.path.join(_EMU_DIR, "topk_hits_main.cpp"), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"
    return exe, work


def run_emulated(emulated_cuda, ks, return_indices=True, **case):
    """The CUDA kernel on a case, with the host glue's raising: TopKHits on the CPU."""
    exe, work = emulated_cuda
    scores = case["scores"].contiguous()
    B, I = scores.shape
    (_, ks_list, users, ex_p, ex_i, po_p, po_i, nbrs, ns_p, ns_i, _) = plain_args(ks=ks, **case)
    n_rows = lambda p: -1 if p is None else p.shape[0] - 1  # noqa: E731
    nnz = lambda i: 0 if i is None else i.shape[0]  # noqa: E731
    header = [_EMU_DTYPES[scores.dtype], B, I, I, len(ks_list), ks_list[-1], int(users is not None),
              n_rows(ex_p), nnz(ex_i), n_rows(po_p), nnz(po_i), -1 if nbrs is None else nbrs.shape[1],
              n_rows(ns_p), nnz(ns_i), int(return_indices)]
    raw = scores.view(torch.int16) if scores.dtype != torch.float32 else scores
    parts = [np.asarray(header, dtype=np.int64), raw.numpy(), np.asarray(ks_list, dtype=np.int64)]
    parts += [t.numpy().astype(np.int64) for t in (users, ex_p, ex_i, po_p, po_i, nbrs, ns_p, ns_i) if t is not None]
    with open(work / "in.bin", "wb") as f:
        for p in parts:
            f.write(np.ascontiguousarray(p).tobytes())
    out = subprocess.run([str(exe), str(work / "in.bin"), str(work / "out.bin")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    data = open(work / "out.bin", "rb").read()
    n_k, kmax = len(ks_list), ks_list[-1]
    offset = 0

    def take(dtype, n):
        nonlocal offset
        arr = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        offset += arr.nbytes
        return torch.from_numpy(arr.copy())

    status = int(take(np.int64, 1)[0])
    assert status == 0, f"launcher status {status}"
    hits, dcg, nbr = take(np.int64, B * n_k), take(np.float32, B * n_k), take(np.float32, B * n_k)
    first = take(np.int64, B)
    indices = take(np.int64, B * kmax if return_indices else 0)
    report = take(np.int64, B * 4).view(B, 4)
    rows = {"exclude": n_rows(ex_p), "positives": n_rows(po_p), "neighbor_sets": n_rows(ns_p)}
    error = reference.topk_row_error(report, I, rows)
    if error is not None:
        raise error
    return rk.TopKHits(hits.view(B, n_k), dcg.view(B, n_k), nbr.view(B, n_k), first,
                       indices.view(B, kmax) if return_indices else None)


EMU_SHAPES = SHAPES + [(4, 700, (10, 20, 100)), (3, 1100, (1, 1024))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_kernel_emulated(emulated_cuda, dtype, shape):
    B, I, ks = shape
    for continuous in (False, True):
        case = make_case(B, I, seed=stable_seed(shape, str(dtype), continuous), dtype=dtype,
                         with_users=True, continuous=continuous, p_excl=0.3 if I < 100 else 0.05)
        assert_matches(run_emulated(emulated_cuda, ks, **case), truth(case, ks), f"cuda (emulated) {dtype}")


def test_cuda_kernel_emulated_without_optional_arguments(emulated_cuda):
    case = make_case(4, 30, seed=12)
    out = run_emulated(emulated_cuda, (3, 30), return_indices=False, scores=case["scores"])
    want = truth({"scores": case["scores"]}, (3, 30), return_indices=False)
    assert_matches(out, want, "cuda (emulated), scores only", indices=False)
    assert out.hits.abs().sum() == 0 and bool((out.first_hit == -1).all())


EMU_BAD = [c for c in BAD if c[0] in (
    "nan", "nan-in-excluded-item", "exclude-column-range", "exclude-negative-column", "positives-unsorted",
    "positives-duplicate", "neighbor-id-range", "neighbor-id-below-padding", "neighbor-set-column",
    "users-range", "users-negative")] + [
    ("indptr-past-nnz", dict(scores=torch.zeros(2, 3), ks=1, exclude=(torch.tensor([0, 1, 5]), torch.tensor([0, 2]))),
     ValueError, r"exclude row 1 \(scores row 1\) has an invalid indptr range"),
]


@pytest.mark.parametrize("case", EMU_BAD, ids=[c[0] for c in EMU_BAD])
def test_cuda_kernel_emulated_reports_bad_input(emulated_cuda, case):
    _, kwargs, exc, pattern = case
    kwargs = dict(kwargs)
    ks = kwargs.pop("ks")
    ks = (ks,) if isinstance(ks, int) else ks
    with pytest.raises(exc, match=pattern):
        run_emulated(emulated_cuda, ks, **kwargs)
