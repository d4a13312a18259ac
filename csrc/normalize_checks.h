// Argument checks shared by every sectional_normalize_stacked kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace rsp_fast {

inline void check_stacked_args(const at::Tensor& Rs, const at::Tensor& Gs, int64_t half) {
  TORCH_CHECK(Rs.sizes() == Gs.sizes(), "sectional_normalize_stacked: Rs ", Rs.sizes(), " and Gs ", Gs.sizes(),
              " differ in shape");
  TORCH_CHECK(Rs.scalar_type() == Gs.scalar_type(), "sectional_normalize_stacked: Rs and Gs must share one dtype");
  // compared as size / 2 == half: 2 * half overflows for a huge half
  TORCH_CHECK(Rs.dim() >= 2 && half >= 0 && Rs.size(-2) % 2 == 0 && Rs.size(-2) / 2 == half,
              "sectional_normalize_stacked: dim -2 of ", Rs.sizes(), " must be twice half = ", half);
}

}  // namespace rsp_fast
