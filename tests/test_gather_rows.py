"""gather_rows: every backend against the reference, exactly, on random CSR matrices.

Exactness: values and weights are small dyadic rationals (k/8, k/4), so every
product and partial sum is exact in float32 whatever the order of the
additions; the float32 result then equals the float64 truth, and a 16-bit
result equals the truth rounded once. Random real-valued data is compared
with a rounding-error bound instead (test_float_values_within_rounding).
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit_kernels as rk
from refit_kernels import reference
from refit_kernels.sparse import as_csr

from _testing import backend_params, describe_mismatch

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_csr(n_rows, n_cols, density=0.2, seed=0, empty_every=4, dup_cols=False, index_dtype=np.int64):
    """A CSR matrix (indptr, indices, values) with dyadic values; every empty_every-th row empty.

    Columns are sorted and unique per row unless dup_cols, which repeats some.
    """
    rng = np.random.default_rng(seed)
    indptr, indices = [0], []
    for r in range(n_rows):
        if empty_every and r % empty_every == 1:
            cols = np.empty(0, dtype=np.int64)
        else:
            k = rng.binomial(n_cols, density) if n_cols else 0
            cols = np.sort(rng.choice(n_cols, size=k, replace=False)) if k else np.empty(0, dtype=np.int64)
            if dup_cols and k:
                cols = np.sort(np.concatenate([cols, rng.choice(cols, size=1 + k // 3)]))
        indices.extend(cols.tolist())
        indptr.append(len(indices))
    nnz = len(indices)
    values = rng.integers(1, 17, size=nnz) * rng.choice([-1, 1], size=nnz) / 8.0
    return (torch.from_numpy(np.asarray(indptr, dtype=index_dtype)),
            torch.from_numpy(np.asarray(indices, dtype=index_dtype)),
            torch.from_numpy(values.astype(np.float32)))


def random_segments(n_rows, B, max_len=6, seed=0):
    """rows, (B+1,) offsets and dyadic weights: some segments empty, some repeating a row."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_len + 1, size=B)
    lens[::5] = 0  # empty segments
    seg = np.concatenate([[0], np.cumsum(lens)])
    rows = rng.integers(0, n_rows, size=int(seg[-1]))
    for b in range(B):  # a row twice in one segment
        if lens[b] >= 2:
            rows[seg[b] + 1] = rows[seg[b]]
            break
    weights = rng.integers(-8, 9, size=rows.shape[0]) / 4.0
    return (torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(seg.astype(np.int64)),
            torch.from_numpy(weights.astype(np.float32)))


def truth(indptr, indices, values, rows, segments, weights, n_cols, dtype):
    """The float64 reference, rounded once to dtype."""
    v = None if values is None else values.double()
    w = None if weights is None else weights.double()
    exact = reference.gather_rows(indptr, indices, v, rows, segments, w, n_cols, torch.float64)
    return exact.to(dtype)


def to_device(t, device):
    return None if t is None else t.to(device)


def assert_same(actual, expected, what=""):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual.cpu(), expected.cpu()), f"{what}: results differ\n{describe_mismatch(actual.cpu(), expected.cpu())}"


# --- exact agreement --------------------------------------------------------------

@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "implicit"])
@pytest.mark.parametrize("index_dtype", [np.int64, np.int32], ids=["int64", "int32"])
def test_plain_matches_reference(bd, dtype, with_values, index_dtype):
    backend, device = bd
    n_rows, n_cols = 23, 37
    indptr, indices, values = random_csr(n_rows, n_cols, seed=1, index_dtype=index_dtype)
    values = values if with_values else None
    rows = torch.tensor([0, 1, 5, 5, 22, 13, 1, 8, 3])  # repeats and empty rows (1, 5, 13)
    matrix = tuple(to_device(t, device) for t in (indptr, indices, values))
    got = rk.gather_rows(matrix, rows.to(device), dtype=dtype, backend=backend, n_cols=n_cols)
    want = truth(indptr, indices, values, rows, None, None, n_cols, dtype)
    assert_same(got, want, backend)
    if not with_values:  # the dense rows of a 0/1 matrix
        dense = torch.zeros(n_rows, n_cols)
        dense[torch.repeat_interleave(torch.arange(n_rows), indptr[1:] - indptr[:-1]), indices.long()] = 1
        assert torch.equal(got.cpu().float(), dense[rows])


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "implicit"])
@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "unweighted"])
def test_segmented_matches_reference(bd, dtype, with_values, with_weights):
    backend, device = bd
    n_rows, n_cols = 31, 45
    indptr, indices, values = random_csr(n_rows, n_cols, seed=2)
    rows, seg, weights = random_segments(n_rows, B=12, seed=3)
    values = values if with_values else None
    weights = weights if with_weights else None
    matrix = tuple(to_device(t, device) for t in (indptr, indices, values))
    got = rk.gather_rows(matrix, rows.to(device), segments=seg.to(device), weights=to_device(weights, device),
                         dtype=dtype, backend=backend, n_cols=n_cols)
    want = truth(indptr, indices, values, rows, seg, weights, n_cols, dtype)
    assert (seg[1:] == seg[:-1]).any(), "the case must include empty segments"
    assert_same(got, want, backend)
    # Against an independent formulation: a sparse (B x n_rows) weight matrix times A.
    A = sp.csr_matrix(((values.numpy() if values is not None else np.ones(indices.shape[0])),
                       indices.numpy(), indptr.numpy()), shape=(n_rows, n_cols))
    w = weights.numpy() if weights is not None else np.ones(rows.shape[0])
    W = sp.csr_matrix((w, rows.numpy(), seg.numpy()), shape=(seg.shape[0] - 1, n_rows))
    np.testing.assert_array_equal(got.cpu().float().numpy(),
                                  torch.from_numpy((W @ A).toarray()).to(dtype).float().numpy())


