"""target_rank: every backend against the reference, the reference against a
per-positive Python count, the defining property against topk_hits, and the
refusals topk_hits makes, from every backend alike.

Cases reuse topk_hits' (tests/test_topk_hits.py): scores drawn from a few
levels (many ties, +0.0 and -0.0 among them), -inf scores, a row with
everything excluded, a row with two rankable items, a row without positives.
Ranks are integers: every backend must equal the reference exactly. The CUDA
kernel runs on the CPU under the host emulation in
tests/cuda_emu/test_cuda_emulated.py.
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
from test_topk_hits import make_case as topk_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --- cases ------------------------------------------------------------------------

def make_case(B, I, **kw):
    """Keyword arguments of one target_rank call: scores, positives, exclude[, users] (topk_hits' cases)."""
    case = topk_case(B, I, **kw)
    case.pop("neighbors")
    case.pop("neighbor_sets")
    return case


def plain_args(scores, positives, exclude=None, users=None):
    """The arguments of the registered ops (plain tensors on the scores' device)."""
    def parts(x):
        if x is None:
            return None, None
        c = as_csr(x, "x", n_cols=scores.shape[1], device=scores.device)
        return c.indptr, c.indices

    us = None if users is None else users.to(torch.int64)
    return (scores, us, *parts(exclude), *parts(positives))


def truth(case):
    """The reference on the case, on the CPU: (n,) int64."""
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    return reference.target_rank(*plain_args(**cpu))


def assert_same(got, want, what):
    assert got.dtype == torch.int64 and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    got = got.cpu()
    assert torch.equal(got, want), f"{what}: ranks differ\n{describe_mismatch(got, want)}"


def owners(positives, users, B):
    """(n,) the scores row of every rank of a call (its positives' rows, one after the other)."""
    m = as_csr(positives, "positives")
    rows = users.cpu() if users is not None else torch.arange(B)
    return torch.repeat_interleave(torch.arange(B), m.indptr[rows + 1] - m.indptr[rows])


# --- the reference against a per-positive Python count -------------------------------------

def python_target_rank(scores, positives, exclude=None, users=None):
    """Straightforward per-positive Python of the contract (DESIGN.md, Op 4)."""
    s = scores.double().tolist()
    out = []
    for b, row in enumerate(s):
        u = int(users[b]) if users is not None else b
        banned = set(exclude[u].indices.tolist()) if exclude is not None else set()
        for p in positives[u].indices.tolist():
            if p in banned:
                out.append(-1)
                continue
            out.append(sum(1 for i in range(len(row)) if i != p and i not in banned
                           and (row[i] > row[p] or (row[i] == row[p] and i < p))))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_users", [False, True])
def test_reference_is_the_contract(seed, with_users):
    case = make_case(6, 23, seed=seed, with_users=with_users, continuous=seed % 3 == 2, p_pos=0.3)
    assert truth(case).tolist() == python_target_rank(**case)


def test_hand_worked_example():
    """Four rows worked out by hand: ties by id, -0.0 == +0.0, -inf ranked, exclusions, excluded positives."""
    inf = float("inf")
    scores = torch.tensor([
        [0.5, 2.0, 0.5, -inf, 2.0, -0.0],    # ranking 1, 4, 0, 2, 5, 3
        [0.0, -0.0, 1.0, 0.0, -inf, 1.0],    # exclude 2: ranking 5, 0, 1, 3, 4
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],      # exclude all but 4 and 1: ranking 1, 4
        [-inf, -inf, -inf, -inf, -inf, -inf],  # exclude 0: ranking 1, 2, 3, 4, 5
        [3.0, 2.0, 1.0, 0.0, -1.0, -2.0],    # no positives
    ])
    exclude = (torch.tensor([0, 0, 1, 5, 6, 6]), torch.tensor([2, 0, 2, 3, 5, 0]))
    positives = (torch.tensor([0, 3, 6, 8, 9, 9]), torch.tensor([0, 3, 5, 1, 2, 4, 0, 4, 5]))
    want = [2, 5, 4, 2, -1, 4, -1, 1, 4]
    for backend in ("reference", "cpu"):
        assert rk.target_rank(scores, positives, exclude=exclude, backend=backend).tolist() == want
    # Without exclusions row 3's last item has the five lower ids before it.
    assert rk.target_rank(scores[3:4], (torch.tensor([0, 1]), torch.tensor([5]))).tolist() == [5]


