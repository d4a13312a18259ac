// CUDA sectional normalisation, plain and stacked: one strided elementwise pass each
// (TensorIterator), on the current stream, float32/64 and half/bfloat16 computed in float.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cuda/Loops.cuh>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../normalize_checks.h"

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
          // !(r <= 0) and !(r >= 0): a NaN R stays NaN in both sections, as in the reference
          const opmath_t sp = (!(r <= zero) && ga != zero) ? r / ga : zero;
          const opmath_t sn = (!(r >= zero) && gb != zero) ? -r / gb : zero;
          return thrust::tuple<scalar_t, scalar_t>(static_cast<scalar_t>(sp), static_cast<scalar_t>(sn));
        });
  });
  return std::make_tuple(S_pos, S_neg);
}

// [S+; -S-] from Rs = [R+; R-] and Gs = [G+; G-] along dim -2: out = sign * Rs / Gs where Rs
// and Gs are non-zero, else 0, the sign (+1 for the first half of the rows, -1 for the
// second) broadcast from a (2*half, 1) column.
at::Tensor sectional_normalize_stacked_cuda(const at::Tensor& Rs, const at::Tensor& Gs, int64_t half) {
  check_stacked_args(Rs, Gs, half);
  const c10::cuda::CUDAGuard guard(Rs.device());
  at::Tensor out = at::empty_like(Rs, at::MemoryFormat::Contiguous);
  at::Tensor sign = at::full({2 * half, 1}, 1.0, Rs.options());
  sign.narrow(0, half, half).fill_(-1.0);
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(Rs)
                  .add_const_input(Gs)
                  .add_const_input(sign)
                  .check_all_same_dtype(true)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Rs.scalar_type(), "sectional_normalize_stacked_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::native::gpu_kernel(iter, [] GPU_LAMBDA(scalar_t r_, scalar_t g_, scalar_t sign_) -> scalar_t {
      const opmath_t r = r_, g = g_, zero(0);
      return static_cast<scalar_t>((r != zero && g != zero) ? static_cast<opmath_t>(sign_) * r / g : zero);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CUDA, m) {
  m.impl("sectional_normalize", &sectional_normalize_cuda);
  m.impl("sectional_normalize_stacked", &sectional_normalize_stacked_cuda);
}

}  // namespace rsp_fast
