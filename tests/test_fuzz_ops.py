"""Differential fuzzing: every op's cpu kernel against the reference, on valid and corrupted input.

Each example builds one call from a few drawn choices (sizes, a seed for the
contents, which corruption to apply) and runs it on two backends. Either
both raise, with the same exception class and the same message, or both
return, and then integer outputs (hits, first_hit, indices, target_rank's
ranks, gather_rows with integer-valued values and weights) agree exactly and float outputs within
rounding. Every error must be a TypeError, ValueError or IndexError whose
message starts with the op or the CSR argument it is about: a raw error from
inside torch (an IndexError of some internal gather) fails the test.

Corruptions cover the CSR structure (indptr of the wrong length, not
monotone, not starting at 0 or not ending at nnz), its contents (column ids
out of range or negative, unsorted and duplicate columns), dtypes (float
ids, bools, float indptr), empty matrices, matrices without rows, and bad
ids in every argument that holds ids; the scores hold ties, +-0.0, -inf and
NaN, and k runs up to the number of items. policy_loss draws gaussian_logprob's
trajectories with advantages and PPO's old log-likelihoods, corrupted or
not (extreme values included). target_rank is also checked
against topk_hits on the same calls: the same refusals, and rank < k exactly
where topk_hits counts a hit at k.

Runs are reproducible: hypothesis is derandomized (the same examples every
run) and keeps no example database. The Triton backend runs in its
interpreter on the CPU, which is slow: it is checked against the cpu kernel
on fewer examples (a dozen for topk_hits, whose kernel takes about a second
per call there; 40 for target_rank).
"""

import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import refit_kernels as rk

F32_EPS = torch.finfo(torch.float32).eps


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _usable(backend: str) -> bool:
    return rk.available_backends()[backend] is None


needs_cpu = pytest.mark.skipif(not _usable("cpu"), reason=f"cpu backend unusable: {rk.available_backends()['cpu']}")

# Who an error message may start with: the op, or the CSR argument that as_csr names.
_ERROR_PREFIX = re.compile(
    r"^(gather_rows|topk_hits|target_rank|gaussian_logprob|policy_loss|matrix|exclude|positives|neighbor_sets)\b")


def run(fn):
    """("ok", result) or ("error", exception)."""
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - any exception is an outcome to compare
        return "error", exc


def compare_backends(backends, call, compare, what):
    """Runs ``call(backend)`` on every one of ``backends`` and asserts the same outcome (assert_same_outcome)."""
    assert_same_outcome({b: run(lambda b=b: call(b)) for b in backends}, compare, what)


def assert_same_outcome(outcomes, compare, what):
    """outcomes: {backend: (kind, value)}. Same errors (class and message), or results that compare."""
    (b0, (k0, v0)), *rest = outcomes.items()
    event(f"{what}: " + ("returned" if k0 == "ok" else f"raised {type(v0).__name__}"))  # --hypothesis-show-statistics
    for b1, (k1, v1) in rest:
        if k0 != k1:
            ok, err = (v0, v1) if k0 == "ok" else (v1, v0)
            raise AssertionError(f"{what}: only one of {b0}, {b1} raised: {type(err).__name__}: {err}")
        if k0 == "error":
            assert type(v0) is type(v1), (f"{what}: {b0} raised {type(v0).__name__}: {v0}\n"
                                          f"{b1} raised {type(v1).__name__}: {v1}")
            assert str(v0) == str(v1), f"{what}: messages differ\n{b0}: {v0}\n{b1}: {v1}"
        else:
            compare(v0, v1, f"{what}: {b0} vs {b1}")
    if k0 == "error":
        assert isinstance(v0, (TypeError, ValueError, IndexError)), f"{what}: {type(v0).__name__}: {v0}"
        assert _ERROR_PREFIX.match(str(v0)), f"{what}: an error that names no op or argument: {v0!r}"


# --- CSR matrices, valid or corrupted -------------------------------------------------

CSR_CORRUPTIONS = [
    "indptr-short", "indptr-long", "indptr-not-monotone", "indptr-start", "indptr-end-low", "indptr-end-high",
    "column-too-large", "column-negative", "unsorted", "duplicate", "float-indices", "float-indptr",
    "bool-indices", "int16-indptr", "empty-indptr",
]
ID_CORRUPTIONS = ["too-large", "negative", "float", "bool"]


def draw_bad(draw, targets, valid_share=0.45):
    """(argument, corruption) to apply, or (None, None) for a valid call in about ``valid_share`` of examples.

    One thing is broken at a time, so a disagreement points at one check.
    """
    n_valid = max(1, round(len(targets) * valid_share / (1 - valid_share)))
    return draw(st.sampled_from([(None, None)] * n_valid + targets))


