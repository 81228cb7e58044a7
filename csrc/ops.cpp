// The refit operator library: every op's schema, and the Python module
// `refit_kernels._C` whose import loads (and so registers) the kernels.
//
// Kernels register themselves per device next to their code
// (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*_host.cpp); fake
// (meta) implementations and gradients are registered from Python, in
// refit_kernels/ops/*.py.
#include <Python.h>
#include <torch/library.h>

// REFIT_TORCH_VERSION and REFIT_CUDA_VERSION, written by setup.py.
#include "refit_build_info.h"

#include "cpu/common.h"

TORCH_LIBRARY(refit, m) {
  m.def(
      "gaussian_logprob(Tensor pred, Tensor traj, Tensor coef_pred, Tensor coef_x, "
      "Tensor log_var, bool mean, bool per_step) -> Tensor");
  m.def(
      "gaussian_logprob_backward(Tensor grad, Tensor pred, Tensor traj, Tensor coef_pred, "
      "Tensor coef_x, Tensor log_var, bool mean, bool per_step) -> Tensor");
  // The policy-gradient loss over a trajectory (REINFORCE, or PPO's clipped surrogate with
  // old_logprob) with its gradient in the same pass: (loss, per-step logprob, d loss / d pred).
  m.def(
      "policy_loss(Tensor pred, Tensor traj, Tensor coef_pred, Tensor coef_x, Tensor log_var, "
      "Tensor advantages, Tensor? old_logprob, float clip, bool mean, float normalizer) -> "
      "(Tensor loss, Tensor logprob, Tensor grad_pred)");
  // out[b] = sum_{j in [segments[b], segments[b+1])} weights[j] * A[rows[j]], A = (indptr,
  // indices, values) with n_cols columns; no segments: one row per output. Not differentiable.
  m.def(
      "gather_rows(Tensor indptr, Tensor indices, Tensor? values, Tensor rows, Tensor? segments, "
      "Tensor? weights, int n_cols, ScalarType dtype) -> Tensor");
  // The same into a caller's buffer, overwritten in full (zeroed, then filled).
  m.def(
      "gather_rows_out(Tensor indptr, Tensor indices, Tensor? values, Tensor rows, "
      "Tensor? segments, Tensor? weights, int n_cols, Tensor(a!) out) -> ()");
  m.def(
      "topk_hits(Tensor scores, int[] ks, Tensor? users, Tensor? exclude_indptr, "
      "Tensor? exclude_indices, Tensor? positives_indptr, Tensor? positives_indices, "
      "Tensor? neighbors, Tensor? neighbor_sets_indptr, Tensor? neighbor_sets_indices, "
      "bool return_indices) -> (Tensor hits, Tensor dcg, Tensor neighbor_hits, "
      "Tensor first_hit, Tensor indices)");
  // The rank of every positive among its row's rankable items under topk_hits' ranking rule (-1
  // for an excluded positive): (nnz,) beside the positives' entries, or the rows users[b] picks
  // one after the other. Not differentiable.
  m.def(
      "target_rank(Tensor scores, Tensor? users, Tensor? exclude_indptr, Tensor? exclude_indices, "
      "Tensor positives_indptr, Tensor positives_indices) -> Tensor");
}

// A plain CPython module (no pybind11): it only carries the build facts the
// Python side checks before trusting the registered kernels.
static PyObject* cpu_avx512(PyObject*, PyObject*) {
#ifdef REFIT_HAVE_AVX512
  if (refit::cpu::has_avx512()) Py_RETURN_TRUE;
#endif
  Py_RETURN_FALSE;
}

static PyMethodDef refit_methods[] = {
    {"cpu_avx512", cpu_avx512, METH_NOARGS,
     "Whether the CPU kernels run their hand-written AVX-512 loops here (False where the CPU lacks "
     "AVX-512 or REFIT_CPU_AVX512=0 turned them off)."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef refit_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled refit kernels. Importing it registers the refit:: ops with torch.",
    -1,
    refit_methods,
};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&refit_module);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef _OPENMP
  const long with_openmp = 1;
#else
  const long with_openmp = 0;
#endif
#ifdef REFIT_SANITIZE
  const long sanitized = 1;  // built with AddressSanitizer and UBSan (setup.py, REFIT_SANITIZE=1)
#else
  const long sanitized = 0;
#endif
  if (PyModule_AddStringConstant(m, "torch_version", REFIT_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "cuda_version", REFIT_CUDA_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0 ||
      PyModule_AddIntConstant(m, "with_openmp", with_openmp) < 0 ||
      PyModule_AddIntConstant(m, "sanitized", sanitized) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