@pytest.mark.parametrize("bd", backend_params())
def test_duplicate_columns_in_a_row_add_up(bd):
    backend, device = bd
    indptr, indices, values = random_csr(17, 20, density=0.4, seed=4, dup_cols=True)
    assert any(len(set(indices[a:b].tolist())) < b - a for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist()))
    rows, seg, weights = random_segments(17, B=9, seed=5)
    matrix = tuple(to_device(t, device) for t in (indptr, indices, values))
    got = rk.gather_rows(matrix, rows.to(device), segments=seg.to(device), weights=weights.to(device),
                         backend=backend, n_cols=20)
    assert_same(got, truth(indptr, indices, values, rows, seg, weights, 20, torch.float32), backend)


@pytest.mark.parametrize("bd", backend_params())
def test_float_values_within_rounding(bd):
    """Real-valued data: float32 sums within their rounding bound of the float64 truth."""
    backend, device = bd
    n_rows, n_cols = 40, 64
    indptr, indices, _ = random_csr(n_rows, n_cols, density=0.5, seed=6, empty_every=0)
    g = torch.Generator().manual_seed(6)
    values = torch.randn(indices.shape[0], generator=g)
    rows, seg, _ = random_segments(n_rows, B=10, max_len=12, seed=7)
    weights = torch.rand(rows.shape[0], generator=g) + 0.1
    matrix = tuple(to_device(t, device) for t in (indptr, indices, values))
    got = rk.gather_rows(matrix, rows.to(device), segments=seg.to(device), weights=weights.to(device),
                         backend=backend, n_cols=n_cols).cpu()
    exact = reference.gather_rows(indptr, indices, values.double(), rows, seg, weights.double(), n_cols, torch.float64)
    scale = reference.gather_rows(indptr, indices, values.double().abs(), rows, seg, weights.double(), n_cols,
                                  torch.float64)
    m = int((seg[1:] - seg[:-1]).max())
    # m additions (and one product per term), each rounding by at most eps * partial sum.
    bound = (m + 1) * torch.finfo(torch.float32).eps * scale
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), describe_mismatch(got, exact)


@pytest.mark.parametrize("bd", backend_params())
def test_empty_shapes(bd):
    backend, device = bd
    indptr, indices, values = (t.to(device) for t in random_csr(6, 5, seed=8))
    m = (indptr, indices, values)
    rows = torch.tensor([0, 2], device=device)
    assert rk.gather_rows(m, rows[:0], backend=backend, n_cols=5).shape == (0, 5)
    # Only empty segments: zero rows.
    out = rk.gather_rows(m, rows[:0], segments=torch.zeros(4, dtype=torch.int64, device=device),
                         backend=backend, n_cols=5)
    assert torch.equal(out.cpu(), torch.zeros(3, 5))
    # No columns.
    empty = (torch.zeros(7, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
    assert rk.gather_rows(empty, rows, backend=backend, n_cols=0).shape == (2, 0)
    # No stored entries at all.
    assert torch.equal(rk.gather_rows(empty, rows, backend=backend, n_cols=4).cpu(), torch.zeros(2, 4))


# --- the out= buffer ------------------------------------------------------------------

@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "row-slice", "transposed"])
def test_out_is_overwritten_in_place(bd, dtype, layout):
    backend, device = bd
    n_rows, n_cols = 19, 29
    indptr, indices, values = random_csr(n_rows, n_cols, seed=9)
    rows, seg, weights = random_segments(n_rows, B=8, seed=10)
    if layout == "contiguous":
        out = torch.empty(8, n_cols, dtype=dtype, device=device)
    elif layout == "row-slice":  # every other row of a wider buffer
        out = torch.empty(16, n_cols + 3, dtype=dtype, device=device)[::2, 1:n_cols + 1]
    else:  # column-major
        out = torch.empty(n_cols, 8, dtype=dtype, device=device).t()
    out.fill_(float("nan"))  # stale contents must vanish, empty segments included
    ptr = out.data_ptr()
    matrix = tuple(to_device(t, device) for t in (indptr, indices, values))
    got = rk.gather_rows(matrix, rows.to(device), segments=seg.to(device), weights=weights.to(device),
                         dtype=dtype, out=out, backend=backend)
    assert got is out and out.data_ptr() == ptr
    assert_same(out, truth(indptr, indices, values, rows, seg, weights, n_cols, dtype), backend)
    # Reused for another batch: nothing of the first remains.
    rows2 = torch.arange(8) % n_rows
    rk.gather_rows(matrix, rows2.to(device), dtype=dtype, out=out, backend=backend)
    assert_same(out, truth(indptr, indices, values, rows2, None, None, n_cols, dtype), backend)


