// Argument checks shared by every purge kernel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace rsp_fast {

inline void check_purge_args(const at::Tensor& dx, const at::Tensor& x_pos, const at::Tensor& total) {
  TORCH_CHECK(dx.dim() >= 1, "purge: dx must have a batch dimension");
  TORCH_CHECK(dx.sizes() == x_pos.sizes(), "purge: dx ", dx.sizes(), " and x_pos ", x_pos.sizes(), " differ in shape");
  TORCH_CHECK(total.dim() == 1 && total.size(0) == dx.size(0), "purge: total must have shape (", dx.size(0), ",)");
  TORCH_CHECK(dx.scalar_type() == x_pos.scalar_type() && dx.scalar_type() == total.scalar_type(),
              "purge: dx, x_pos and total must share one dtype");
  TORCH_CHECK(dx.device() == x_pos.device() && dx.device() == total.device(), "purge: tensors must share one device");
}

}  // namespace rsp_fast
