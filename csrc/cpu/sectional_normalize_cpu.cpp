// CPU sectional normalisation: one strided pass over R, Ga, Gb writing S_pos and S_neg
// (TensorIterator handles views such as the two halves of a stacked response, and
// parallelises over all cores).
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

namespace rsp_fast {

std::tuple<at::Tensor, at::Tensor> sectional_normalize_cpu(const at::Tensor& R, const at::Tensor& Ga, const at::Tensor& Gb) {
  TORCH_CHECK(R.sizes() == Ga.sizes() && R.sizes() == Gb.sizes(), "sectional_normalize: R ", R.sizes(), ", Ga ", Ga.sizes(),
              " and Gb ", Gb.sizes(), " differ in shape");
  TORCH_CHECK(R.scalar_type() == Ga.scalar_type() && R.scalar_type() == Gb.scalar_type(),
              "sectional_normalize: R, Ga and Gb must share one dtype");
  at::Tensor S_pos = at::empty_like(R, at::MemoryFormat::Contiguous);
  at::Tensor S_neg = at::empty_like(R, at::MemoryFormat::Contiguous);
  auto iter = at::TensorIteratorConfig()
                  .add_output(S_pos)
                  .add_output(S_neg)
                  .add_const_input(R)
                  .add_const_input(Ga)
                  .add_const_input(Gb)
                  .check_all_same_dtype(true)
                  .build();
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "sectional_normalize_cpu", [&] {
    at::native::cpu_kernel_multiple_outputs(iter, [](scalar_t r, scalar_t ga, scalar_t gb) -> std::tuple<scalar_t, scalar_t> {
      const scalar_t zero(0);
      const scalar_t sp = (r > zero && ga != zero) ? r / ga : zero;
      const scalar_t sn = (r < zero && gb != zero) ? -r / gb : zero;
      return std::make_tuple(sp, sn);
    });
  });
  return std::make_tuple(S_pos, S_neg);
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) { m.impl("sectional_normalize", &sectional_normalize_cpu); }

}  // namespace rsp_fast
