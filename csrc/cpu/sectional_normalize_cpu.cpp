// CPU sectional normalisation: one pass over R, Ga, Gb writing S_pos and S_neg, parallel
// over all cores, the inner loop branch-free so that it vectorises. Inputs may be views
// whose rows are contiguous (the two halves of a stacked response); others are copied.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../normalize_checks.h"

namespace rsp_fast {
namespace {

// A tensor seen as `rows` contiguous rows of `row_len` elements, `row_stride` apart.
struct Rows {
  int64_t rows = 1, row_len = 1, row_stride = 0;
};

// The Rows view of t, or false if its layout is not rows of contiguous elements.
bool as_rows(const at::Tensor& t, Rows& out) {
  int64_t d = t.dim() - 1, len = 1;
  for (; d >= 0 && (t.size(d) == 1 || t.stride(d) == len); --d) len *= t.size(d);
  int64_t rows = 1, stride = len, expected = -1;
  for (; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (expected == -1) {
      stride = t.stride(d);
      expected = t.stride(d) * t.size(d);
    } else if (t.stride(d) != expected) {
      return false;
    } else {
      expected *= t.size(d);
    }
    rows *= t.size(d);
  }
  if (stride < len) return false;
  out = Rows{rows, len, stride};
  return true;
}

template <typename scalar_t>
void normalize_span(scalar_t* __restrict__ sp, scalar_t* __restrict__ sn, const scalar_t* __restrict__ r,
                    const scalar_t* __restrict__ ga, const scalar_t* __restrict__ gb, int64_t n) {
  const scalar_t zero(0), one(1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // Selects instead of branches (R's signs are random: branches mispredict), vectorised as
    // blends, and a denominator of 1 where masked so that every lane may divide. Selected, not
    // multiplied by 0/1 masks: an infinite R or G in the other section would give NaN. A NaN R
    // fails both comparisons, so it stays NaN in both sections, as in the reference.
    const scalar_t ri = r[i], gai = ga[i], gbi = gb[i];
    const bool mp = !(ri <= zero) & (gai != zero), mn = !(ri >= zero) & (gbi != zero);
    sp[i] = mp ? ri / (mp ? gai : one) : zero;
    sn[i] = mn ? -ri / (mn ? gbi : one) : zero;
  }
}

// One row of the stacked layout: out = sign * Rs / Gs where Rs != 0 and Gs != 0, else 0.
template <typename scalar_t>
void normalize_stacked_span(scalar_t* __restrict__ out, const scalar_t* __restrict__ rs, const scalar_t* __restrict__ gs,
                            scalar_t sign, int64_t n) {
  const scalar_t zero(0), one(1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t ri = rs[i], gi = gs[i];
    const bool m = (ri != zero) & (gi != zero);
    out[i] = m ? sign * ri / (m ? gi : one) : zero;
  }
}

}  // namespace

// The stacked form [S+; -S-] that the back-projection reads, written in place of the two
// halves and the concatenation: Rs = [R+; R-] and Gs = [G+; G-] along dim -2 (2*half rows).
at::Tensor sectional_normalize_stacked_cpu(const at::Tensor& Rs_in, const at::Tensor& Gs_in, int64_t half) {
  check_stacked_args(Rs_in, Gs_in, half);
  const at::Tensor Rs = Rs_in.contiguous(), Gs = Gs_in.contiguous();
  at::Tensor out = at::empty_like(Rs, at::MemoryFormat::Contiguous);
  const int64_t len = Rs.size(-1), rows = len == 0 ? 0 : Rs.numel() / len, per_block = 2 * half;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(Rs.scalar_type(), "sectional_normalize_stacked_cpu", [&] {
    const scalar_t* rs = Rs.const_data_ptr<scalar_t>();
    const scalar_t* gs = Gs.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / len);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t sign = (row % per_block) < half ? scalar_t(1) : scalar_t(-1);
        normalize_stacked_span(o + row * len, rs + row * len, gs + row * len, sign, len);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sectional_normalize_cpu(const at::Tensor& R_in, const at::Tensor& Ga_in, const at::Tensor& Gb_in) {
  TORCH_CHECK(R_in.sizes() == Ga_in.sizes() && R_in.sizes() == Gb_in.sizes(), "sectional_normalize: R ", R_in.sizes(), ", Ga ",
              Ga_in.sizes(), " and Gb ", Gb_in.sizes(), " differ in shape");
  TORCH_CHECK(R_in.scalar_type() == Ga_in.scalar_type() && R_in.scalar_type() == Gb_in.scalar_type(),
              "sectional_normalize: R, Ga and Gb must share one dtype");
  const at::Tensor R = R_in.contiguous();
  at::Tensor Ga = Ga_in, Gb = Gb_in;
  Rows ra, rb;
  // Both responses must split into rows of one length; otherwise work on contiguous copies.
  if (!as_rows(Ga, ra) || !as_rows(Gb, rb) || ra.row_len != rb.row_len) {
    Ga = Ga.contiguous();
    Gb = Gb.contiguous();
    as_rows(Ga, ra);
    as_rows(Gb, rb);
  }
  at::Tensor S_pos = at::empty_like(R, at::MemoryFormat::Contiguous);
  at::Tensor S_neg = at::empty_like(R, at::MemoryFormat::Contiguous);
  const int64_t numel = R.numel(), len = ra.row_len;
  if (numel == 0) return std::make_tuple(S_pos, S_neg);
  AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "sectional_normalize_cpu", [&] {
    const scalar_t* r = R.const_data_ptr<scalar_t>();
    const scalar_t* ga = Ga.const_data_ptr<scalar_t>();
    const scalar_t* gb = Gb.const_data_ptr<scalar_t>();
    scalar_t* sp = S_pos.mutable_data_ptr<scalar_t>();
    scalar_t* sn = S_neg.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
      // walk [begin, end) row segment by row segment
      for (int64_t i = begin; i < end;) {
        const int64_t row = i / len, col = i % len, n = std::min(len - col, end - i);
        normalize_span(sp + i, sn + i, r + i, ga + row * ra.row_stride + col, gb + row * rb.row_stride + col, n);
        i += n;
      }
    });
  });
  return std::make_tuple(S_pos, S_neg);
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) {
  m.impl("sectional_normalize", &sectional_normalize_cpu);
  m.impl("sectional_normalize_stacked", &sectional_normalize_stacked_cpu);
}

}  // namespace rsp_fast
