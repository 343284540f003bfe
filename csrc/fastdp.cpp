// Operator schemas of the fastdp compiled core. Implementations live in csrc/cpu and
// csrc/cuda; Python wrappers with fake (meta) kernels live in fastdp/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastdp._C loads this shared library, which runs the static registrations
// below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdp, m) {
  // grads[k]: [B, ...] per-sample gradients -> [B] sum over k of ||grads[k][i]||^2,
  // accumulated in fp32 (fp64 for fp64 inputs).
  m.def("per_sample_sq_norms(Tensor[] grads) -> Tensor");
  // c_i = min(1, max_norm / (sqrt(sq_norms[i]) + 1e-6));
  // out[k] = (sum_i c_i grads[k][i] + noise_std * z) * scale, z ~ N(0, 1) from Philox(seed, offset).
  // Returns c [B].
  m.def(
      "clip_accumulate_noise(Tensor[] grads, Tensor sq_norms, Tensor(a!)[] out, float max_norm, "
      "float noise_std, float scale, int seed, int offset) -> Tensor");
  // grads[k] = (grads[k] + noise_std * z) * scale, in place.
  m.def("add_noise_scale_(Tensor(a!)[] grads, float noise_std, float scale, int seed, int offset) -> ()");
}
