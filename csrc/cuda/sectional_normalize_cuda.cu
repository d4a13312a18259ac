// CUDA sectional normalisation: one strided elementwise pass (TensorIterator), on the
// current stream, float32/64 and half/bfloat16 computed in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cuda/Loops.cuh>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace rsp_fast {

std::tuple<at::Tensor, at::Tensor> sectional_normalize_cuda(const at::Tensor& R, const at::Tensor& Ga, const at::Tensor& Gb) {
  TORCH_CHECK(R.sizes() == Ga.sizes() && R.sizes() == Gb.sizes(), "sectional_normalize: R ", R.sizes(), ", Ga ", Ga.sizes(),
              " and Gb ", Gb.sizes(), " differ in shape");
  TORCH_CHECK(R.scalar_type() == Ga.scalar_type() && R.scalar_type() == Gb.scalar_type(),
              "sectional_normalize: R, Ga and Gb must share one dtype");
  const c10::cuda::CUDAGuard guard(R.device());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "sectional_normalize_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::native::gpu_kernel_multiple_outputs(
        iter, [] GPU_LAMBDA(scalar_t r_, scalar_t ga_, scalar_t gb_) -> thrust::tuple<scalar_t, scalar_t> {
          const opmath_t r = r_, ga = ga_, gb = gb_, zero(0);
          const opmath_t sp = (r > zero && ga != zero) ? r / ga : zero;
          const opmath_t sn = (r < zero && gb != zero) ? -r / gb : zero;
          return thrust::tuple<scalar_t, scalar_t>(static_cast<scalar_t>(sp), static_cast<scalar_t>(sn));
        });
  });
  return std::make_tuple(S_pos, S_neg);
}

TORCH_LIBRARY_IMPL(rsp_fast, CUDA, m) { m.impl("sectional_normalize", &sectional_normalize_cuda); }

}  // namespace rsp_fast