def random_rows(rng, n_rows, n_cols, density):
    """Sorted unique column ids of each row (numpy int64 arrays)."""
    out = []
    for _ in range(n_rows):
        k = rng.binomial(n_cols, density) if n_cols else 0
        out.append(np.sort(rng.choice(n_cols, size=k, replace=False)).astype(np.int64) if k else
                   np.zeros(0, dtype=np.int64))
    return out


def build_csr(rng, n_rows, n_cols, density, corruption=None, values_kind="none"):
    """(indptr, indices, values or None) numpy arrays, with one corruption (or None) applied."""
    rows = random_rows(rng, n_rows, n_cols, density)
    nonempty = [r for r, c in enumerate(rows) if len(c) >= 1]
    wide = [r for r, c in enumerate(rows) if len(c) >= 2]
    if corruption == "unsorted" and wide:
        r = int(rng.choice(wide))
        rows[r] = rows[r][::-1].copy()
    elif corruption == "duplicate" and wide:
        r = int(rng.choice(wide))
        rows[r][1] = rows[r][0]
    indptr = np.concatenate([[0], np.cumsum([len(c) for c in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)
    nnz = indices.shape[0]
    if corruption == "column-too-large" and nnz:
        indices[rng.integers(nnz)] = n_cols + int(rng.integers(0, 3))
    elif corruption == "column-negative" and nnz:
        indices[rng.integers(nnz)] = -1 - int(rng.integers(0, 2))
    elif corruption == "indptr-short":
        indptr = indptr[:-1] if indptr.shape[0] > 1 else indptr
    elif corruption == "indptr-long":
        indptr = np.concatenate([indptr, [nnz]])
    elif corruption == "indptr-not-monotone" and n_rows >= 2 and nonempty:
        r = int(rng.integers(1, n_rows))
        indptr[r] = nnz + 1 if indptr[r] == indptr[r + 1] else indptr[r + 1] + 1
    elif corruption == "indptr-start":
        indptr = indptr + 1
    elif corruption == "indptr-end-low" and nnz:
        indptr[-1] -= 1
    elif corruption == "indptr-end-high":
        indptr[-1] += 1
    elif corruption == "float-indices":
        indices = indices.astype(np.float64) + 0.5
    elif corruption == "float-indptr":
        indptr = indptr.astype(np.float32)
    elif corruption == "bool-indices":
        indices = indices > 0
    elif corruption == "int16-indptr":
        indptr = indptr.astype(np.int16)
    elif corruption == "empty-indptr":
        indptr = np.zeros(0, dtype=np.int64)
    values = None
    if values_kind == "ints":
        values = rng.integers(-3, 4, nnz).astype(np.float32)
    elif values_kind == "floats":
        values = rng.standard_normal(nnz).astype(np.float32)
    elif values_kind == "float64":
        values = rng.integers(-3, 4, nnz).astype(np.float64)
    elif values_kind == "int-dtype":
        values = rng.integers(-3, 4, nnz)
    elif values_kind == "short":
        values = np.ones(max(nnz - 1, 0) if nnz else 1, dtype=np.float32)
    return indptr, indices, values


def as_form(csr, form):
    """A CSR tuple of numpy arrays or of int64 / int32 tensors (any contents: a tuple is never validated on
    construction)."""
    indptr, indices, values = csr
    if form == "numpy" or indptr.dtype.kind != "i" or indices.dtype.kind != "i":
        return (indptr, indices) if values is None else (indptr, indices, values)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if form == "int32":
        return (t(indptr.astype(np.int32)), t(indices.astype(np.int32))) + (() if values is None else (t(values),))
    return (t(indptr), t(indices)) if values is None else (t(indptr), t(indices), t(values))


def any_form(csr, form, shape):
    """A valid CSR as a scipy matrix or a torch sparse tensor when asked, else as a tuple."""
    indptr, indices, values = csr
    data = np.ones(indices.shape[0], dtype=np.float32) if values is None else values
    if form == "scipy":
        return sp.csr_matrix((data, indices, indptr), shape=shape)
    if form == "torch-sparse":
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices),
                                       torch.from_numpy(np.asarray(data)), size=shape)
    return as_form(csr, form)


def corrupt_ids(ids, rng, kind, n_valid, pad=False):
    """ids (numpy int64) with one kind of bad id (or None), or as floats / bools."""
    ids = ids.copy()
    if ids.size and kind == "too-large":
        ids.flat[rng.integers(ids.size)] = n_valid + int(rng.integers(0, 3))
    elif ids.size and kind == "negative":
        ids.flat[rng.integers(ids.size)] = (-2 if pad else -1) - int(rng.integers(0, 2))
    elif kind == "float":
        return ids.astype(np.float64)
    elif kind == "bool":
        return ids > 0
    return ids


def id_form(ids, form):
    """ids (numpy) as a list, a numpy array or an int32 / int64 tensor."""
    if form == "list":
        return ids.tolist()
    if form == "numpy":
        return ids
    t = torch.from_numpy(np.ascontiguousarray(ids))
    return t.to(torch.int32) if form == "int32" and ids.dtype.kind == "i" else t


# --- gather_rows ----------------------------------------------------------------------------

GATHER_BAD = ([("matrix", c) for c in CSR_CORRUPTIONS] + [("values", "int-dtype"), ("values", "short")]
              + [("n_cols", k) for k in ("float", "bool", "negative")] + [("rows", k) for k in ID_CORRUPTIONS]
              + [("segments", k) for k in ("start", "end", "decreasing", "float")]
              + [("weights", k) for k in ("int-dtype", "short")] + [("out", k) for k in ("shape", "aliasing")])


def gather_case(draw):
    """(matrix, keyword arguments of one gather_rows call, whether the result must be exact)."""
    arg, bad = draw_bad(draw, GATHER_BAD)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_rows, n_cols = draw(st.integers(0, 7)), draw(st.integers(0, 9))
    values_kind = bad if arg == "values" else draw(st.sampled_from(["none", "ints", "floats", "float64"]))
    csr = build_csr(rng, n_rows, n_cols, draw(st.sampled_from([0.0, 0.3, 0.8])),
                    bad if arg == "matrix" else None, values_kind)
    form = draw(st.sampled_from(["tensors", "numpy", "int32", "scipy", "torch-sparse"]))
    kwargs = {}
    if arg in ("matrix", "values", "n_cols") or form not in ("scipy", "torch-sparse"):
        matrix = as_form(csr, form)
        kwargs["n_cols"] = {"float": n_cols + 0.5, "bool": True, "negative": -1}.get(bad, n_cols) \
            if arg == "n_cols" else n_cols
    else:
        matrix = any_form(csr, form, (n_rows, n_cols))
    n_gathered = draw(st.integers(0, 8))
    rows = rng.integers(0, max(n_rows, 1), n_gathered) if n_rows else np.zeros(n_gathered, dtype=np.int64)
    rows = corrupt_ids(rows, rng, bad if arg == "rows" else None, n_rows)
    if arg == "segments" or draw(st.booleans()):
        B = draw(st.integers(0, 5))
        cuts = np.sort(rng.integers(0, n_gathered + 1, max(B - 1, 0)))
        seg = np.concatenate([[0], cuts, [n_gathered]]) if B else np.zeros(1, dtype=np.int64)
        if bad == "start" and arg == "segments":
            seg[0] = 1
        elif bad == "end" and arg == "segments":
            seg[-1] += 1
        elif bad == "decreasing" and seg.shape[0] >= 3:
            seg[1] = seg[-1] + 1
        elif bad == "float" and arg == "segments":
            seg = seg.astype(np.float64)
        kwargs["segments"] = id_form(seg, draw(st.sampled_from(["list", "numpy", "int64"])))
    else:
        B = n_gathered
    weights_kind = bad if arg == "weights" else draw(st.sampled_from(["none", "ints", "floats"]))
    if bad == "aliasing":
        weights_kind = "ints"
    if weights_kind == "ints":
        kwargs["weights"] = torch.from_numpy(rng.integers(-4, 5, n_gathered).astype(np.float32))
    elif weights_kind == "floats":
        kwargs["weights"] = torch.from_numpy(rng.standard_normal(n_gathered).astype(np.float32))
    elif weights_kind == "int-dtype":
        kwargs["weights"] = torch.ones(n_gathered, dtype=torch.int64)
    elif weights_kind == "short":
        kwargs["weights"] = torch.ones(n_gathered + 1)
    kwargs["dtype"] = torch.float32 if bad == "aliasing" else \
        draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    out_kind = bad if arg == "out" else draw(st.sampled_from(["none", "fresh", "strided"]))
    if out_kind == "aliasing":
        kwargs["out"] = "aliasing"  # made per call: a view of that call's own rows
    elif out_kind != "none":
        shape = (B + 1, n_cols) if out_kind == "shape" else (B, n_cols)
        out = torch.empty(shape[::-1], dtype=kwargs["dtype"]).t() if out_kind == "strided" else \
            torch.empty(shape, dtype=kwargs["dtype"])
        kwargs["out"] = out.fill_(float("nan"))
    kwargs["rows"] = id_form(rows, draw(st.sampled_from(["list", "numpy", "int64", "int32"])))
    exact = values_kind != "floats" and weights_kind != "floats"
    return matrix, kwargs, exact


def _gather(backend, matrix, kwargs):
    kw = dict(kwargs)
    rows = kw.pop("rows")
    if isinstance(kw.get("out"), str):  # an out over the memory of this call's weights
        w = kw["weights"]
        B = w.shape[0] if kw.get("segments") is None else len(kw["segments"]) - 1
        n_cols = kw["n_cols"] if "n_cols" in kw else matrix.shape[1]
        buf = torch.zeros(max(w.shape[0], B * n_cols))
        buf[:w.shape[0]] = w
        kw["weights"], kw["out"] = buf[:w.shape[0]], buf[:B * n_cols].view(B, n_cols)
    elif "out" in kw:  # each backend writes a buffer of its own, with the same strides
        out = kw["out"]
        kw["out"] = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype).copy_(out)
    return rk.gather_rows(matrix, rows, backend=backend, **kw)


