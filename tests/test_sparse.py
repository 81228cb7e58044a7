"""refit_kernels.sparse.as_csr: every accepted form, and clear errors for the rest."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

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
])
def test_bad_inputs_name_the_argument(bad, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        as_csr(bad, "positives")
    assert "positives" in str(info.value)


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