def test_out_gives_the_column_count():
    indptr, indices, values = random_csr(5, 7, seed=11)
    out = torch.empty(2, 7)
    rk.gather_rows((indptr, indices), [4, 0], out=out)
    assert_same(out, truth(indptr, indices, None, torch.tensor([4, 0]), None, None, 7, torch.float32))


# --- input forms ----------------------------------------------------------------------

def test_every_matrix_form_gives_the_same_rows():
    rng = np.random.default_rng(12)
    A = sp.random(30, 25, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    A.data[:] = np.round(A.data * 8) / 8 + 0.125
    rows = np.array([29, 0, 3, 3, 17])
    want = torch.from_numpy(A[rows].toarray())
    assert A.indices.dtype == np.int32  # scipy's own index type
    forms = {
        "scipy csr_matrix": A,
        "scipy csr_array": sp.csr_array(A),
        "torch sparse_csr": torch.sparse_csr_tensor(torch.from_numpy(A.indptr).long(), torch.from_numpy(A.indices).long(),
                                                    torch.from_numpy(A.data), size=A.shape),
        "tuple of arrays": (A.indptr, A.indices, A.data),
        "tuple of tensors": (torch.from_numpy(A.indptr), torch.from_numpy(A.indices), torch.from_numpy(A.data)),
        "float64 values": sp.csr_matrix(A, dtype=np.float64),
    }
    for name, m in forms.items():
        for r in (rows, torch.from_numpy(rows), rows.tolist(), torch.from_numpy(rows).int()):
            for backend in ("reference", "cpu"):
                got = rk.gather_rows(m, r, n_cols=25, backend=backend)
                assert torch.equal(got, want), f"{name}, rows as {type(r).__name__}, {backend}"


def test_scipy_indices_are_used_without_conversion():
    A = sp.random(10, 8, density=0.5, format="csr", dtype=np.float32, random_state=0)
    csr = as_csr(A, "matrix", index_dtype=None)
    assert csr.indptr.dtype == torch.int32 and csr.indices.data_ptr() == A.indices.ctypes.data
    assert as_csr(A, "matrix").indptr.dtype == torch.int64  # the default is unchanged
    mixed = (torch.from_numpy(A.indptr).long(), torch.from_numpy(A.indices))
    assert as_csr(mixed, "matrix", index_dtype=None, n_cols=8).indices.dtype == torch.int64


@pytest.fixture
def small_grain(monkeypatch):
    """Tasks of a thousandth of the usual work, so these small inputs take the threaded paths (a
    region runs on one thread below about 1 ms of work; see csrc/cpu/common.h)."""
    monkeypatch.setenv("REFIT_CPU_GRAIN_SCALE", "0.001")


def test_cpu_threads_give_identical_results(small_grain):
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    indptr, indices, _ = random_csr(300, 500, density=0.1, seed=13, empty_every=0)
    values = torch.randn(indices.shape[0], generator=torch.Generator().manual_seed(1))
    rows, seg, _ = random_segments(300, B=400, max_len=20, seed=14)
    weights = torch.rand(rows.shape[0], generator=torch.Generator().manual_seed(2))
    plain = torch.arange(290).flip(0)  # fewer gathered rows than the matrix has: the fused path
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, old)):
            torch.set_num_threads(threads)
            results.append((
                rk.gather_rows((indptr, indices, values), rows, segments=seg, weights=weights, n_cols=500,
                               backend="cpu"),
                rk.gather_rows((indptr, indices, values), plain, n_cols=500, dtype=torch.bfloat16, backend="cpu")))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert_same(results[1][1], truth(indptr, indices, values, plain, None, None, 500, torch.bfloat16))


