// CPU pointwise sectional products: RSP's three matrix products for a stride-1 1x1 conv
// (groups = 1; RSP_SPEC.md section 2, steps 1-4), fused so that the layer's responses and
// ratios never reach memory. With x (C, L) one sample's input, R (O, L) its relevance:
//   filters          F+-[o, c] = sum_l R+-[o, l] x[c, l]
//   normalisation    S+[o, l]  = R[o, l] / (F+[o] . x[:, l])   where R > 0 (and the response != 0)
//                    -S-[o, l] = R[o, l] / (F-[o] . x[:, l])   where R < 0
//   back-projection  dx[c, l]  = sum_o F+[o, c] S+[o, l] - F-[o, c] S-[o, l]
// The library path runs these as three GEMMs with the stacked sections, the responses and the
// ratios each written to and read from memory: about ten passes over O x L numbers, against
// 6 * C multiply-adds per number, so layers with few input channels (EfficientNet's and
// MobileNet's expansions, ResNet's 1x1 convs at 56x56) were bound by memory. Here the filters
// take one sweep over R and x, and the responses, ratios and back-projection are made a tile of
// positions at a time in cache: two reads of R, one of x, one write of dx.
// Layout: NCHW as given (positions contiguous), so every product is a vector loop over positions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "vector_clones.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rsp_fast {
namespace {

// Positions per tile of the second pass: two vectors, so that each broadcast filter value
// serves two vector multiply-adds.
template <typename T>
constexpr int64_t kTile = 2 * kLanes<T>;
constexpr int kOutBlock = 4;  // output channels per sweep (responses): 4 x 2 signs x 2 vectors accumulate
constexpr int kInBlock = 4;   // input channels per sweep (back-projection)
constexpr int kFilterOut = 2, kFilterIn = 4;  // filters: 2 outputs x 2 signs x 4 inputs accumulate

template <typename T>
RSP_INLINE T lane_sum(const T* v) {
  T s = 0;
  for (int64_t i = 0; i < kLanes<T>; ++i) s += v[i];
  return s;
}

// F+-[o, c] += sum over n positions (a multiple of the vector) of R+-[o, l] x[c, l], for OB
// outputs from R (row stride ldr) and CB inputs from x (row stride ldx).
template <int OB, int CB, typename T>
RSP_INLINE void filters_block(const T* __restrict__ R, int64_t ldr, const T* __restrict__ x, int64_t ldx, int64_t n,
                              T* __restrict__ Fp, T* __restrict__ Fn, int64_t ldf) {
  constexpr int64_t V = kLanes<T>;
  T ap[OB][CB][V] = {}, an[OB][CB][V] = {};
  for (int64_t l = 0; l < n; l += V) {
    T rp[OB][V], rn[OB][V], xv[CB][V];
    for (int ob = 0; ob < OB; ++ob)
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) {
        const T r = R[ob * ldr + l + i];
        rp[ob][i] = !(r <= T(0)) ? r : T(0);  // a NaN goes into F+, and from it into every output, as in the reference
        rn[ob][i] = r < T(0) ? -r : T(0);
      }
    for (int cb = 0; cb < CB; ++cb)
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) xv[cb][i] = x[cb * ldx + l + i];
    for (int ob = 0; ob < OB; ++ob)
      for (int cb = 0; cb < CB; ++cb)
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) {
          ap[ob][cb][i] += rp[ob][i] * xv[cb][i];
          an[ob][cb][i] += rn[ob][i] * xv[cb][i];
        }
  }
  for (int ob = 0; ob < OB; ++ob)
    for (int cb = 0; cb < CB; ++cb) {
      Fp[ob * ldf + cb] += lane_sum(ap[ob][cb]);
      Fn[ob * ldf + cb] += lane_sum(an[ob][cb]);
    }
}