def _compare_dense(exact):
    def compare(a, b, what):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        if exact:
            assert torch.equal(a, b), f"{what}: differ\n{a}\n{b}"
        else:
            eps = torch.finfo(a.dtype).eps
            scale = max(1.0, b.double().abs().max().item()) if b.numel() else 1.0
            torch.testing.assert_close(a.double(), b.double(), rtol=4 * eps, atol=8 * eps * scale, msg=what)

    return compare


@needs_cpu
@fuzz_settings(150)
@given(data=st.data())
def test_gather_rows_cpu_agrees_with_the_reference(data):
    matrix, kwargs, exact = gather_case(data.draw)
    compare_backends(("reference", "cpu"), lambda b: _gather(b, matrix, kwargs), _compare_dense(exact), "gather_rows")


@needs_cpu
@pytest.mark.skipif(not _usable("triton"), reason=f"triton backend unusable: {rk.available_backends()['triton']}")
@fuzz_settings(40)
@given(data=st.data())
def test_gather_rows_triton_agrees_with_the_cpu_kernel(data):
    matrix, kwargs, exact = gather_case(data.draw)
    compare_backends(("cpu", "triton"), lambda b: _gather(b, matrix, kwargs), _compare_dense(exact), "gather_rows")


# --- topk_hits ---------------------------------------------------------------------------------

