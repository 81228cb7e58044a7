"""refit_kernels.sparse.as_csr: every accepted form, and clear errors for the rest."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import refit_kernels as rk
from refit_kernels.sparse import CSR, as_csr

DENSE = np.array([[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 4]], dtype=np.float32)


def _check(csr: CSR, n_cols=4, values=True):
    assert csr.indptr.dtype == torch.int64 and csr.indices.dtype == torch.int64
    assert csr.indptr.tolist() == [0, 2, 2, 4]
    assert csr.indices.tolist() == [1, 3, 0, 3]
    assert csr.n_rows == 3 and csr.n_cols == n_cols and csr.nnz == 4
    if values:
        assert csr.values.tolist() == [1, 2, 3, 4]
    else:
        assert csr.values is None


def test_scipy_matrix_and_array():
    _check(as_csr(sp.csr_matrix(DENSE), "m"))
    _check(as_csr(sp.csr_array(DENSE), "m"))
    _check(as_csr(sp.coo_matrix(DENSE), "m"))  # converted with tocsr()


def test_the_name_is_optional_and_only_labels_errors():
    _check(as_csr(sp.csr_matrix(DENSE)))
    with pytest.raises(ValueError, match="^matrix: expected 5 columns"):
        as_csr(sp.csr_matrix(DENSE), n_cols=5)


def test_torch_sparse_csr():
    _check(as_csr(torch.from_numpy(DENSE).to_sparse_csr(), "m"))


def test_tuples_of_tensors_and_arrays():
    m = sp.csr_matrix(DENSE)
    _check(as_csr((m.indptr, m.indices), "m", n_cols=4), values=False)
    _check(as_csr((torch.from_numpy(m.indptr), torch.from_numpy(m.indices), torch.from_numpy(m.data)), "m", n_cols=4))
    _check(as_csr((m.indptr, m.indices, None), "m"), n_cols=None, values=False)


def test_values_dtype_and_device():
    csr = as_csr(sp.csr_matrix(DENSE.astype(np.float64)), "m", values_dtype=torch.float32, device="cpu")
    assert csr.values.dtype == torch.float32
    assert csr.to("cpu") is csr


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.zeros(3, 4), TypeError, "strided"),
    ("matrix", TypeError, "got str"),
    ((np.array([0, 1]),), ValueError, "tuple"),
    ((np.array([0.0, 1.0]), np.array([0])), TypeError, "indptr must be int32 or int64"),
    ((np.array([0, 1]), np.array([0.5])), TypeError, "indices must be int32 or int64"),
    ((np.array([1, 2]), np.array([0, 1])), ValueError, "start at 0"),
    ((np.array([0, 1]), np.array([0, 1])), ValueError, "end at nnz"),
    ((np.array([0, 2, 1, 2]), np.array([0, 1])), ValueError, "non-decreasing"),
    ((np.array([0, 1]), np.array([0]), np.array([1])), TypeError, "values must be floating"),
    ((np.array([0, 1]), np.array([0]), np.array([1.0, 2.0])), ValueError, "shape of indices"),
    ((np.zeros((2, 2), dtype=np.int64), np.array([0])), ValueError, "indptr must be 1-D"),
    ((np.array([0, 2, 3]), np.array([0, 1, 2, 3, 4])), ValueError, "end at nnz = 5, got 0 .. 3"),
    ((np.array([0, 3, 1, 3]), np.array([0, 1, 2])), ValueError,
     r"non-decreasing from 0 to nnz = 3; positives indptr of row 1 gives the entries 3 .. 1"),
    ((np.array([0, -1, 2]), np.array([0, 1])), ValueError, "row 0 gives the entries 0 .. -1"),
    ((np.array([0, 5, 2]), np.array([0, 1])), ValueError, "row 0 gives the entries 0 .. 5"),
    ((np.array([False, True]), np.array([0])), TypeError, "indptr must be int32 or int64, got torch.bool"),
    ((np.array([0, 1], dtype=object), np.array([0])), TypeError, "indptr must hold numbers"),
    (([0, 1], [0]), TypeError, "indptr must be a torch.Tensor or numpy array"),
    ((torch.tensor([0, 1]).to_sparse(), torch.tensor([0])), TypeError, "indptr must be a dense"),
    ((torch.tensor([0, 1], device="meta"), torch.tensor([0], device="meta")), ValueError, "indptr is a meta tensor"),
    ((np.array([0, 1]), np.array([0]), np.array([1j])), TypeError, "values must be floating"),
])
def test_bad_inputs_name_the_argument(bad, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        as_csr(bad, "positives")
    assert "positives" in str(info.value)


@pytest.mark.parametrize("n_cols", [4.0, 3.9, True, "4", np.float64(4)])
def test_column_count_must_be_an_int(n_cols):
    with pytest.raises(TypeError, match="exclude: n_cols must be an int"):
        as_csr((np.array([0, 1]), np.array([0])), "exclude", n_cols=n_cols)


def test_column_count_accepts_numpy_ints():
    assert as_csr((np.array([0, 1]), np.array([0])), "m", n_cols=np.int32(4)).n_cols == 4


def _backends():
    return [b for b, reason in rk.available_backends().items() if reason is None and b != "cuda"]


@pytest.mark.parametrize("indptr,message", [
    ([0, 2, 3], r"indptr must start at 0 and end at nnz = 5, got 0 \.\. 3"),
    ([0, 2, 5, 9], r"indptr must be non-decreasing from 0 to nnz = 5; \w+ indptr of row 2 gives the entries 5 \.\. 9"),
    ([0, 3, 2, 5], r"indptr must be non-decreasing from 0 to nnz = 5; \w+ indptr of row 1 gives the entries 3 \.\. 2"),
    ([1, 3, 5], r"indptr must start at 0 and end at nnz = 5, got 1 \.\. 5"),
], ids=["ends-before-nnz", "past-nnz", "decreasing", "starts-above-0"])
def test_every_op_refuses_a_broken_indptr_alike(indptr, message):
    """One validation of the CSR structure (as_csr) for every op and every backend: same type, same message.

    gather_rows used to accept indptr[-1] < nnz (and drop the entries past
    it) where topk_hits refused it.
    """
    csr = (torch.tensor(indptr), torch.tensor([0, 1, 2, 0, 2]))
    n_rows = len(indptr) - 1
    errors = []
    for backend in _backends():
        with pytest.raises(ValueError, match="matrix: " + message) as info:
            rk.gather_rows(csr, [0], n_cols=3, backend=backend)
        errors.append(str(info.value).replace("matrix", "X"))
        for arg, kwargs in (("positives", dict(positives=csr)), ("exclude", dict(exclude=csr)),
                            ("neighbor_sets", dict(neighbors=torch.full((n_rows, 1), -1), neighbor_sets=csr))):
            with pytest.raises(ValueError, match=f"{arg}: " + message) as info:
                rk.topk_hits(torch.zeros(n_rows, 3), 1, backend=backend, **kwargs)
            errors.append(str(info.value).replace(arg, "X"))
    assert len(set(errors)) == 1, errors


def test_column_count_mismatch():
    with pytest.raises(ValueError, match="expected 5 columns"):
        as_csr(sp.csr_matrix(DENSE), "exclude", n_cols=5)


def test_csr_objects_pass_through():
    csr = as_csr(sp.csr_matrix(DENSE), "m")
    again = as_csr(csr, "m", n_cols=4)
    _check(again)
    assert again.indptr is csr.indptr  # nothing to convert
    with pytest.raises(ValueError, match="expected 5 columns"):
        as_csr(csr, "m", n_cols=5)
