// CPU hostile purging: per sample, one pass writes D = 2 x dx and counts its non-zeros, a
// second applies the sample's uniform shift; the loops compiled per vector width.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../purge_checks.h"
#include "vector_clones.h"

namespace rsp_fast {
namespace {

template <typename T>
RSP_INLINE int64_t doubled_products_impl(const T* __restrict__ dx, const T* __restrict__ x, T* __restrict__ out,
                                         int64_t n) {
  int64_t active = 0;
#pragma omp simd reduction(+ : active)
  for (int64_t i = 0; i < n; ++i) {
    const T D = T(2) * x[i] * dx[i];
    out[i] = D;
    active += D != T(0);
  }
  return active;
}

template <typename T>
RSP_INLINE void shift_active_impl(T* __restrict__ out, int64_t n, T shift) {
#pragma omp simd
  // a select, not out -= shift·[out ≠ 0]: an infinite shift would make 0·inf = NaN of inactive units
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] != T(0) ? out[i] - shift : out[i];
}

RSP_VECTOR_CLONES int64_t doubled_products(const float* dx, const float* x, float* out, int64_t n) {
  return doubled_products_impl(dx, x, out, n);
}
RSP_VECTOR_CLONES int64_t doubled_products(const double* dx, const double* x, double* out, int64_t n) {
  return doubled_products_impl(dx, x, out, n);
}
RSP_VECTOR_CLONES void shift_active(float* out, int64_t n, float shift) { shift_active_impl(out, n, shift); }
RSP_VECTOR_CLONES void shift_active(double* out, int64_t n, double shift) { shift_active_impl(out, n, shift); }

constexpr int64_t kChunk = 32768;  // elements per task inside one sample
int64_t chunks_of(int64_t M) { return (M + kChunk - 1) / kChunk; }

// f(chunk, begin, size) over the chunks of M elements, in parallel when ``parallel``
template <typename F>
void for_each_chunk(int64_t M, bool parallel, const F& f) {
  const int64_t chunks = chunks_of(M);
  at::parallel_for(0, chunks, parallel ? 1 : chunks, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) f(k, k * kChunk, std::min(kChunk, M - k * kChunk));
  });
}

// One sample's purge, its two passes over chunks in parallel when ``parallel``.
template <typename T>
void purge_sample(const T* dx, const T* x, T total, T* out, int64_t M, bool parallel) {
  std::vector<int64_t> active(chunks_of(M));  // D's non-zeros per chunk
  for_each_chunk(M, parallel, [&](int64_t k, int64_t begin, int64_t size) {
    active[k] = doubled_products(dx + begin, x + begin, out + begin, size);
  });
  int64_t count = 0;
  for (const int64_t a : active) count += a;
  if (count == 0) return;  // no unit active: no shift
  const T shift = total / static_cast<T>(count);
  for_each_chunk(M, parallel, [&](int64_t, int64_t begin, int64_t size) { shift_active(out + begin, size, shift); });
}

}  // namespace

at::Tensor purge_cpu(const at::Tensor& dx, const at::Tensor& x_pos, const at::Tensor& total) {
  check_purge_args(dx, x_pos, total);
  const at::Tensor d = dx.contiguous(), x = x_pos.contiguous(), t = total.contiguous();
  at::Tensor out = at::empty_like(d, at::MemoryFormat::Contiguous);
  const int64_t N = d.size(0);
  const int64_t M = N ? d.numel() / N : 0;
  if (M == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "purge_cpu", [&] {
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // whole samples per thread when there are enough (a sample's second pass finds it in cache);
    // else each sample's chunks in parallel
    const bool whole_samples = N >= at::get_num_threads();
    at::parallel_for(0, N, whole_samples ? 1 : N, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        purge_sample(dp + n * M, xp + n * M, tp[n], op + n * M, M, !whole_samples);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) { m.impl("purge", &purge_cpu); }

}  // namespace rsp_fast
