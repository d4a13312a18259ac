// CPU hostile purging: one pass writes D and counts its non-zeros per sample (parallel
// reduction over all cores), a second pass applies the uniform shift.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <functional>

#include "../purge_checks.h"

namespace rsp_fast {

at::Tensor purge_cpu(const at::Tensor& dx, const at::Tensor& x_pos, const at::Tensor& total) {
  check_purge_args(dx, x_pos, total);
  const at::Tensor d = dx.contiguous(), x = x_pos.contiguous(), t = total.contiguous();
  at::Tensor out = at::empty_like(d, at::MemoryFormat::Contiguous);
  const int64_t N = d.size(0);
  const int64_t M = N ? d.numel() / N : 0;
  constexpr int64_t kGrain = 32768;
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "purge_cpu", [&] {
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* dn = dp + n * M;
      const scalar_t* xn = xp + n * M;
      scalar_t* on = op + n * M;
      const int64_t active = at::parallel_reduce(
          0, M, kGrain, int64_t(0),
          [&](int64_t begin, int64_t end, int64_t acc) {
            for (int64_t i = begin; i < end; ++i) {
              const scalar_t D = scalar_t(2) * xn[i] * dn[i];
              on[i] = D;
              acc += D != scalar_t(0);
            }
            return acc;
          },
          std::plus<int64_t>());
      if (active == 0) continue;
      const scalar_t shift = tp[n] / static_cast<scalar_t>(active);
      at::parallel_for(0, M, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          on[i] -= shift * static_cast<scalar_t>(on[i] != scalar_t(0));  // branch-free: vectorises
        }
      });
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) { m.impl("purge", &purge_cpu); }

}  // namespace rsp_fast