// For OB outputs at one tile of positions: the responses of both signs, then the ratio by the
// response of R's own sign, written as S+ and -S- (zero where R or that response is zero).
template <int OB, typename T>
RSP_INLINE void ratios_block(const T* __restrict__ R, int64_t ldr, const T* __restrict__ x, int64_t ldx, int64_t C,
                             const T* __restrict__ Fp, const T* __restrict__ Fn, int64_t ldf, T* __restrict__ Sp,
                             T* __restrict__ Sn) {
  constexpr int64_t P = kTile<T>;
  T gp[OB][P] = {}, gn[OB][P] = {};
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = x + c * ldx;
    for (int ob = 0; ob < OB; ++ob) {
      const T a = Fp[ob * ldf + c], b = Fn[ob * ldf + c];
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) {
        gp[ob][i] += a * xc[i];
        gn[ob][i] += b * xc[i];
      }
    }
  }
  for (int ob = 0; ob < OB; ++ob)
#pragma omp simd
    for (int64_t i = 0; i < P; ++i) {
      const T r = R[ob * ldr + i];
      const T g = r > T(0) ? gp[ob][i] : gn[ob][i];
      const T s = (r != T(0) && g != T(0)) ? r / (g != T(0) ? g : T(1)) : T(0);  // one division for both signs
      Sp[ob * P + i] = r > T(0) ? s : T(0);
      Sn[ob * P + i] = r < T(0) ? s : T(0);
    }
}

// dx[c, tile] = sum_o F+[o, c] S+[o, tile] + F-[o, c] (-S-)[o, tile] for CB inputs.
template <int CB, typename T>
RSP_INLINE void back_block(const T* __restrict__ Sp, const T* __restrict__ Sn, int64_t O, const T* __restrict__ Fp,
                           const T* __restrict__ Fn, int64_t ldf, T* __restrict__ dx, int64_t lddx) {
  constexpr int64_t P = kTile<T>;
  T acc[CB][P] = {};
  for (int64_t o = 0; o < O; ++o) {
    const T* sp = Sp + o * P;
    const T* sn = Sn + o * P;
    for (int cb = 0; cb < CB; ++cb) {
      const T a = Fp[o * ldf + cb], b = Fn[o * ldf + cb];
#pragma omp simd
      for (int64_t i = 0; i < P; ++i) acc[cb][i] += a * sp[i] + b * sn[i];
    }
  }
  for (int cb = 0; cb < CB; ++cb)
#pragma omp simd
    for (int64_t i = 0; i < P; ++i) dx[cb * lddx + i] = acc[cb][i];
}

// The blocks with their sizes compile-time constants (registers, unrolled loops); the last
// block of a dimension that is not a whole multiple takes a smaller size.
#define RSP_FILTERS_SWITCH(ob, cb, ...)                                                      \
  if (ob == kFilterOut) {                                                                    \
    switch (cb) {                                                                            \
      case 1: return filters_block<kFilterOut, 1>(__VA_ARGS__);                              \
      case 2: return filters_block<kFilterOut, 2>(__VA_ARGS__);                              \
      case 3: return filters_block<kFilterOut, 3>(__VA_ARGS__);                              \
      default: return filters_block<kFilterOut, kFilterIn>(__VA_ARGS__);                     \
    }                                                                                        \
  }                                                                                          \
  switch (cb) {                                                                              \
    case 1: return filters_block<1, 1>(__VA_ARGS__);                                         \
    case 2: return filters_block<1, 2>(__VA_ARGS__);                                         \
    case 3: return filters_block<1, 3>(__VA_ARGS__);                                         \
    default: return filters_block<1, kFilterIn>(__VA_ARGS__);                                \
  }