# --- every backend against the reference ----------------------------------------------

# (B, I): small enough for Triton's interpreter.
SHAPES = [(5, 9), (6, 37)]


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(bd, dtype, shape):
    backend, device = bd
    B, I = shape
    for with_users in (False, True):
        case = make_case(B, I, seed=stable_seed(shape, str(dtype), with_users), dtype=dtype, device=device,
                         with_users=with_users)
        assert_same(rk.target_rank(backend=backend, **case), truth(case), f"{backend} {dtype} users={with_users}")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_larger_cases(seed, dtype):
    """Rows longer than a block of the cpu kernel (1024 items), continuous and tied scores, and rows
    with one, a few and many positives (the per-positive and the sorted path)."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    B, I = 16, 2500
    for p_pos, continuous in ((0.0005, True), (0.004, False), (0.05, True)):
        case = make_case(B, I, seed=seed, dtype=dtype, continuous=continuous, with_users=seed % 2 == 0,
                         p_excl=0.05, p_pos=p_pos, levels=50)
        assert_same(rk.target_rank(backend="cpu", **case), truth(case), f"cpu {dtype} p_pos={p_pos}")


@pytest.mark.parametrize("n_pos", [1, 15, 16, 17, 40])
def test_cpu_both_counting_paths(n_pos):
    """Up to 16 positives a row the cpu kernel counts per positive, beyond it sorts them: both agree
    with the reference at and around the switch, ties with the positives included."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    g = np.random.default_rng(n_pos)
    B, I = 6, 1500
    scores = torch.from_numpy(g.integers(0, 5, (B, I)).astype(np.float32))
    scores[:, 7] = -math.inf
    pos = np.zeros((B, I), dtype=np.float32)
    for b in range(B):
        pos[b, g.choice(I, n_pos, replace=False)] = 1
    pos[0, [0, 7, I - 1]] = 1  # the first item, a -inf score and the last item
    excl = (g.random((B, I)) < 0.1).astype(np.float32)
    case = dict(scores=scores, positives=sp.csr_matrix(pos), exclude=sp.csr_matrix(excl))
    assert_same(rk.target_rank(backend="cpu", **case), truth(case), f"{n_pos} positives")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_finds_nan_anywhere(dtype):
    """A NaN at any column of a 37-item row (whole 16-score steps and the tail of the cpu kernel's
    loop, before and after the positive, in rows with 0, 1, 5 and 19 positives) is refused, naming
    the first NaN's column; one NaN before another is the one named."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    I = 37
    for items in ([], [20], [3, 9, 16, 17, 36], list(range(0, I, 2))):
        n = len(items)
        positives = (torch.tensor([0, n, 2 * n]), torch.tensor(items + items, dtype=torch.int64))
        for col in range(I):
            s = torch.linspace(-1, 1, I, dtype=torch.float64)[None].repeat(2, 1).to(dtype)
            s[1, col] = float("nan")
            s[1, min(col + 5, I - 1)] = float("nan")
            with pytest.raises(ValueError, match=rf"scores row 1 contains NaN \(first at column {col}\)"):
                rk.target_rank(s, positives, backend="cpu")


@pytest.mark.parametrize("bd", backend_params())
def test_csr_forms_and_index_dtypes(bd):
    """scipy, torch sparse CSR and (indptr, indices[, values]) tuples of int32 or int64 give one answer."""
    backend, device = bd
    case = make_case(4, 12, seed=5, device=device, with_users=True)
    want = truth(case)
    forms = {
        "torch-csr": lambda m: torch.from_numpy(m.toarray()).to_sparse_csr().to(device),
        "tuple-int32": lambda m: (torch.from_numpy(m.indptr.astype(np.int32)).to(device),
                                  torch.from_numpy(m.indices.astype(np.int32)).to(device)),
        "tuple-int64": lambda m: (torch.from_numpy(m.indptr.astype(np.int64)).to(device),
                                  torch.from_numpy(m.indices.astype(np.int64)).to(device)),
        "numpy-tuple-values": lambda m: (m.indptr, m.indices, m.data),
        "checked-CSR": lambda m: as_csr(m, "x", device=device),
    }
    for name, form in forms.items():
        for users in (case["users"], case["users"].to(torch.int32), case["users"].cpu().numpy()):
            kw = dict(case, positives=form(case["positives"]), exclude=form(case["exclude"]), users=users)
            assert_same(rk.target_rank(backend=backend, **kw), want, name)


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
    assert_same(rk.target_rank(backend=backend, **{**case, "scores": nc}), truth(case), layout)


@pytest.mark.parametrize("bd", backend_params())
def test_edge_cases(bd):
    backend, device = bd
    run = lambda *a, **kw: rk.target_rank(*a, backend=backend, **kw).cpu().tolist()  # noqa: E731
    t = lambda *xs: tuple(torch.tensor(x, dtype=torch.int64, device=device) for x in xs)  # noqa: E731
    # No rows at all, with and without users.
    assert run(torch.zeros(0, 5, device=device), t([0], [])) == []
    assert run(torch.zeros(0, 5, device=device), t([0, 1], [3]), users=torch.zeros(0, dtype=torch.int64,
                                                                                     device=device)) == []
    # No positives anywhere; no items at all.
    assert run(torch.rand(3, 4, device=device), t([0, 0, 0, 0], [])) == []
    assert run(torch.zeros(2, 0, device=device), t([0, 0, 0], []), exclude=t([0, 0, 0], [])) == []
    with pytest.raises(IndexError, match="out of range for I = 0 items"):
        run(torch.zeros(1, 0, device=device), t([0, 1], [0]))
    # One item: rank 0, or -1 when it is excluded.
    assert run(torch.tensor([[0.3], [-math.inf], [1.0]], device=device), t([0, 1, 1, 2], [0, 0]),
               exclude=t([0, 0, 0, 1], [0])) == [0, -1]
    # A row whose every item is excluded: its positives are all -1; the next row is unaffected.
    s = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], device=device)
    assert run(s, t([0, 3, 4], [0, 1, 2, 0]), exclude=t([0, 3, 3], [0, 1, 2])) == [-1, -1, -1, 2]
    # All ties: the rank is the number of rankable lower ids.
    s = torch.zeros(2, 6, device=device)
    assert run(s, t([0, 3, 5], [0, 3, 5, 2, 4]), exclude=t([0, 2, 3], [1, 4, 4])) == [0, 2, 3, 2, -1]
    # -inf positives among -inf and finite scores.
    s = torch.tensor([[-math.inf, 0.0, -math.inf, -math.inf]], device=device)
    assert run(s, t([0, 3], [0, 2, 3])) == [1, 2, 3]
    # The same row twice through users: its ranks twice, in the order of users.
    s = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], device=device)
    assert run(s, t([0, 1, 3], [0, 1, 2]), users=torch.tensor([1, 1], device=device)) == [1, 0, 1, 2]


@pytest.mark.parametrize("bd", backend_params())
def test_bad_rows_that_are_not_read_are_no_error(bd):
    """Rows no call reads are not looked at (as topk_hits): a broken positives row 0 is fine when
    users never names it, and an error when it does."""
    backend, device = bd
    s = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]], device=device)
    pos = (torch.tensor([0, 2, 2, 3], device=device), torch.tensor([5, 2, 0], device=device))
    got = rk.target_rank(s, pos, users=torch.tensor([2, 1], device=device), backend=backend)
    assert got.cpu().tolist() == [0]
    with pytest.raises(IndexError, match=r"positives row 0 \(scores row 1\) has column index 5"):
        rk.target_rank(s, pos, users=torch.tensor([2, 0], device=device), backend=backend)


def test_scores_requiring_grad_are_detached():
    s = torch.rand(3, 8, requires_grad=True)
    out = rk.target_rank(s, (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2])))
    assert not out.requires_grad and out.dtype == torch.int64


def test_cpu_threads_give_identical_results(monkeypatch):
    # Tasks of a thousandth of the usual work, so this small input takes the threaded path (a region
    # runs on one thread below about 1 ms of work; see csrc/cpu/common.h).
    monkeypatch.setenv("REFIT_CPU_GRAIN_SCALE", "0.001")
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    case = make_case(200, 700, seed=9, continuous=True, p_excl=0.1, p_pos=0.02)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rk.target_rank(backend="cpu", **case)
        torch.set_num_threads(max(2, old))
        many = rk.target_rank(backend="cpu", **case)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


def test_dispatcher_prefers_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("REFIT_BACKEND", raising=False)
    assert rk.dispatch.select("target_rank", torch.device("cpu")) == (
        "cpu" if rk.available_backends()["cpu"] is None else "reference")
    case = make_case(3, 10, seed=1)
    assert_same(rk.target_rank(**case), truth(case), "default backend")


# --- the defining property: rank < k exactly when topk_hits counts a hit at k ---------------

def assert_consistent_with_topk_hits(case, backend, kmax=None):
    """For every k in 1..I: per row, the ranked positives with rank < k are topk_hits' hits at k; and
    topk_hits' first_hit (within Kmax) is the smallest rank when it is below Kmax."""
    B, I = case["scores"].shape
    ranks = rk.target_rank(backend=backend, **case).cpu()
    owner = owners(case["positives"], case.get("users"), B)
    ranked = ranks >= 0
    ks = tuple(range(1, I + 1))
    out = rk.topk_hits(ks=ks, backend=backend, **case)
    for k in ks:
        hits = torch.zeros(B, dtype=torch.int64).index_add_(0, owner, (ranked & (ranks < k)).long())
        assert torch.equal(hits, out.hits[:, k - 1].cpu()), f"k = {k}"
    kmax = kmax or I
    first = torch.full((B,), kmax, dtype=torch.int64).scatter_reduce_(
        0, owner[ranked], ranks[ranked], "amin")
    first = torch.where(first < kmax, first, -1)
    want = rk.topk_hits(ks=(kmax,), backend=backend, **case).first_hit.cpu()
    assert torch.equal(first, want), f"first_hit, Kmax = {kmax}"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("seed", range(4))