TOPK_BAD = ([(a, c) for a in ("exclude", "positives", "neighbor_sets") for c in CSR_CORRUPTIONS]
            + [("ks", k) for k in ("unsorted", "zero", "above-I", "float", "bool", "empty")]
            + [("users", k) for k in ID_CORRUPTIONS] + [("neighbors", k) for k in ("too-large", "negative", "float")]
            + [("scores", "nan")])


def ranking_args(draw, arg, bad, rng, B, I, positives=False):
    """scores, users, exclude and positives of one call of a ranking op (topk_hits, target_rank), with
    ``bad`` applied when ``arg`` is one of them; positives always when asked (else drawn), the rest drawn.

    Returns the keyword arguments and the number of rows of the CSR arguments.
    """
    vals = rng.integers(0, draw(st.integers(1, 5)), (B, I)).astype(np.float64) - 1.0  # ties
    vals[(vals == 0) & (rng.random((B, I)) < 0.5)] = -0.0
    vals[rng.random((B, I)) < draw(st.sampled_from([0.0, 0.2, 1.0]))] = -np.inf
    if arg == "scores" and B:
        vals[rng.integers(B), rng.integers(I)] = np.nan
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    kwargs = dict(scores=torch.from_numpy(vals).to(dtype))
    with_users = arg == "users" or draw(st.booleans())
    n_rows = draw(st.integers(0, 6)) if with_users else B
    if with_users:
        users = rng.integers(0, max(n_rows, 1), B) if n_rows else np.zeros(B, dtype=np.int64)
        users = corrupt_ids(users, rng, bad if arg == "users" else None, n_rows)
        kwargs["users"] = id_form(users, draw(st.sampled_from(["numpy", "int64", "int32"])))
    for name in ("exclude", "positives"):
        if arg == name or (name == "positives" and positives) or draw(st.booleans()):
            csr = build_csr(rng, n_rows, I, draw(st.sampled_from([0.0, 0.3, 0.9, 1.0])),
                            bad if arg == name else None)
            kwargs[name] = any_form(csr, draw(st.sampled_from(["tensors", "numpy", "int32", "scipy", "torch-sparse"]))
                                    if arg != name else "tensors", (n_rows, I))
    return kwargs, n_rows


def topk_case(draw):
    """Keyword arguments of one topk_hits call."""
    arg, bad = draw_bad(draw, TOPK_BAD)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    B, I = draw(st.integers(0, 6)), draw(st.integers(1, 10))
    kwargs, _ = ranking_args(draw, arg, bad, rng, B, I)
    ks = sorted(set(rng.integers(1, I + 1, draw(st.integers(1, 3))).tolist()))
    if draw(st.booleans()):
        ks = sorted(set(ks[:-1] + [I]))  # k == I
    if arg == "ks":
        ks = {"unsorted": ks[::-1] + [ks[0]], "zero": [0] + ks, "above-I": ks + [I + 1],
              "float": [float(k) for k in ks], "bool": True, "empty": []}[bad]
    kwargs["ks"] = ks
    if arg in ("neighbor_sets", "neighbors") or draw(st.booleans()):
        n_sets = draw(st.integers(0, 5))
        csr = build_csr(rng, n_sets, I, draw(st.sampled_from([0.0, 0.4, 1.0])), bad if arg == "neighbor_sets" else None)
        kwargs["neighbor_sets"] = any_form(csr, "tensors" if arg == "neighbor_sets" else
                                           draw(st.sampled_from(["tensors", "scipy"])), (n_sets, I))
        M = draw(st.integers(0, 3))
        nb = rng.integers(-1, max(n_sets, 1), (B, M)) if n_sets else np.full((B, M), -1)
        nb = corrupt_ids(nb, rng, bad if arg == "neighbors" else None, n_sets, pad=True)
        kwargs["neighbors"] = id_form(nb, draw(st.sampled_from(["numpy", "int64"])))
    kwargs["return_indices"] = draw(st.booleans())
    return kwargs