// One overload per dtype (as the depthwise kernel's channel_products), each cloned per vector width.
#define RSP_POINTWISE_KERNELS(T)                                                                          \
  RSP_VECTOR_CLONES void filters(int ob, int cb, const T* R, int64_t ldr, const T* x, int64_t ldx,        \
                                          int64_t n, T* Fp, T* Fn, int64_t ldf) {                                  \
    RSP_FILTERS_SWITCH(ob, cb, R, ldr, x, ldx, n, Fp, Fn, ldf)                                                     \
  }                                                                                                                \
  RSP_VECTOR_CLONES void ratios(int ob, const T* R, int64_t ldr, const T* x, int64_t ldx, int64_t C,      \
                                         const T* Fp, const T* Fn, int64_t ldf, T* Sp, T* Sn) {                    \
    switch (ob) {                                                                                                  \
      case 1: return ratios_block<1>(R, ldr, x, ldx, C, Fp, Fn, ldf, Sp, Sn);                                      \
      case 2: return ratios_block<2>(R, ldr, x, ldx, C, Fp, Fn, ldf, Sp, Sn);                                      \
      case 3: return ratios_block<3>(R, ldr, x, ldx, C, Fp, Fn, ldf, Sp, Sn);                                      \
      default: return ratios_block<kOutBlock>(R, ldr, x, ldx, C, Fp, Fn, ldf, Sp, Sn);                             \
    }                                                                                                              \
  }                                                                                                                \
  RSP_VECTOR_CLONES void back(int cb, const T* Sp, const T* Sn, int64_t O, const T* Fp, const T* Fn,      \
                                       int64_t ldf, T* dx, int64_t lddx) {                                         \
    switch (cb) {                                                                                                  \
      case 1: return back_block<1>(Sp, Sn, O, Fp, Fn, ldf, dx, lddx);                                              \
      case 2: return back_block<2>(Sp, Sn, O, Fp, Fn, ldf, dx, lddx);                                              \
      case 3: return back_block<3>(Sp, Sn, O, Fp, Fn, ldf, dx, lddx);                                              \
      default: return back_block<kInBlock>(Sp, Sn, O, Fp, Fn, ldf, dx, lddx);                                      \
    }                                                                                                              \
  }
RSP_POINTWISE_KERNELS(float)
RSP_POINTWISE_KERNELS(double)

// One sample seen as row-major matrices: x (C, ldx), R (O, ldr), dx (C, lddx), over n positions.
template <typename T>
struct Sample {
  const T* x;
  const T* R;
  T* dx;
  int64_t ldx, ldr, lddx, n;
};