def test_rank_below_k_is_a_topk_hit(backend, seed):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    g = np.random.default_rng(seed)
    for B, I in ((7, 31), (5, 64)):
        case = make_case(B, I, seed=seed, with_users=seed % 2 == 1, continuous=seed == 3,
                         levels=int(g.integers(1, 6)), p_pos=float(g.uniform(0.05, 0.6)),
                         p_excl=float(g.uniform(0.0, 0.5)), p_ninf=float(g.uniform(0.0, 0.5)))
        assert_consistent_with_topk_hits(case, backend)
        assert_consistent_with_topk_hits(case, backend, kmax=max(1, I // 4))


def test_rank_below_k_is_a_topk_hit_triton():
    if rk.available_backends()["triton"] is not None:
        pytest.skip(rk.available_backends()["triton"])
    device = "cuda" if GPU else "cpu"
    case = make_case(4, 12, seed=11, with_users=True, device=device, p_pos=0.4)
    assert_consistent_with_topk_hits(case, "triton")


# --- property-based: any shape, any density -----------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 8), I=st.integers(1, 80), levels=st.integers(1, 6), p_excl=st.floats(0, 1),
       p_pos=st.floats(0, 1), p_ninf=st.floats(0, 1), with_users=st.booleans(), continuous=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference_on_any_case(B, I, levels, p_excl, p_pos, p_ninf, with_users, continuous, dtype,
                                           seed):
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    case = make_case(B, I, seed=seed, levels=levels, p_excl=p_excl, p_pos=p_pos, p_ninf=p_ninf,
                     with_users=with_users, continuous=continuous, dtype=dtype)
    assert_same(rk.target_rank(backend="cpu", **case), truth(case), "any case")


# --- bad input ----------------------------------------------------------------------------------

def _bad_cases():
    """(id, keyword arguments, exception, regex the message must match)."""
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 3.0]])
    nan = s.clone()
    nan[2, 1] = float("nan")
    good = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]))
    empty = (torch.tensor([0, 0, 0, 0]), torch.tensor([], dtype=torch.int64))
    meta = torch.device("meta")
    return [
        ("int-scores", dict(scores=s.long(), positives=good), TypeError, "scores"),
        ("1d-scores", dict(scores=s[0], positives=good), ValueError, "scores must be 2-D"),
        ("not-a-tensor", dict(scores=s.tolist(), positives=good), TypeError, "scores"),
        ("complex-scores", dict(scores=s.to(torch.complex64), positives=good), TypeError, "scores"),
        ("sparse-csr-scores", dict(scores=s.to_sparse_csr(), positives=good), TypeError, "scores must be a dense"),
        ("meta-scores", dict(scores=s.to(meta), positives=good), ValueError, "scores is a meta tensor"),
        ("nan", dict(scores=nan, positives=good), ValueError, r"scores row 2 contains NaN \(first at column 1\)"),
        ("nan-in-excluded-item", dict(scores=nan, positives=good, exclude=(torch.tensor([0, 0, 0, 1]),
                                                                           torch.tensor([1]))),
         ValueError, "scores row 2 contains NaN"),
        ("nan-in-row-without-positives", dict(scores=nan, positives=empty), ValueError, "scores row 2 contains NaN"),
        ("nan-before-positives", dict(scores=nan, positives=(torch.tensor([0, 1, 2, 4]), torch.tensor([0, 1, 3, 1]))),
         ValueError, "scores row 2 contains NaN"),
        ("exclude-before-nan", dict(scores=nan, positives=good, exclude=(torch.tensor([0, 0, 0, 1]),
                                                                         torch.tensor([4]))),
         IndexError, r"exclude row 2 \(scores row 2\) has column index 4"),
        ("exclude-column-range", dict(scores=s, positives=good, exclude=(torch.tensor([0, 0, 2, 2]),
                                                                         torch.tensor([1, 4]))),
         IndexError, r"exclude row 1 \(scores row 1\) has column index 4, out of range"),
        ("exclude-negative-column", dict(scores=s, positives=good, exclude=(torch.tensor([0, 1, 1, 1]),
                                                                            torch.tensor([-1]))),
         IndexError, r"exclude row 0 .* column index -1"),
        ("exclude-unsorted", dict(scores=s, positives=good, exclude=(torch.tensor([0, 0, 2, 2]),
                                                                     torch.tensor([3, 1]))),
         ValueError, r"exclude row 1 \(scores row 1\) has column index 1 after a larger"),
        ("positives-column-range", dict(scores=s, positives=(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4, 2]))),
         IndexError, r"positives row 1 \(scores row 1\) has column index 4, out of range for I = 4"),
        ("positives-unsorted", dict(scores=s, positives=(torch.tensor([0, 0, 0, 2]), torch.tensor([3, 1]))),
         ValueError, r"positives row 2 \(scores row 2\) has column index 1 after a larger"),
        ("positives-duplicate", dict(scores=s, positives=(torch.tensor([0, 2, 2, 2]), torch.tensor([1, 1]))),
         ValueError, r"positives row 0 .*sorted and unique"),
        ("users-range", dict(scores=s, positives=good, users=torch.tensor([0, 3, 1])),
         IndexError, r"users\[1\] = 3 is out of range for positives with 3 rows"),
        ("users-negative", dict(scores=s, positives=good, exclude=good, users=torch.tensor([0, 1, -1])),
         IndexError, r"users\[2\] = -1 is out of range for exclude"),
        ("rows-without-users", dict(scores=s[:2], positives=good), ValueError,
         "positives has 3 rows but scores has B = 2"),
        ("exclude-rows-without-users", dict(scores=s[:2], positives=(good[0][:3], good[1][:2]), exclude=good),
         ValueError, "exclude has 3 rows but scores has B = 2"),
        ("users-shape", dict(scores=s, positives=good, users=torch.tensor([0, 1])), ValueError, "users"),
        ("users-float", dict(scores=s, positives=good, users=torch.tensor([0.0, 1.0, 2.0])), TypeError, "users"),
        ("users-bool", dict(scores=s, positives=good, users=torch.tensor([False, True, True])), TypeError, "users"),
        ("users-float-numpy", dict(scores=s, positives=good, users=np.array([0.0, 1.0, 2.0])), TypeError, "users"),
        ("users-sparse", dict(scores=s, positives=good, users=torch.tensor([0, 1, 2]).to_sparse()), TypeError,
         "users must be a dense"),
        ("users-device", dict(scores=s, positives=good, users=torch.tensor([0, 1, 2], device=meta)),
         ValueError, "users is on meta"),
        ("positives-device", dict(scores=s, positives=(good[0].to(meta), good[1].to(meta))), ValueError,
         "positives is on meta"),
        ("exclude-device", dict(scores=s, positives=good, exclude=(good[0].to(meta), good[1].to(meta))),
         ValueError, "exclude is on meta"),
        ("csr-columns", dict(scores=s, positives=sp.csr_matrix(np.eye(3, 5))), ValueError,
         "positives: expected 4 columns"),
        ("checked-CSR-columns", dict(scores=s, positives=good, exclude=as_csr(sp.csr_matrix(np.eye(3, 5)), "exclude")),
         ValueError, "exclude: expected 4 columns"),
        ("csr-indptr", dict(scores=s, positives=good, exclude=(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]))),
         ValueError, "exclude: indptr must be non-decreasing"),
        ("indptr-ends-before-nnz", dict(scores=s, positives=(good[0], torch.tensor([0, 1, 2, 3]))), ValueError,
         "positives: indptr must start at 0 and end at nnz = 4"),
        ("positives-float-indices", dict(scores=s, positives=(good[0], good[1].double())), TypeError,
         "positives: indices"),
        ("positives-sparse-part", dict(scores=s, positives=(good[0].to_sparse(), good[1])), TypeError,
         "positives: indptr must be a dense"),
        ("positives-dense", dict(scores=s, positives=torch.eye(3, 4)), TypeError, "positives: expected a CSR matrix"),
        ("positives-missing", dict(scores=s, positives=None), TypeError, "target_rank: positives must be a CSR"),
    ]