def _compare_topk(a, b, what):
    for name in ("hits", "first_hit", "indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), f"{what}: {name}"
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {name} differs\n{x}\n{y}"
    for name in ("dcg", "neighbor_hits"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape, f"{what}: {name}"
        assert bool(((x.double() - y.double()).abs() <= F32_EPS * y.double().abs()).all()), \
            f"{what}: {name} differs\n{x}\n{y}"


@needs_cpu
@fuzz_settings(150)
@given(data=st.data())
def test_topk_hits_cpu_agrees_with_the_reference(data):
    kwargs = topk_case(data.draw)
    compare_backends(("reference", "cpu"), lambda b: rk.topk_hits(backend=b, **kwargs), _compare_topk, "topk_hits")


@needs_cpu
@pytest.mark.skipif(not _usable("triton"), reason=f"triton backend unusable: {rk.available_backends()['triton']}")
@fuzz_settings(12)
@given(data=st.data())
def test_topk_hits_triton_agrees_with_the_cpu_kernel(data):
    kwargs = topk_case(data.draw)
    if kwargs["scores"].dtype == torch.float64:  # the triton kernel ranks 16- and 32-bit scores
        kwargs["scores"] = kwargs["scores"].float()
    compare_backends(("cpu", "triton"), lambda b: rk.topk_hits(backend=b, **kwargs), _compare_topk, "topk_hits")


# --- target_rank ---------------------------------------------------------------------------------

TARGET_RANK_BAD = ([(a, c) for a in ("exclude", "positives") for c in CSR_CORRUPTIONS]
                   + [("users", k) for k in ID_CORRUPTIONS] + [("scores", "nan")])


def target_rank_case(draw):
    """Keyword arguments of one target_rank call (topk_hits' scores, users, exclude and positives)."""
    arg, bad = draw_bad(draw, TARGET_RANK_BAD)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    B, I = draw(st.integers(0, 6)), draw(st.integers(1, 10))
    kwargs, _ = ranking_args(draw, arg, bad, rng, B, I, positives=True)
    return kwargs


def _compare_ranks(a, b, what):
    assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), f"{what}: ranks differ\n{a}\n{b}"


@needs_cpu
@fuzz_settings(150)
@given(data=st.data())
def test_target_rank_cpu_agrees_with_the_reference(data):
    kwargs = target_rank_case(data.draw)
    compare_backends(("reference", "cpu"), lambda b: rk.target_rank(backend=b, **kwargs), _compare_ranks, "target_rank")


@needs_cpu
@pytest.mark.skipif(not _usable("triton"), reason=f"triton backend unusable: {rk.available_backends()['triton']}")
@fuzz_settings(40)
@given(data=st.data())
def test_target_rank_triton_agrees_with_the_cpu_kernel(data):
    kwargs = target_rank_case(data.draw)
    compare_backends(("cpu", "triton"), lambda b: rk.target_rank(backend=b, **kwargs), _compare_ranks, "target_rank")


@needs_cpu
@fuzz_settings(100)
@given(data=st.data())
def test_target_rank_and_topk_hits_agree(data):
    """Both refuse the same calls, alike (the same exception, the message with the other op's name),
    and otherwise a positive's rank is below k exactly when topk_hits counts it at k, for every k."""
    kwargs = target_rank_case(data.draw)
    B, I = kwargs["scores"].shape
    ks = list(range(1, I + 1))
    kind, ranks = run(lambda: rk.target_rank(backend="cpu", **kwargs))
    topk_kind, out = run(lambda: rk.topk_hits(ks=ks, backend="cpu", **kwargs))
    event(f"target_rank and topk_hits: {'returned' if kind == 'ok' else type(ranks).__name__}")
    assert kind == topk_kind, f"only one raised: {ranks if kind == 'error' else out}"
    if kind == "error":
        assert type(ranks) is type(out) and str(out).replace("topk_hits", "target_rank") == str(ranks), \
            f"target_rank: {ranks!r}\ntopk_hits: {out!r}"
        return
    pos = rk.as_csr(kwargs["positives"], "positives")
    rows = torch.as_tensor(np.asarray(kwargs["users"])).long() if "users" in kwargs else torch.arange(B)
    owner = torch.repeat_interleave(torch.arange(B), pos.indptr[rows + 1] - pos.indptr[rows])
    for k in ks:
        counted = ((ranks >= 0) & (ranks < k)).long()
        hits = torch.zeros(B, dtype=torch.int64).index_add_(0, owner, counted)
        assert torch.equal(hits, out.hits[:, k - 1]), f"k = {k}: {hits} != {out.hits[:, k - 1]}"


# --- gaussian_logprob -------------------------------------------------------------------------------

GLP_BAD = ["traj-short", "traj-wide", "dtype-mismatch", "coef-short", "coef-int", "coef-half", "pred-2d",
           "pred-int", "coef-2d", "mean-without-items"]


def glp_case(draw):
    """(pred, traj, coef_pred, coef_x, log_var) and the keyword arguments of one gaussian_logprob call."""
    _, bad = draw_bad(draw, [("args", b) for b in GLP_BAD])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    S, B, I = draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 9))
    if bad == "mean-without-items":
        I = 0
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    coef_dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    f64 = torch.float64
    pred = torch.rand(S, B, I, dtype=f64, generator=g).to(dtype)
    traj = (torch.rand(S + 1, B, I, dtype=f64, generator=g) + 0.1 * torch.randn(S + 1, B, I, dtype=f64, generator=g))
    traj = traj.to(dtype)
    cp = torch.empty(S, dtype=f64).uniform_(0.01, 1.0, generator=g).to(coef_dtype)
    cx = torch.empty(S, dtype=f64).uniform_(0.0, 1.0, generator=g).to(coef_dtype)
    lv = torch.empty(S, dtype=f64).uniform_(-9.0, 0.0, generator=g).to(coef_dtype)
    if draw(st.booleans()) and B > 1:  # users spread out in memory
        pred = torch.cat([pred, pred], 1)[:, ::2]
        traj = torch.cat([traj, traj], 1)[:, ::2]
    if bad == "traj-short":
        traj = traj[:-1]
    elif bad == "traj-wide":
        traj = torch.cat([traj, traj[..., :1]], -1) if I else torch.zeros(S + 1, B, 1, dtype=dtype)
    elif bad == "dtype-mismatch":
        traj = traj.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif bad == "coef-short":
        cp = cp[:-1] if S else torch.ones(1, dtype=coef_dtype)
    elif bad == "coef-int":
        cx = cx.to(torch.int64)
    elif bad == "coef-half":
        lv = lv.half()
    elif bad == "pred-2d":
        pred = pred.reshape(S * B, I)
    elif bad == "pred-int":
        pred, traj = pred.to(torch.int32), traj.to(torch.int32)
    elif bad == "coef-2d":
        cp = cp[None]
    reduction = "mean" if bad == "mean-without-items" else draw(st.sampled_from(["sum", "mean"]))
    return (pred, traj, cp, cx, lv), dict(reduction=reduction, per_step=draw(st.booleans()))