def test_cpu_threads_check_everything_before_anyone_writes(small_grain):
    """A bad row id in the last thread's share stops every thread before it writes."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    indptr, indices, values = random_csr(300, 500, density=0.1, seed=24, empty_every=0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, old))
        for bad_at, cols in ((280, False), (0, False), (150, True)):
            rows = torch.arange(290)
            m = (indptr, indices, values)
            if cols:  # a bad column id instead
                bad_indices = indices.clone()
                bad_indices[indptr[rows[bad_at]]] = 500
                m = (indptr, bad_indices, values)
            else:
                rows[bad_at] = 300
            out = torch.full((290, 500), 7.0)
            with pytest.raises(IndexError, match=rf"rows\[{bad_at}\]"):
                rk.gather_rows(m, rows, out=out, backend="cpu")
            assert bool((out == 7.0).all())
    finally:
        torch.set_num_threads(old)


# --- bad input ---------------------------------------------------------------------------

def _bad_index_cases():
    indptr, indices, values = random_csr(6, 5, seed=15, empty_every=0)
    m = (indptr, indices, values)
    bad_cols = indices.clone()
    bad_cols[indptr[3]] = 5  # row 3: a column == n_cols
    neg_cols = indices.clone()
    neg_cols[indptr[4]] = -1
    return [
        ("row-too-large", m, [0, 1, 6], None, IndexError, r"rows\[2\] = 6"),
        ("row-negative", m, [0, -1], None, IndexError, r"rows\[1\] = -1"),
        ("column-too-large", (indptr, bad_cols, values), [0, 3], None, IndexError, "matrix has column index 5"),
        ("column-negative", (indptr, neg_cols, values), [4], None, IndexError, "matrix has column index -1"),
        ("segments-end", m, [0, 1, 2], [0, 2], ValueError, "segments must start at 0 and end at len"),
        ("segments-start", m, [0, 1, 2], [1, 3], ValueError, "segments must start at 0"),
        ("segments-decrease", m, [0, 1, 2], [0, 2, 1, 3], ValueError, "segments must be non-decreasing"),
    ]


BAD_INDEX = _bad_index_cases()


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("case", BAD_INDEX, ids=[c[0] for c in BAD_INDEX])
def test_bad_indices_raise_before_writing(bd, case):
    backend, device = bd
    _, m, rows, seg, exc, msg = case
    m = tuple(t.to(device) for t in m)
    rows = torch.tensor(rows, device=device)
    seg = None if seg is None else torch.tensor(seg, device=device)
    B = rows.shape[0] if seg is None else seg.shape[0] - 1
    out = torch.full((B, 5), 7.0, device=device)
    with pytest.raises(exc, match=msg):
        rk.gather_rows(m, rows, segments=seg, out=out, backend=backend)
    assert bool((out == 7.0).all()), "out was written before the error"


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("repeats", [1, 50], ids=["few-rows", "more-entries-than-the-matrix"])
def test_only_the_rows_read_are_checked(bd, repeats):
    """A bad column id in a row that is not gathered is no error; in a gathered one it is.

    With many repeats the gathered rows hold more entries than the matrix, and
    the cpu kernel checks the whole matrix once instead of each gathered row.
    """
    backend, device = bd
    indptr, indices, values = random_csr(6, 5, seed=23, empty_every=0)
    indices = indices.clone()
    indices[indptr[3]] = 9  # row 3 is broken
    m = tuple(t.to(device) for t in (indptr, indices, values))
    good = torch.tensor([0, 1, 5, 2] * repeats, device=device)
    assert int((indptr[good.cpu() + 1] - indptr[good.cpu()]).sum()) > (indices.shape[0] if repeats > 1 else 0)
    got = rk.gather_rows(m, good, n_cols=5, backend=backend)
    assert_same(got, truth(indptr, indices, values, good.cpu(), None, None, 5, torch.float32))
    bad = torch.cat([good, torch.tensor([4, 3, 3], device=device)])
    with pytest.raises(IndexError, match=rf"column index 9 .*rows\[{good.shape[0] + 1}\]"):
        rk.gather_rows(m, bad, n_cols=5, backend=backend)
    seg = torch.tensor([0, bad.shape[0]], device=device)
    with pytest.raises(IndexError, match="column index 9"):
        rk.gather_rows(m, bad, segments=seg, n_cols=5, backend=backend)


@pytest.mark.parametrize("case", BAD_INDEX, ids=[c[0] for c in BAD_INDEX])
def test_registered_op_checks_indices(case):
    """Calling torch.ops.refit.gather_rows directly is as safe as the API."""
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    _, (indptr, indices, values), rows, seg, exc, msg = case
    seg = None if seg is None else torch.tensor(seg)
    with pytest.raises(exc, match=msg):
        torch.ops.refit.gather_rows(indptr, indices, values, torch.tensor(rows), seg, None, 5, torch.float32)


@pytest.mark.parametrize("indptr", [[0, 2, 9, 9], [0, 3, 1, 4], [0, -1, 2, 4]], ids=["past-nnz", "decreasing", "negative"])
def test_registered_op_checks_indptr_of_the_rows_it_reads(indptr):
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    indices = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="matrix indptr of row"):
        torch.ops.refit.gather_rows(torch.tensor(indptr), indices, None, torch.tensor([0, 1, 2]), None, None, 5,
                                    torch.float32)
    for backend in ("reference", "triton"):
        if rk.available_backends()[backend] is None:
            with pytest.raises(ValueError, match="matrix indptr of row"):
                rk.gather_rows((torch.tensor(indptr), indices), [0, 1, 2], n_cols=5, backend=backend)


def test_public_api_rejects_a_bad_indptr_too():
    indices = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="matrix indptr of row 1"):
        rk.gather_rows((torch.tensor([0, 2, 9, 9]), indices), [1], n_cols=5)


def _aliased(part: str):
    """A matrix, rows, weights and an out whose memory overlaps ``part`` (the issue's repro for values)."""
    buf = torch.arange(16, dtype=torch.float32)
    values = buf[:8]
    indptr, indices = torch.tensor([0, 4, 8]), torch.tensor([0, 1, 2, 3] * 2)
    rows, weights = torch.tensor([1, 0]), torch.tensor([1.0, 2.0])
    out = values.view(2, 4)
    if part == "matrix values, partly":
        out = buf[6:14].view(2, 4)
    elif part == "matrix indices":
        out = indices.view(torch.float32)[:8].view(2, 4)
    elif part == "matrix indptr":
        big = torch.zeros(8, dtype=torch.int64)
        big[:3] = indptr
        indptr = big[:3]
        out = big.view(torch.float32)[:8].view(2, 4)
    elif part == "rows":
        big = torch.zeros(4, dtype=torch.int64)
        big[:2] = rows
        rows = big[:2]
        out = big.view(torch.float32).view(2, 4)
    elif part == "weights":
        wbuf = torch.zeros(8)
        wbuf[:2] = weights
        weights = wbuf[:2]
        out = wbuf.view(2, 4)
    elif part == "values through another storage":  # two torch.from_numpy of one array: two storages
        arr = np.arange(8, dtype=np.float32)
        values = torch.from_numpy(arr)
        out = torch.from_numpy(arr.reshape(2, 4))
    return (indptr, indices, values), rows, weights, out


ALIASED = ["matrix values", "matrix values, partly", "matrix indices", "matrix indptr", "rows", "weights",
           "values through another storage"]


@pytest.mark.parametrize("backend", list(rk.BACKENDS))
@pytest.mark.parametrize("part", ALIASED)
def test_out_overlapping_an_input_is_refused(backend, part):
    """An out that shares memory with an input is refused alike by every backend, before anything runs.

    Before, the cpu kernel returned wrong rows and the triton kernel zeros
    when out was a view of the matrix's values (only the reference was right).
    """
    matrix, rows, weights, out = _aliased(part)
    before = out.clone()
    with pytest.raises(ValueError, match="gather_rows: out shares memory with "):
        rk.gather_rows(matrix, rows, weights=weights, out=out, backend=backend)
    assert torch.equal(out, before), "out was written"


def test_out_overlap_check_names_the_input():
    for part, name in (("matrix values", "matrix values"), ("matrix indices", "matrix indices"),
                       ("matrix indptr", "matrix indptr"), ("rows", "rows"), ("weights", "weights")):
        matrix, rows, weights, out = _aliased(part)
        with pytest.raises(ValueError, match=f"out shares memory with {name};"):
            rk.gather_rows(matrix, rows, weights=weights, out=out)


@pytest.mark.parametrize("op_name", ["gather_rows_out", "gather_rows_out_triton"])
def test_registered_out_ops_refuse_aliasing_too(op_name):
    backend = "cpu" if op_name == "gather_rows_out" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    for part in ALIASED:
        (indptr, indices, values), rows, weights, out = _aliased(part)
        before = out.clone()
        with pytest.raises(ValueError, match="out shares memory with "):
            getattr(torch.ops.refit, op_name)(indptr, indices, values, rows, None, weights, 4, out)
        assert torch.equal(out, before), part


@pytest.mark.parametrize("bd", backend_params())
def test_out_next_to_an_input_is_fine(bd):
    """Adjacent, non-overlapping slices of one buffer are no aliasing."""
    backend, device = bd
    buf = torch.zeros(16, device=device)
    values = buf[8:]
    values.copy_(torch.arange(8.0))
    matrix = (torch.tensor([0, 4, 8], device=device), torch.tensor([0, 1, 2, 3] * 2, device=device), values)
    got = rk.gather_rows(matrix, torch.tensor([1, 0], device=device), out=buf[:8].view(2, 4), backend=backend)
    assert torch.equal(got.cpu(), torch.tensor([[4.0, 5, 6, 7], [0, 1, 2, 3]]))


@pytest.mark.parametrize("bd", backend_params())
def test_zero_row_matrix(bd):
    """A matrix without rows: an empty gather works, any row id is an IndexError, alike on every backend."""
    backend, device = bd
    empty = (torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
    assert rk.gather_rows(empty, torch.zeros(0, dtype=torch.int64, device=device), n_cols=3,
                          backend=backend).shape == (0, 3)
    for rows in ([0], [-1], [3, 0]):
        with pytest.raises(IndexError, match=rf"gather_rows: rows\[0\] = {rows[0]} is out of range for a matrix "
                                             "with 0 rows"):
            rk.gather_rows(empty, torch.tensor(rows, device=device), n_cols=3, backend=backend)


def _bad_arg_cases():
    indptr, indices, values = random_csr(6, 5, seed=16)
    m = (indptr, indices, values)
    rows = torch.tensor([0, 1, 2])
    return [
        ("no-column-count", dict(matrix=(indptr, indices), rows=rows), ValueError, "n_cols"),
        ("column-count-mismatch", dict(matrix=sp.csr_matrix(np.eye(6, 5)), rows=rows, n_cols=4), ValueError, "columns"),
        ("float-rows", dict(matrix=m, rows=torch.tensor([0.0, 1.0]), n_cols=5), TypeError, "rows"),
        ("2d-rows", dict(matrix=m, rows=rows[None], n_cols=5), ValueError, "rows"),
        ("rows-object", dict(matrix=m, rows="0,1", n_cols=5), TypeError, "rows"),
        ("segments-2d", dict(matrix=m, rows=rows, segments=torch.zeros(2, 2, dtype=torch.int64), n_cols=5), ValueError,
         "segments"),
        ("segments-float", dict(matrix=m, rows=rows, segments=torch.tensor([0.0, 3.0]), n_cols=5), TypeError, "segments"),
        ("weights-shape", dict(matrix=m, rows=rows, weights=torch.ones(2), n_cols=5), ValueError, "weights"),
        ("weights-int", dict(matrix=m, rows=rows, weights=torch.ones(3, dtype=torch.int64), n_cols=5), TypeError,
         "weights"),
        ("weights-grad", dict(matrix=m, rows=rows, weights=torch.ones(3, requires_grad=True), n_cols=5), ValueError,
         "not differentiable"),
        ("dtype-float64", dict(matrix=m, rows=rows, dtype=torch.float64, n_cols=5), TypeError, "dtype"),
        ("out-shape", dict(matrix=m, rows=rows, out=torch.empty(3, 4), n_cols=5), ValueError, "out"),
        ("out-dtype", dict(matrix=m, rows=rows, out=torch.empty(3, 5, dtype=torch.float16), n_cols=5), ValueError,
         "dtype=torch.float16"),
        ("out-int", dict(matrix=m, rows=rows, out=torch.empty(3, 5, dtype=torch.int32), n_cols=5), TypeError, "out"),
        ("out-expanded", dict(matrix=m, rows=rows, out=torch.empty(1, 5).expand(3, 5), n_cols=5), ValueError, "out"),
        ("matrix-dense", dict(matrix=torch.zeros(6, 5), rows=rows), TypeError, "matrix"),
        ("matrix-int-values", dict(matrix=(indptr, indices, torch.ones(indices.shape[0], dtype=torch.int64)), rows=rows,
                                   n_cols=5), TypeError, "matrix"),
        ("rows-other-device", dict(matrix=m, rows=rows.to("meta"), n_cols=5), ValueError, "rows"),
        # Floats and bools are never truncated into ids or sizes.
        ("float-rows-list", dict(matrix=m, rows=[0.9, 2.7], n_cols=5), TypeError, "rows must hold ints, got 0.9"),
        ("float-rows-mixed", dict(matrix=m, rows=[0, 2.0], n_cols=5), TypeError, "rows must hold ints"),
        ("bool-rows-list", dict(matrix=m, rows=[True, False], n_cols=5), TypeError, "rows must hold ints"),
        ("bool-rows-tensor", dict(matrix=m, rows=torch.tensor([True, False]), n_cols=5), TypeError, "rows"),
        ("float-rows-numpy", dict(matrix=m, rows=np.array([0.0, 1.0]), n_cols=5), TypeError, "rows"),
        ("bool-rows-numpy", dict(matrix=m, rows=np.array([True, False]), n_cols=5), TypeError, "rows"),
        ("object-rows-numpy", dict(matrix=m, rows=np.array([0, None]), n_cols=5), TypeError, "rows"),
        ("float-segments-list", dict(matrix=m, rows=rows, segments=[0, 1.5, 3], n_cols=5), TypeError, "segments"),
        ("float-n_cols", dict(matrix=m, rows=rows, n_cols=3.9), TypeError, "n_cols must be an int"),
        ("integral-float-n_cols", dict(matrix=m, rows=rows, n_cols=5.0), TypeError, "n_cols must be an int"),
        ("bool-n_cols", dict(matrix=m, rows=rows, n_cols=True), TypeError, "n_cols must be an int"),
        ("float-indptr", dict(matrix=(indptr.double(), indices), rows=rows, n_cols=5), TypeError, "matrix: indptr"),
        ("float-indices-numpy", dict(matrix=(indptr.numpy(), indices.numpy().astype(np.float64)), rows=rows, n_cols=5),
         TypeError, "matrix: indices"),
        ("list-indptr", dict(matrix=(indptr.tolist(), indices.tolist()), rows=rows, n_cols=5), TypeError,
         "matrix: indptr"),
        # Layouts and devices the kernels cannot read.
        ("matrix-meta", dict(matrix=torch.sparse_csr_tensor(indptr, indices, values, (6, 5)).to("meta"), rows=rows),
         ValueError, "matrix: indptr is a meta tensor"),
        ("matrix-meta-tuple", dict(matrix=tuple(t.to("meta") for t in m), rows=rows.to("meta"), n_cols=5),
         ValueError, "matrix: indptr is a meta tensor"),
        ("matrix-sparse-parts", dict(matrix=(indptr.to_sparse(), indices, values), rows=rows, n_cols=5), TypeError,
         "matrix: indptr must be a dense"),
        ("rows-sparse", dict(matrix=m, rows=rows.to_sparse(), n_cols=5), TypeError, "rows must be a dense"),
        ("segments-sparse", dict(matrix=m, rows=rows, segments=torch.tensor([0, 3]).to_sparse(), n_cols=5),
         TypeError, "segments must be a dense"),
        ("weights-sparse", dict(matrix=m, rows=rows, weights=torch.ones(3).to_sparse(), n_cols=5), TypeError,
         "weights must be a dense"),
        ("weights-complex", dict(matrix=m, rows=rows, weights=torch.ones(3, dtype=torch.complex64), n_cols=5),
         TypeError, "weights"),
        ("values-complex", dict(matrix=(indptr, indices, values.to(torch.complex64)), rows=rows, n_cols=5),
         TypeError, "matrix: values must be floating"),
        ("out-sparse", dict(matrix=m, rows=rows, out=torch.zeros(3, 5).to_sparse_csr(), n_cols=5), TypeError,
         "out must be a dense"),
        ("out-meta", dict(matrix=m, rows=rows, out=torch.empty(3, 5, device="meta"), n_cols=5), ValueError, "out"),
        # A broken indptr anywhere in the matrix, whichever rows are read (the message of topk_hits too).
        ("indptr-ends-before-nnz", dict(matrix=(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2, 0, 2])), rows=[0, 1],
                                        n_cols=5), ValueError, r"matrix: indptr must start at 0 and end at nnz = 5"),
        ("indptr-decreasing-unread-row", dict(matrix=(torch.tensor([0, 2, 1, 3, 3]), torch.tensor([0, 1, 2])),
                                              rows=[0], n_cols=5), ValueError,
         r"matrix: indptr must be non-decreasing .*row 1 gives the entries 2 .. 1"),
        ("indptr-starts-above-0", dict(matrix=(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])), rows=[1],
                                       n_cols=5), ValueError, "matrix: indptr must start at 0"),
    ]