// Positions per tile of the filters' sweep: the relevance rows of a tile, read once per block
// of input channels, fill about 512 KB so that they stay in the core's L2 cache; each block's
// input rows stay in L1. Long tiles also make the horizontal sums at a tile's end rare.
template <typename T>
int64_t filter_tile(int64_t O) {
  const int64_t positions = (512 << 10) / (O * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>(positions / kTile<T> * kTile<T>, 4 * kTile<T>, 2048);
}

// F+- rows [o0, o1) from the positions of s (a multiple of the tile), added to Fp, Fn (O, C).
template <typename T>
void add_filters(const Sample<T>& s, int64_t C, int64_t o0, int64_t o1, T* Fp, T* Fn) {
  const int64_t tile = filter_tile<T>(o1 - o0);
  for (int64_t l0 = 0; l0 < s.n; l0 += tile) {
    const int64_t n = std::min(tile, s.n - l0);
    for (int64_t c = 0; c < C; c += kFilterIn) {
      const int cb = static_cast<int>(std::min<int64_t>(kFilterIn, C - c));
      for (int64_t o = o0; o < o1; o += kFilterOut) {
        const int ob = static_cast<int>(std::min<int64_t>(kFilterOut, o1 - o));
        filters(ob, cb, s.R + o * s.ldr + l0, s.ldr, s.x + c * s.ldx + l0, s.ldx, n, Fp + o * C + c,
                            Fn + o * C + c, C);
      }
    }
  }
}

// dx at the tile of positions starting at l0: ratios of every output into Sp, Sn (O, tile), then
// the back-projection.
template <typename T>
void tile_products(const Sample<T>& s, int64_t C, int64_t O, int64_t l0, const T* Fp, const T* Fn, T* Sp, T* Sn) {
  constexpr int64_t P = kTile<T>;
  for (int64_t o = 0; o < O; o += kOutBlock) {
    const int ob = static_cast<int>(std::min<int64_t>(kOutBlock, O - o));
    ratios(ob, s.R + o * s.ldr + l0, s.ldr, s.x + l0, s.ldx, C, Fp + o * C, Fn + o * C, C, Sp + o * P,
                       Sn + o * P);
  }
  for (int64_t c = 0; c < C; c += kInBlock) {
    const int cb = static_cast<int>(std::min<int64_t>(kInBlock, C - c));
    back(cb, Sp, Sn, O, Fp + c, Fn + c, C, s.dx + c * s.lddx + l0, s.lddx);
  }
}

// One sample: x (C, L), R (O, L) -> dx (C, L). The positions past the last whole tile are
// copied into zero-padded buffers (zero relevance adds nothing) and take the same kernels.
// ``inner``: the sample's own work in parallel (outputs for the filters, tiles for the rest).
template <typename T>
void one_sample(const T* x, const T* R, T* dx, int64_t C, int64_t O, int64_t L, bool inner) {
  constexpr int64_t P = kTile<T>;
  const int64_t whole = L / P * P, rest = L - whole;
  std::vector<T> x_tail(rest ? C * P : 0, T(0)), r_tail(rest ? O * P : 0, T(0)), dx_tail(rest ? C * P : 0);
  for (int64_t c = 0; c < C && rest; ++c) std::copy(x + c * L + whole, x + c * L + L, x_tail.data() + c * P);
  for (int64_t o = 0; o < O && rest; ++o) std::copy(R + o * L + whole, R + o * L + L, r_tail.data() + o * P);
  const Sample<T> main{x, R, dx, L, L, L, whole}, tail{x_tail.data(), r_tail.data(), dx_tail.data(), P, P, P, rest ? P : 0};

  std::vector<T> Fp(O * C, T(0)), Fn(O * C, T(0));  // each thread its own rows: nothing to reduce
  at::parallel_for(0, (O + kFilterOut - 1) / kFilterOut, inner ? 1 : (O + 1), [&](int64_t b0, int64_t b1) {
    const int64_t o0 = b0 * kFilterOut, o1 = std::min(O, b1 * kFilterOut);
    add_filters(main, C, o0, o1, Fp.data(), Fn.data());
    add_filters(tail, C, o0, o1, Fp.data(), Fn.data());
  });
  const int64_t tiles = whole / P + (rest ? 1 : 0);
  at::parallel_for(0, tiles, inner ? 1 : tiles + 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> Sp(O * P), Sn(O * P);
    for (int64_t t = t0; t < t1; ++t) {
      if (t * P < whole)
        tile_products(main, C, O, t * P, Fp.data(), Fn.data(), Sp.data(), Sn.data());
      else
        tile_products(tail, C, O, 0, Fp.data(), Fn.data(), Sp.data(), Sn.data());
    }
  });
  for (int64_t c = 0; c < C && rest; ++c) std::copy(dx_tail.data() + c * P, dx_tail.data() + c * P + rest, dx + c * L + whole);
}

}  // namespace

at::Tensor pointwise_sectional_products_cpu(const at::Tensor& x_pos, const at::Tensor& R) {
  TORCH_CHECK(x_pos.dim() >= 2 && R.dim() == x_pos.dim() && x_pos.size(0) == R.size(0) &&
                  x_pos.sizes().slice(2) == R.sizes().slice(2),
              "pointwise_sectional_products: x_pos (N, C, ...) and R (N, O, ...) with the same positions expected, got ",
              x_pos.sizes(), " and ", R.sizes());
  TORCH_CHECK(x_pos.scalar_type() == R.scalar_type(), "pointwise_sectional_products: x_pos and R must share one dtype");
  const int64_t N = x_pos.size(0), C = x_pos.size(1), O = R.size(1);
  const int64_t L = N > 0 && C > 0 ? x_pos.numel() / (N * C) : 0;
  at::Tensor out = at::empty(x_pos.sizes(), x_pos.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x_pos.scalar_type(), "pointwise_sectional_products_cpu", [&] {
    const at::Tensor xin = x_pos.contiguous(), r = R.contiguous();
    const scalar_t* xp = xin.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // samples in parallel when there are enough of them (nothing shared); else each sample's inside
    if (N >= at::get_num_threads()) {
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) one_sample(xp + n * C * L, rp + n * O * L, op + n * C * L, C, O, L, false);
      });
    } else {
      for (int64_t n = 0; n < N; ++n) one_sample(xp + n * C * L, rp + n * O * L, op + n * C * L, C, O, L, true);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) { m.impl("pointwise_sectional_products", &pointwise_sectional_products_cpu); }

}  // namespace rsp_fast