def _glp(backend, args, kwargs):
    """(value, gradient) from ``backend``; the reference runs in float64 on the same (rounded) inputs."""
    pred, traj, cp, cx, lv = args
    if backend == "reference" and isinstance(pred, torch.Tensor) and pred.is_floating_point() \
            and traj.dtype == pred.dtype:
        pred, traj = pred.double(), traj.double()
    p = pred.detach().clone().requires_grad_(pred.is_floating_point())
    val = rk.gaussian_logprob(p, traj, cp, cx, lv, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad((val * _weights(val)).sum(), p, allow_unused=True)
    return val.detach(), (torch.zeros_like(p) if grad is None else grad)


def _weights(val):
    return torch.linspace(-1.0, 1.0, val.numel(), dtype=val.dtype).reshape(val.shape)


def _conditioning(args, kwargs):
    """Bounds of the float64 rounding error of the value and the gradient, per element.

    The residual r = traj[s+1] - coef_x traj[s] - coef_pred pred is a small
    difference of O(1) numbers: its rounding error is eps * mag, with mag =
    |traj[s+1]| + |coef_x traj[s]| + |coef_pred pred|, and 1/v amplifies it.
    """
    pred, traj, cp, cx, lv = (t.double() for t in args)
    S, B, I = pred.shape
    mag = traj[1:].abs() + (cx[:, None, None] * traj[:-1]).abs() + (cp[:, None, None] * pred).abs()
    r = traj[1:] - cx[:, None, None] * traj[:-1] - cp[:, None, None] * pred
    inv_v = torch.exp(-lv)[:, None, None]
    c = 1.0 / I if kwargs["reduction"] == "mean" and I else 1.0
    row = c * (((2 * r.abs() * mag + r * r) * inv_v).sum(-1) + I * (1.9 + lv.abs())[:, None])  # (S, B)
    value = row if kwargs["per_step"] else row.sum(0)
    w = _weights(torch.zeros(value.shape, dtype=torch.float64)).abs()
    w = w if kwargs["per_step"] else w.expand(S, B)
    grad = c * w[..., None] * (cp.abs()[:, None, None] * inv_v) * mag
    return value, grad


def _compare_glp(args, kwargs):
    def compare(kernel, truth, what):
        (v, g), (tv, tg) = kernel, truth
        pred_dtype = args[0].dtype
        if pred_dtype != torch.float64:  # the truth ran in float64 on the same inputs
            tv, tg = tv.float(), tg.to(pred_dtype)
        assert v.dtype == tv.dtype and v.shape == tv.shape, f"{what}: value {v.dtype}{tuple(v.shape)}"
        assert g.dtype == tg.dtype and g.shape == tg.shape, f"{what}: gradient {g.dtype}{tuple(g.shape)}"
        # The cpu kernel works in float64 and rounds once into the result's
        # dtype: a few units of that dtype, plus the float64 rounding of an
        # ill-conditioned sum.
        cond_v, cond_g = _conditioning(args, kwargs)
        eps64 = torch.finfo(torch.float64).eps
        for name, x, t, cond in (("value", v, tv, cond_v), ("gradient", g, tg, cond_g)):
            tol = 4 * torch.finfo(x.dtype).eps * t.double().abs() + 16 * eps64 * cond
            err = (x.double() - t.double()).abs()
            assert bool((err <= tol).all()), f"{what}: {name} differs\n{x}\n{t}"

    return compare


@needs_cpu
@fuzz_settings(120)
@given(data=st.data())
def test_gaussian_logprob_cpu_agrees_with_the_reference(data):
    args, kwargs = glp_case(data.draw)
    compare_backends(("cpu", "reference"), lambda b: _glp(b, args, kwargs), _compare_glp(args, kwargs),
                     "gaussian_logprob")


# --- policy_loss ------------------------------------------------------------------------------------

PL_BAD = ["adv-short", "adv-int", "adv-2d", "old-short", "old-half", "clip-zero", "clip-nan", "normalizer-zero",
          "normalizer-inf"]


def pl_case(draw):
    """gaussian_logprob's call (corrupted or not) with advantages, PPO's old terms and the options."""
    args, kwargs = glp_case(draw)
    _, bad = draw_bad(draw, [("pl", b) for b in PL_BAD], valid_share=0.6)
    pred = args[0]
    S, B = (pred.shape[0], pred.shape[1]) if pred.dim() == 3 else (args[2].shape[-1], 2)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    adv = torch.randn(B, dtype=torch.float64, generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    adv = adv.to(draw(st.sampled_from([torch.float64, torch.float32])))
    old = None
    if draw(st.booleans()):  # PPO: old terms near the new ones (ratios near the clip), or far
        spread = draw(st.sampled_from([0.0, 0.1, 1.0, 50.0]))
        old = torch.randn(S, B, dtype=torch.float64, generator=g) * spread
        if pred.dim() == 3 and pred.is_floating_point() and pred.dtype == args[1].dtype:
            try:
                old = old + reference_terms(args, kwargs)
            except Exception:  # noqa: BLE001 - a corrupted call: its old terms stay random
                pass
    clip, normalizer = draw(st.sampled_from([0.1, 0.2, 2.0])), draw(st.sampled_from([None, 1.0, 7.0]))
    if bad == "adv-short":
        adv = adv[:-1]
    elif bad == "adv-int":
        adv = adv.to(torch.int64)
    elif bad == "adv-2d":
        adv = adv[None]
    elif bad == "old-short":
        old = torch.zeros(max(S - 1, 0), B, dtype=torch.float64)
    elif bad == "old-half":
        old = torch.zeros(S, B, dtype=torch.float16)
    elif bad == "clip-zero":
        old, clip = torch.zeros(S, B, dtype=torch.float64), 0.0
    elif bad == "clip-nan":
        old, clip = torch.zeros(S, B, dtype=torch.float64), float("nan")
    elif bad == "normalizer-zero":
        normalizer = 0.0
    elif bad == "normalizer-inf":
        normalizer = float("inf")
    return args, dict(reduction=kwargs["reduction"], advantages=adv, old_logprob=old, clip=clip,
                      normalizer=normalizer)


def reference_terms(args, kwargs):
    pred, traj, cp, cx, lv = args
    return rk.gaussian_logprob(pred.double(), traj.double(), cp, cx, lv, reduction=kwargs["reduction"],
                               per_step=True, backend="reference").double()


def _pl(backend, args, kwargs):
    """(loss, logprob, gradient) from ``backend``; the reference runs in float64 on the same inputs."""
    pred, traj, cp, cx, lv = args
    if backend == "reference" and isinstance(pred, torch.Tensor) and pred.is_floating_point() \
            and traj.dtype == pred.dtype:
        pred, traj = pred.double(), traj.double()
    kw = dict(kwargs)
    p = pred.detach().clone().requires_grad_(pred.is_floating_point())
    loss, logprob = rk.policy_loss(p, traj, cp, cx, lv, kw.pop("advantages"), backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, p, allow_unused=True)
    return loss.detach(), logprob, (torch.zeros_like(p) if grad is None else grad)


def _compare_pl(args, kwargs):
    """Both kernels against the float64 truth: the logprob within gaussian_logprob's bounds, the loss
    within those bounds times each row's |d loss / d L| (for PPO taken at the larger ratio the error
    allows), the gradient (REINFORCE) within gaussian_logprob's gradient bound times the row weights."""
    def compare(kernel, truth, what):
        (loss, lp, g), (t_loss, t_lp, t_g) = kernel, truth
        pred_dtype = args[0].dtype
        out_dtype = torch.float64 if pred_dtype == torch.float64 else torch.float32
        assert loss.dtype == lp.dtype == out_dtype and g.dtype == pred_dtype, f"{what}: dtypes"
        assert loss.shape == () and lp.shape == t_lp.shape and g.shape == t_g.shape, f"{what}: shapes"
        p64, t64, cp, cx, lv = (t.double() for t in args)
        S, B, I = p64.shape
        old = kwargs["old_logprob"]
        n = kwargs["normalizer"] or float(max(1, B if old is None else S * B))
        a = kwargs["advantages"].double().abs()
        # The rows' conditioning, as _conditioning's (without its test weights).
        mag = t64[1:].abs() + (cx[:, None, None] * t64[:-1]).abs() + (cp[:, None, None] * p64).abs()
        r = t64[1:] - cx[:, None, None] * t64[:-1] - cp[:, None, None] * p64
        inv_v = torch.exp(-lv)[:, None, None]
        c = 1.0 / I if kwargs["reduction"] == "mean" and I else 1.0
        row = c * (((2 * r.abs() * mag + r * r) * inv_v).sum(-1) + I * (1.9 + lv.abs())[:, None])
        eps64, work_eps = torch.finfo(torch.float64).eps, torch.finfo(out_dtype).eps
        lp_tol = 4 * work_eps * t_lp.double().abs() + 16 * eps64 * row
        assert bool(((lp.double() - t_lp.double()).abs() <= lp_tol).all()), f"{what}: logprob differs\n{lp}\n{t_lp}"
        if old is None:
            w = (a / n).expand(S, B)
        else:
            w = a * torch.exp(torch.maximum(lp.double(), t_lp.double()) + lp_tol - old.double()) / n
        loss_tol = float((w * lp_tol).sum()) + 4 * work_eps * (float((w * t_lp.double().abs()).sum())
                                                               + abs(float(t_loss)))
        both_nan = math_isnan(loss) and math_isnan(t_loss)
        assert both_nan or abs(float(loss) - float(t_loss)) <= loss_tol, \
            f"{what}: loss {float(loss)!r} != {float(t_loss)!r} (tolerance {loss_tol:.3e})"
        if old is not None:
            return  # a row within rounding of a clip edge may take either branch: only values compare
        g_tol = 4 * torch.finfo(pred_dtype).eps * t_g.double().abs() \
            + 16 * eps64 * c * w[..., None] * (cp.abs()[:, None, None] * inv_v) * mag
        g_err = (g.double() - t_g.to(pred_dtype).double()).abs()
        assert bool((g_err <= g_tol).all()), f"{what}: gradient differs\n{g}\n{t_g}"

    return compare


def math_isnan(t) -> bool:
    return bool(torch.isnan(torch.as_tensor(t)))


@needs_cpu
@fuzz_settings(120)
@given(data=st.data())
def test_policy_loss_cpu_agrees_with_the_reference(data):
    args, kwargs = pl_case(data.draw)
    compare_backends(("cpu", "reference"), lambda b: _pl(b, args, kwargs), _compare_pl(args, kwargs),
                     "policy_loss")


@needs_cpu
@pytest.mark.skipif(not _usable("triton"), reason=f"triton backend unusable: {rk.available_backends()['triton']}")
@fuzz_settings(30)
@given(data=st.data())
def test_policy_loss_triton_refuses_what_the_cpu_kernel_refuses(data):
    """The Triton op refuses the same calls with the same messages; on valid calls its results are
    compared with the reference's in tests/test_policy_loss.py (the float32 kernel's rounding differs)."""
    args, kwargs = pl_case(data.draw)

    def outcome(backend):
        kind, value = run(lambda: _pl(backend, args, kwargs))
        return (kind, value if kind == "error" else None)

    assert_same_outcome({b: outcome(b) for b in ("cpu", "triton")}, lambda *a: None, "policy_loss")