BAD_ARGS = _bad_arg_cases()


@pytest.mark.parametrize("backend", list(rk.BACKENDS))
@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_name_the_argument(backend, case):
    _, kwargs, exc, msg = case
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=msg):
        rk.gather_rows(kwargs.pop("matrix"), kwargs.pop("rows"), backend=backend, **kwargs)


@pytest.mark.parametrize("op_name", ["gather_rows", "gather_rows_triton"])
def test_ops_check_their_arguments(op_name):
    backend = "cpu" if op_name == "gather_rows" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    op = getattr(torch.ops.refit, op_name)
    indptr, indices, values = random_csr(6, 5, seed=17)
    rows = torch.tensor([0, 1])
    cases = [
        ((indptr.float(), indices, None, rows, None, None, 5, torch.float32), TypeError, "indptr"),
        ((indptr, indices.int(), None, rows, None, None, 5, torch.float32), TypeError, "indices"),
        ((indptr, indices, values.double(), rows, None, None, 5, torch.float32), TypeError, "values"),
        ((indptr, indices, values[:-1], rows, None, None, 5, torch.float32), ValueError, "values"),
        ((indptr, indices, None, rows.int(), None, None, 5, torch.float32), TypeError, "rows"),
        ((indptr, indices, None, rows, None, torch.ones(3), 5, torch.float32), ValueError, "weights"),
        ((indptr, indices, None, rows, None, None, -1, torch.float32), ValueError, "n_cols"),
        ((indptr, indices, None, rows, None, None, 5, torch.float64), TypeError, "dtype"),
        ((indptr, indices, None, rows, torch.tensor([0, 1]), None, 5, torch.float32), ValueError, "segments"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            op(*args)


# --- torch.library integration ----------------------------------------------------------

def _opcheck_args(with_segments, dtype):
    indptr, indices, values = random_csr(12, 9, seed=18)
    rows, seg, weights = random_segments(12, B=5, seed=19)
    if not with_segments:
        seg, weights = None, None
        rows = torch.tensor([3, 0, 11, 3])
    return indptr, indices, values, rows, seg, weights, 9


@pytest.mark.parametrize("op_name", ["gather_rows", "gather_rows_triton"])
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_segments", [False, True], ids=["plain", "segmented"])
def test_opcheck(op_name, dtype, with_segments):
    backend = "cpu" if op_name == "gather_rows" else "triton"
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    args = _opcheck_args(with_segments, dtype)
    op = getattr(torch.ops.refit, op_name).default
    torch.library.opcheck(op, (*args, dtype))
    B = args[3].shape[0] if args[4] is None else args[4].shape[0] - 1
    out_op = getattr(torch.ops.refit, op_name.replace("gather_rows", "gather_rows_out")).default
    torch.library.opcheck(out_op, (*args, torch.full((B, 9), 3.0, dtype=dtype)))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("use_out", [False, True], ids=["new", "out"])
def test_torch_compile_fullgraph(backend, use_out):
    if rk.available_backends()[backend] is not None:
        pytest.skip(rk.available_backends()[backend])
    indptr, indices, values = random_csr(20, 16, seed=20)
    rows, seg, weights = random_segments(20, B=6, seed=21)
    out = torch.empty(6, 16) if use_out else None

    def profile_scores(ip, ix, v, r, s, w):
        x = rk.gather_rows((ip, ix, v), r, segments=s, weights=w, n_cols=16, out=out, backend=backend)
        return torch.tanh(x).sum(-1)

    compiled = torch.compile(profile_scores, fullgraph=True)
    args = (indptr, indices, values, rows, seg, weights)
    want = profile_scores(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, want)
    want_rows = truth(indptr, indices, values, rows, seg, weights, 16, torch.float32)
    torch.testing.assert_close(got, torch.tanh(want_rows).sum(-1))
    if use_out:
        assert_same(out, want_rows)


# --- property-based ---------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n_rows=st.integers(1, 30), n_cols=st.integers(1, 50), B=st.integers(0, 20), density=st.floats(0.0, 0.6),
       segmented=st.booleans(), with_values=st.booleans(), with_weights=st.booleans(),
       dtype=st.sampled_from(OUT_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_cpu_matches_reference_on_any_input(n_rows, n_cols, B, density, segmented, with_values, with_weights,
                                            dtype, seed):
    if rk.available_backends()["cpu"] is not None:
        pytest.skip(rk.available_backends()["cpu"])
    indptr, indices, values = random_csr(n_rows, n_cols, density=density, seed=seed)
    rows, seg, weights = random_segments(n_rows, B=B, seed=seed + 1)
    if not segmented:
        seg = None
    values = values if with_values else None
    weights = weights if with_weights else None
    got = rk.gather_rows((indptr, indices, values), rows, segments=seg, weights=weights, dtype=dtype,
                         n_cols=n_cols, backend="cpu")
    assert_same(got, truth(indptr, indices, values, rows, seg, weights, n_cols, dtype))
