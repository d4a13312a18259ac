// Schemas of the rsp_fast custom operators. Each backend adds kernels in its own
// TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda). No pybind: importing rsp_fast._C runs the
// registrars, and the ops are called as torch.ops.rsp_fast.<op>.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <torch/version.h>

extern "C" {
// A module so that `import rsp_fast._C` loads this library; it holds only TORCH_VERSION, the
// torch release it was compiled against (a C++ extension is bound to one: rsp_fast/ops/custom.py
// compares it with the torch that imports it).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef TORCH_VERSION
  if (module != nullptr && PyModule_AddStringConstant(module, "TORCH_VERSION", TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
#endif
  return module;
}
}

TORCH_LIBRARY(rsp_fast, m) {
  // Sectional normalisation (RSP_SPEC.md section 2, step 3), one pass:
  // S_pos = R / Ga where R > 0 and Ga != 0, S_neg = -R / Gb where R < 0 and Gb != 0, else 0.
  // R, Ga, Gb: one shape (views allowed); S_pos, S_neg: contiguous, same shape.
  m.def("sectional_normalize(Tensor R, Tensor Ga, Tensor Gb) -> (Tensor, Tensor)");
  // The same on the stacked layout the back-projection reads: Rs = [R_pos; R_neg] (both >= 0)
  // and Gs = [Ga; Gb] along dim -2, of size 2 * half; returns [S_pos; -S_neg] in one buffer.
  m.def("sectional_normalize_stacked(Tensor Rs, Tensor Gs, int half) -> Tensor");
  // Hostile purging (RSP_SPEC.md section 2, step 5): D = 2 * x_pos * dx, then per sample
  // R_in = D - [D != 0] * total / #{D != 0}. dx, x_pos: (N, ...); total: (N,).
  m.def("purge(Tensor dx, Tensor x_pos, Tensor total) -> Tensor");
  // The three products of an inner conv (RSP_SPEC.md section 2, steps 1-4) for groups = 1,
  // computed only where R is non-zero: x_pos (N, C, H, W) the clamped input, R (N, O, h, w)
  // the relevance at the conv's output, padding (left, right, top, bottom); returns the
  // back-projection F_pos^T S_pos - F_neg^T S_neg at the input, (N, C, H, W).
  m.def("masked_sectional_products(Tensor x_pos, Tensor R, int[2] kernel, int[2] stride, int[2] dilation, "
        "int[4] padding) -> Tensor");
  // The same three products for a depthwise conv (groups = C; O = m * C outputs, output channel
  // o reading input channel o / m), fused per (sample, channel) plane; dense in R.
  m.def("depthwise_sectional_products(Tensor x_pos, Tensor R, int[2] kernel, int[2] stride, int[2] dilation, "
        "int[4] padding) -> Tensor");
  // The same three products for a stride-1 1x1 conv (groups = 1), dense, fused a tile of
  // positions at a time: x_pos (N, C, ...) and R (N, O, ...) over the same positions.
  m.def("pointwise_sectional_products(Tensor x_pos, Tensor R) -> Tensor");
}

// No op has a derivative (RSP's relevance is not differentiated): with inputs that require grad,
// backward() raises instead of warning and leaving the gradients at None.
TORCH_LIBRARY_IMPL(rsp_fast, Autograd, m) {
  for (const char* op : {"sectional_normalize", "sectional_normalize_stacked", "purge", "masked_sectional_products",
                         "depthwise_sectional_products", "pointwise_sectional_products"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}
