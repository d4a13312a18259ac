// Argument checks shared by the kernels that run an inner conv's three products.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace rsp_fast {

// The conv the products belong to, as its arguments describe it.
struct ConvArgs {
  int64_t N, C, H, W, O, h, w;        // x_pos (N, C, H, W), R (N, O, h, w)
  int64_t kh, kw, sh, sw, dh, dw;     // kernel, stride, dilation
  int64_t left, right, top, bottom;   // padding
  int64_t Hp, Wp;                     // the padded input
};

// Checks that R is the output of a conv (kernel, stride, dilation, padding) of x_pos; `op`
// names the op in the messages.
inline ConvArgs check_products_args(const char* op, const at::Tensor& x_pos, const at::Tensor& R, at::IntArrayRef kernel,
                                    at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding) {
  TORCH_CHECK(x_pos.dim() == 4 && R.dim() == 4 && x_pos.size(0) == R.size(0), op,
              ": x_pos (N, C, H, W) and R (N, O, h, w) expected, got ", x_pos.sizes(), " and ", R.sizes());
  TORCH_CHECK(x_pos.scalar_type() == R.scalar_type(), op, ": x_pos and R must share one dtype");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && dilation.size() == 2 && padding.size() == 4, op,
              ": kernel, stride and dilation take two values, padding four");
  ConvArgs a{x_pos.size(0), x_pos.size(1), x_pos.size(2), x_pos.size(3), R.size(1), R.size(2), R.size(3),
             kernel[0], kernel[1], stride[0], stride[1], dilation[0], dilation[1],
             padding[0], padding[1], padding[2], padding[3], 0, 0};
  TORCH_CHECK(a.kh > 0 && a.kw > 0 && a.sh > 0 && a.sw > 0 && a.dh > 0 && a.dw > 0, op,
              ": kernel, stride and dilation must be positive");
  TORCH_CHECK(a.left >= 0 && a.right >= 0 && a.top >= 0 && a.bottom >= 0, op, ": padding must be >= 0");
  // bounded, so that the sums and products below (and the kernels' tap offsets) cannot overflow
  constexpr int64_t kMaxArg = (int64_t(1) << 31) - 1;
  for (const int64_t v : {a.kh, a.kw, a.sh, a.sw, a.dh, a.dw, a.left, a.right, a.top, a.bottom})
    TORCH_CHECK(v <= kMaxArg, op, ": kernel, stride, dilation and padding must be below 2^31, got ", v);
  a.Hp = a.H + a.top + a.bottom;
  a.Wp = a.W + a.left + a.right;
  // a padded plane, also rounded up to whole strides (the depthwise kernel's phase planes; a
  // stride past the plane reads as one the plane's size), within 2^31 elements: each side
  // bounded first, so that their product cannot overflow
  const int64_t Hs = a.Hp + std::min(a.sh, a.Hp), Ws = a.Wp + std::min(a.sw, a.Wp);
  TORCH_CHECK(Hs <= kMaxArg && Ws <= kMaxArg && Hs * Ws <= kMaxArg, op, ": the padded input ", a.Hp, "x", a.Wp,
              " with stride ", a.sh, "x", a.sw, " passes 2^31 elements a plane");
  TORCH_CHECK(a.Hp >= a.dh * (a.kh - 1) + 1 && a.Wp >= a.dw * (a.kw - 1) + 1 &&
                  a.h == (a.Hp - a.dh * (a.kh - 1) - 1) / a.sh + 1 && a.w == (a.Wp - a.dw * (a.kw - 1) - 1) / a.sw + 1,
              op, ": R ", R.sizes(), " is not the output of this ", a.kh, "x", a.kw, " conv of x_pos ", x_pos.sizes());
  return a;
}

}  // namespace rsp_fast