BAD = _bad_cases()
#: Cases on arguments topk_hits shares, which it must refuse alike (positives is optional there).
SHARED_BAD = [c for c in BAD if c[0] != "positives-missing"]


@pytest.mark.parametrize("backend", [b for b in rk.BACKENDS if b != "cuda"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_a_clear_error(backend, case):
    _, kwargs, exc, pattern = case
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    with pytest.raises(exc, match=pattern):
        rk.target_rank(backend=backend, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no CUDA device")
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_a_clear_error_cuda(case):
    if rk.available_backends()["cuda"] is not None:
        pytest.skip(rk.available_backends()["cuda"])
    _, kwargs, exc, pattern = case
    cuda = lambda v: v.cuda() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v  # noqa: E731
    moved = {k: (tuple(cuda(t) for t in v) if isinstance(v, tuple) else cuda(v)) for k, v in kwargs.items()}
    if not isinstance(moved.get("scores"), torch.Tensor) or moved["scores"].dtype not in DTYPES:
        moved["scores"] = kwargs["scores"]  # the type errors come before any device question
    with pytest.raises(exc, match=pattern):
        rk.target_rank(backend="cuda", **moved)


def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return type(exc), str(exc)
    return None, ""


@pytest.mark.parametrize("case", SHARED_BAD, ids=[c[0] for c in SHARED_BAD])
def test_refuses_what_topk_hits_refuses(case):
    """Every backend raises the same exception with the same message, and topk_hits, given the same
    arguments, raises that exception with that message (its own name for the op's)."""
    _, kwargs, exc, _ = case
    outcomes = {b: _outcome(lambda b=b: rk.target_rank(backend=b, **kwargs))
                for b in rk.BACKENDS if b != "cuda" and rk.available_backends()[b] is None}
    assert len(set(outcomes.values())) == 1, outcomes
    kind, message = next(iter(outcomes.values()))
    assert kind is exc
    topk_kind, topk_message = _outcome(lambda: rk.topk_hits(ks=1, **kwargs))
    assert topk_kind is kind and topk_message.replace("topk_hits", "target_rank") == message, (topk_message, message)


def _op_cases():
    """Bad plain arguments for the registered ops: static checks and the kernels' own checks."""
    s = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    ptr, idx = torch.tensor([0, 1, 2]), torch.tensor([0, 2])
    meta = torch.device("meta")
    nan = s.clone()
    nan[1, 2] = float("nan")
    a = lambda **kw: {**dict(scores=s, users=None, exclude=None, positives=(ptr, idx)), **kw}  # noqa: E731
    return [
        ("int-scores", a(scores=s.int()), TypeError, "target_rank: scores"),
        ("users-int32", a(users=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "users must be int64"),
        ("users-shape", a(users=torch.tensor([0])), ValueError, r"users must have shape \(B,\) = \(2,\)"),
        ("indptr-device", a(positives=(ptr.to(meta), idx)), ValueError, "positives is on meta"),
        ("indices-int32", a(exclude=(ptr, idx.int())), TypeError, "exclude indices must be int64"),
        ("exclude-without-indices", a(exclude=(ptr, None)), ValueError, "together"),
        ("positives-rows", a(positives=(torch.tensor([0, 2]), idx)), ValueError, "positives has 1 rows"),
        ("indptr-decreasing", a(positives=(torch.tensor([0, 2, 1]), idx)), ValueError,
         r"target_rank: positives row 1 \(scores row 1\) has an invalid indptr range"),
        ("indptr-past-nnz", a(exclude=(torch.tensor([0, 1, 5]), idx)), ValueError, "exclude row 1 .*invalid indptr"),
        ("nan", a(scores=nan), ValueError, "target_rank: scores row 1 contains NaN"),
        ("column-range", a(exclude=(ptr, torch.tensor([0, 3]))), IndexError, "exclude row 1 .*column index 3"),
        ("users-range", a(users=torch.tensor([0, 2])), IndexError, r"users\[1\] = 2"),
    ]


OP_BAD = _op_cases()


@pytest.mark.parametrize("op_name", ["target_rank", "target_rank_triton"])
@pytest.mark.parametrize("case", OP_BAD, ids=[c[0] for c in OP_BAD])
def test_ops_check_their_arguments(op_name, case):
    """The registered ops check too, so calling them directly is as safe as the API."""
    backend = "cpu" if op_name == "target_rank" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    _, kw, exc, pattern = case
    split = lambda c: (None, None) if c is None else c  # noqa: E731
    args = (kw["scores"], kw["users"], *split(kw["exclude"]), *split(kw["positives"]))
    with pytest.raises(exc, match=pattern):
        getattr(torch.ops.refit, op_name)(*args)


def test_raw_op_without_users_keeps_entries_of_no_row_at_minus_one():
    """The ranks sit beside the positives' entries; an indptr that skips entries (refused by the public
    function, not by the raw op, which checks only the rows it reads) leaves them at -1, not garbage."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    s = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    ptr, idx = torch.tensor([1, 2, 3]), torch.tensor([2, 0, 2])
    want = reference.target_rank(s, None, None, None, ptr, idx)
    assert want.tolist() == [-1, 2, 2]
    assert torch.equal(torch.ops.refit.target_rank(s, None, None, None, ptr, idx), want)


# --- torch.library integration ---------------------------------------------------------------

@pytest.mark.parametrize("op_name", ["target_rank", "target_rank_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("args_kind", ["all-arguments", "positives-only", "users"])
def test_opcheck(op_name, dtype, args_kind):
    backend = "cpu" if op_name == "target_rank" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    case = make_case(3, 11, seed=3, dtype=dtype, with_users=args_kind == "users")
    if args_kind == "positives-only":
        case.pop("exclude")
    torch.library.opcheck(getattr(torch.ops.refit, op_name).default, plain_args(**case))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    case = make_case(4, 13, seed=7)
    pos = as_csr(case["positives"], "positives")
    ex = as_csr(case["exclude"], "exclude")

    def reward(scores):
        # A dense reward: the reciprocal rank of each target over the full ranking.
        rank = rk.target_rank(scores, (pos.indptr, pos.indices), exclude=(ex.indptr, ex.indices), backend=backend)
        return torch.where(rank >= 0, 1.0 / (rank + 1.0), 0.0)

    compiled = torch.compile(reward, fullgraph=True)
    torch.testing.assert_close(compiled(case["scores"]), reward(case["scores"]))
