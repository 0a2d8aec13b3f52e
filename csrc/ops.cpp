// The one place the crossdiff op schemas are declared. CPU kernels live in cpu/*.cpp and register
// themselves for the CPU dispatch key; CUDA kernels (cuda/*.cu) add only CUDA registrations.
// Fake (meta) kernels and autograd formulas are registered from Python (crossdiff_ext/ops/).
#include <Python.h>
#include <torch/library.h>

#ifndef CROSSDIFF_SOURCE_HASH
#define CROSSDIFF_SOURCE_HASH "unknown"
#endif

// Building this file as a Python module lets `import crossdiff_ext._C` load the shared library (and with it
// the TORCH_LIBRARY registrations below) without pybind11. The module exposes two strings used at import to
// detect stale builds and to report which kernels were compiled.
static PyObject* source_hash(PyObject*, PyObject*) { return PyUnicode_FromString(CROSSDIFF_SOURCE_HASH); }

static PyObject* cuda_kernels(PyObject*, PyObject*) {
#ifdef CROSSDIFF_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"source_hash", source_hash, METH_NOARGS, "hash of csrc/ this library was built from"},
    {"cuda_kernels", cuda_kernels, METH_NOARGS, "whether CUDA kernels were compiled in"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }

TORCH_LIBRARY(crossdiff, m) {
  // f = ReLU(x W_enc^T + b_enc). x [B, M, d], W_enc [F, M, d], b_enc [F] -> f [B, F] in x's dtype. With
  // relu=False: the pre-activations x W_enc^T + b_enc, for a selection that applies the ReLU as it reads them.
  m.def("paired_encode(Tensor x, Tensor W_enc, Tensor b_enc, bool relu=True) -> Tensor");
  // Exact top K of s = f * w over all B*F entries (ties: lower flat index first). Returns CSR codes
  // (values [K] = f where s > 0 else 0, latent indices [K], row_ptr [B+1] int64) and the smallest selected
  // positive score (fp32 scalar, +inf when none is positive). With relu=True, f holds pre-activations and the
  // op selects on ReLU(f) exactly as it would on the ReLU output (NaN kept): the values are ReLU(f)'s.
  m.def("batch_topk(Tensor f, Tensor w, int K, bool relu=False) -> (Tensor values, Tensor indices, Tensor row_ptr, Tensor min_score)");
  // Entries with s = f * w > theta (theta >= 0), CSR order; nnz is data-dependent. relu as in batch_topk.
  m.def("threshold_select(Tensor f, Tensor w, float theta, bool relu=False) -> (Tensor values, Tensor indices, Tensor row_ptr)");
  // out[b] = sum_{e in row b} values[e] W[indices[e]] (+ bias). W [F, M, d] -> out [B, M, d]; fp32 accumulation.
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor row_ptr, Tensor W, Tensor? bias) -> Tensor");
  // grad_values[e] = <grad_out[row(e)], W[indices[e]]> over M*d: the value gradient of sparse_decode.
  m.def("sparse_values_grad(Tensor grad_out, Tensor indices, Tensor row_ptr, Tensor W) -> Tensor");
  // Counting sort of the codes by latent (stable: rows ascending within a latent). col_ptr [F+1] int64,
  // perm [nnz] int64 (entry ids), rows [nnz] int64 (row of each permuted entry). Its CUDA implementation is a
  // library radix sort registered from Python (crossdiff_ext/ops/sparse.py).
  m.def("latent_order(Tensor indices, Tensor row_ptr, int n_latents) -> (Tensor col_ptr, Tensor perm, Tensor rows)");
  // grad_W[j] = sum_{e: indices[e] = j} values[e] dense[row(e)] ([F, M, d], dense's dtype) and
  // value_sums[j] = sum_{e: indices[e] = j} values[e] (fp32). Deterministic: fixed row order per latent.
  m.def("sparse_weight_grad(Tensor values, Tensor dense, Tensor col_ptr, Tensor perm, Tensor rows) -> (Tensor grad_W, Tensor value_sums)");
}
