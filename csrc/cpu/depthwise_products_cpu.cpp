// CPU depthwise sectional products: RSP's three products for a depthwise conv (groups = C,
// O = m * C outputs, output channel o reading input channel o / m; RSP_SPEC.md section 2,
// steps 1-4), fused per (sample, input channel) plane:
//   filters         F+-[t]  = sum_l R+-[l] * x[l + tap t]                 (k*k numbers per sign)
//   normalisation   S+-[l]  = R+-[l] / (sum_t F+-[t] * x[l + tap t])      where R+-[l] != 0 and the response != 0
//   back-projection dX[l + tap t] += F+[t] * S+[l] - F-[t] * S-[l]
// A depthwise conv does k*k multiply-adds per output: too little work per byte for the
// library convolutions, which run each product as its own pass over the whole layer in
// NCHW (oneDNN's depthwise input gradient for stride 2 ran at about 1 GFLOP/s here). Here one
// plane's padded input, relevance and back-projection stay in cache through all three
// products, and each product is a vector loop over one flat run of positions (see Geometry).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../products_checks.h"
#include "vector_clones.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rsp_fast {
namespace {

constexpr int64_t kMaxTaps = 128;  // kernels up to 11x11
constexpr int kTapBlock = 4;        // taps whose filter sums share each load of the sections

// The padded input plane is split into sh * sw phase planes (rows y = sh * qy + phase_y, columns
// likewise), so that every tap of a strided conv reads contiguous memory: output (oy, ox) sits at
// oy * Wq + ox, and its tap (ky, kx) at the same offset plus the tap's own (phase, row, column)
// offset. A plane is then one flat run of positions: the Wq - w positions between two output
// rows carry no relevance and add nothing anywhere, and even 7x7 maps make long vector loops.
struct Geometry {
  int64_t H, W, top, left, Hp, Wp;  // input plane, its padding (top, left) and padded size
  int64_t h, w, kh, kw, sh, sw, dh, dw, m;  // output plane, kernel, stride, dilation, channel multiplier
  int64_t Hq() const { return (Hp + sh - 1) / sh; }  // a phase plane
  int64_t Wq() const { return (Wp + sw - 1) / sw; }
  int64_t phases_size() const { return sh * sw * Hq() * Wq(); }
  int64_t run_length() const { return (h - 1) * Wq() + w; }
  // where padded input element (py, px) lies in the phase planes
  int64_t phase_index(int64_t py, int64_t px) const {
    return ((py % sh) * sw + px % sw) * Hq() * Wq() + (py / sh) * Wq() + px / sw;
  }
};

constexpr int kChunks = 4;  // position vectors per step of the response and back-projection loops

inline int64_t whole_vectors(int64_t n, int64_t v) { return (n + v - 1) / v * v; }

// Per-thread buffers, reused from plane to plane. Every loop runs over whole vectors (no scalar
// tails, a large share of a short run such as a 7x7 map's), so each buffer is padded to them;
// the padding, x's padding and the gaps between output rows in rp, rn are never written, so
// they stay zero for every plane. sp, sn start ``reach`` zeros early: the back-projection
// gathers sp[q - offset of tap t] for every phase-plane position q.
template <typename T>
struct Scratch {
  int64_t n_run, n_plane, reach;  // output run and phase planes in whole vectors; the largest tap offset
  std::vector<T> x, dx, rp, rn, sp, sn;
  Scratch(const Geometry& g, int64_t reach_)
      : n_run(whole_vectors(g.run_length(), kLanes<T>)),
        n_plane(whole_vectors(g.phases_size(), kLanes<T>)),
        reach(reach_),
        x(std::max(n_plane, n_run + reach)),
        dx(n_plane),
        rp(n_run + kLanes<T>),  // the last row's whole vectors
        rn(n_run + kLanes<T>),
        sp(reach + n_plane),
        sn(reach + n_plane) {}
};

// One vector register of B bytes (GCC's vector extensions), B the width of the target the code
// is compiled for (see vector_clones.h). The accumulations below are written with it: as loops
// over lanes, GCC kept the accumulators in memory and ran the single-vector steps lane by lane.
template <typename T, int B>
struct Line {  // unaligned, and may alias T
  typedef T type __attribute__((vector_size(B), aligned(sizeof(T)), __may_alias__));
};
template <typename T, int B>
using LineOf = typename Line<T, B>::type;

template <int B, typename T>
RSP_INLINE const LineOf<T, B>& line(const T* p) {
  return *reinterpret_cast<const LineOf<T, B>*>(p);
}
template <int B, typename T>
RSP_INLINE LineOf<T, B>& line(T* p) {
  return *reinterpret_cast<LineOf<T, B>*>(p);
}

// Responses G+-[l] = sum_t F+-[t] x[l + tap t] of U vectors of positions from l0, kept in
// registers (2U independent multiply-add chains), and their normalisation S+-[l] = R+-[l] / G+-[l]
// where both are non-zero (R+- >= 0, so "!= 0" is "> 0").
template <typename T, int B, int U>
RSP_INLINE void normalised_sections(const T* __restrict__ x, const T* __restrict__ p, const T* __restrict__ n,
                                    T* __restrict__ sp, T* __restrict__ sn, const int64_t* offsets, const T* fp,
                                    const T* fn, int64_t taps, int64_t l0) {
  using W = LineOf<T, B>;
  constexpr int64_t V = B / sizeof(T);
  W a[U] = {}, b[U] = {};
  for (int64_t t = 0; t < taps; ++t) {
    const T* xs = x + offsets[t] + l0;
    const T ft = fp[t], gt = fn[t];
    for (int u = 0; u < U; ++u) {
      const W xv = line<B>(xs + u * V);
      a[u] += ft * xv;
      b[u] += gt * xv;
    }
  }
  // normalised as lanes: GCC 12 splits comparisons of these vector types into lanes
  alignas(64) T ga[U * V], gb[U * V];
  for (int u = 0; u < U; ++u) {
    line<B>(ga + u * V) = a[u];
    line<B>(gb + u * V) = b[u];
  }
#pragma omp simd
  for (int64_t i = 0; i < U * V; ++i) {
    const int64_t l = l0 + i;
    sp[l] = (p[l] != T(0) && ga[i] != T(0)) ? p[l] / (ga[i] != T(0) ? ga[i] : T(1)) : T(0);
    sn[l] = (n[l] != T(0) && gb[i] != T(0)) ? n[l] / (gb[i] != T(0) ? gb[i] : T(1)) : T(0);
  }
}

// The back-projection dX[q] += sum_t F+[t] S+[q - tap t] - F-[t] S-[q - tap t] of U vectors of
// phase-plane positions from q0, gathered: each position is stored once (scattering tap by tap
// loaded and stored dX once per tap).
template <typename T, int B, int U>
RSP_INLINE void back_projection(const T* __restrict__ sp, const T* __restrict__ sn, T* __restrict__ dx,
                                const int64_t* offsets, const T* fp, const T* fn, int64_t taps, int64_t q0) {
  using W = LineOf<T, B>;
  constexpr int64_t V = B / sizeof(T);
  W a[U] = {}, b[U] = {};
  for (int64_t t = 0; t < taps; ++t) {
    const T* ps = sp + q0 - offsets[t];
    const T* ns = sn + q0 - offsets[t];
    const T ft = fp[t], gt = fn[t];
    for (int u = 0; u < U; ++u) {
      a[u] += ft * line<B>(ps + u * V);
      b[u] += gt * line<B>(ns + u * V);
    }
  }
  for (int u = 0; u < U; ++u) line<B>(dx + q0 + u * V) += a[u] - b[u];
}

// One output channel (its sections in s.rp, s.rn): the filters, the normalised sections and
// the back-projection, added into s.dx. ``offsets``: each tap's.
template <typename T, int B>
RSP_INLINE void channel_products_impl(Scratch<T>& s, const int64_t* offsets, int64_t taps) {
  constexpr int64_t V = B / sizeof(T);
  const T* __restrict__ x = s.x.data();
  const T* __restrict__ p = s.rp.data();
  const T* __restrict__ n = s.rn.data();
  T* __restrict__ sp = s.sp.data() + s.reach;
  T* __restrict__ sn = s.sn.data() + s.reach;
  T fp[kMaxTaps], fn[kMaxTaps];
  // filters F+-[t] = sum_l R+-[l] x[l + tap t], kTapBlock taps at a time: each load of the
  // sections serves 2 * kTapBlock independent vector accumulators (one tap at a time waited on
  // the latency of its two multiply-add chains, and loaded the sections once per tap)
  for (int64_t t0 = 0; t0 < taps; t0 += kTapBlock) {
    const int nt = static_cast<int>(std::min<int64_t>(kTapBlock, taps - t0));
    const T* xs[kTapBlock];
    for (int j = 0; j < kTapBlock; ++j) xs[j] = x + offsets[t0 + std::min(j, nt - 1)];  // spare ones: discarded
    T a[kTapBlock][V] = {}, b[kTapBlock][V] = {};
    for (int64_t l = 0; l < s.n_run; l += V)
      for (int j = 0; j < kTapBlock; ++j)
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) {
          a[j][i] += p[l + i] * xs[j][l + i];
          b[j][i] += n[l + i] * xs[j][l + i];
        }
    for (int j = 0; j < nt; ++j) {
      T sa = 0, sb = 0;
      for (int64_t i = 0; i < V; ++i) {
        sa += a[j][i];
        sb += b[j][i];
      }
      fp[t0 + j] = sa;
      fn[t0 + j] = sb;
    }
  }
  int64_t l = 0;
  for (; l + kChunks * V <= s.n_run; l += kChunks * V)
    normalised_sections<T, B, kChunks>(x, p, n, sp, sn, offsets, fp, fn, taps, l);
  for (; l < s.n_run; l += V) normalised_sections<T, B, 1>(x, p, n, sp, sn, offsets, fp, fn, taps, l);
  int64_t q = 0;
  for (; q + kChunks * V <= s.n_plane; q += kChunks * V)
    back_projection<T, B, kChunks>(sp, sn, s.dx.data(), offsets, fp, fn, taps, q);
  for (; q < s.n_plane; q += V) back_projection<T, B, 1>(sp, sn, s.dx.data(), offsets, fp, fn, taps, q);
}

// n elements of the input plane at src, src + sw, ... that lie at dst, dst + 1, ... in the phase planes
struct PhaseRun {
  int64_t src, dst, n;
};

// The input plane's elements in runs, one per row and column phase (computed once per call: the
// divisions it takes cost more than a small plane's copy).
std::vector<PhaseRun> phase_runs(const Geometry& g) {
  std::vector<PhaseRun> runs;
  for (int64_t y = 0; y < g.H; ++y)
    for (int64_t phase = 0; phase < g.sw; ++phase) {
      const int64_t c0 = ((phase - g.left) % g.sw + g.sw) % g.sw;  // first column in this column phase
      if (c0 < g.W) runs.push_back({y * g.W + c0, g.phase_index(y + g.top, c0 + g.left), (g.W - c0 + g.sw - 1) / g.sw});
    }
  return runs;
}

// R's positive and negative sections, each output row at a row of Wq; whether R has a non-zero.
// Rows are taken in whole vectors, the lanes past the row masked to zero (rows shorter than a
// vector ran lane by lane, branching on each sign); the zeros land in the gap after the row or
// at the start of the next, which that row then writes.
template <typename T, int B>
RSP_INLINE bool split_sections(const T* __restrict__ r, T* __restrict__ p, T* __restrict__ n, const Geometry& g) {
  constexpr int64_t V = B / sizeof(T);
  const int64_t Wq = g.Wq(), w = g.w;
  int any = 0;
  for (int64_t oy = 0; oy < g.h; ++oy)
    for (int64_t ox = 0; ox < w; ox += V) {
      const T* __restrict__ ri = r + oy * w + ox;
      T* __restrict__ pi = p + oy * Wq + ox;
      T* __restrict__ ni = n + oy * Wq + ox;
      const int64_t left = w - ox;
#pragma omp simd reduction(| : any)
      for (int64_t i = 0; i < V; ++i) {
        const T v = i < left ? ri[i] : T(0);
        pi[i] = std::max(v, T(0));
        ni[i] = std::max(-v, T(0));
        any |= v != T(0);
      }
    }
  return any != 0;
}

// One input plane x (H, W) and its m relevance planes R (m, h, w): the back-projection (H, W) into out.
template <typename T, int B>
RSP_INLINE void one_plane_impl(const T* __restrict__ x, const T* __restrict__ R, T* __restrict__ out,
                               const Geometry& g, const int64_t* offsets, const std::vector<PhaseRun>& runs,
                               Scratch<T>& s) {
  T* __restrict__ xs = s.x.data();
  T* __restrict__ dx = s.dx.data();
  const int64_t sw = g.sw;
  std::fill(dx, dx + s.n_plane, T(0));
  for (const PhaseRun& run : runs) {
    const T* __restrict__ from = x + run.src;
    T* __restrict__ to = xs + run.dst;
#pragma omp simd
    for (int64_t i = 0; i < run.n; ++i) to[i] = from[i * sw];
  }
  for (int64_t j = 0; j < g.m; ++j)  // no relevance: nothing to pass back
    if (split_sections<T, B>(R + j * g.h * g.w, s.rp.data(), s.rn.data(), g))
      channel_products_impl<T, B>(s, offsets, g.kh * g.kw);
  for (const PhaseRun& run : runs) {
    const T* __restrict__ from = dx + run.dst;
    T* __restrict__ to = out + run.src;
#pragma omp simd
    for (int64_t i = 0; i < run.n; ++i) to[i * sw] = from[i];
  }
}

// one_plane_impl compiled for each vector width (see vector_clones.h), chosen once per call
#define RSP_ONE_PLANE(name, target, bytes)                                                                      \
  template <typename T>                                                                                         \
  target void name(const T* x, const T* R, T* out, const Geometry& g, const int64_t* offsets,                   \
                   const std::vector<PhaseRun>& runs, Scratch<T>& s) {                                          \
    one_plane_impl<T, bytes>(x, R, out, g, offsets, runs, s);                                                   \
  }
RSP_ONE_PLANE(one_plane_512, RSP_TARGET_AVX512, 64)
RSP_ONE_PLANE(one_plane_256, RSP_TARGET_AVX2, 32)
RSP_ONE_PLANE(one_plane_128, , 16)
#undef RSP_ONE_PLANE

template <typename T>
auto one_plane_for_this_cpu() {
  const int bytes = vector_bytes();
  return bytes == 64 ? &one_plane_512<T> : bytes == 32 ? &one_plane_256<T> : &one_plane_128<T>;
}

}  // namespace

at::Tensor depthwise_sectional_products_cpu(const at::Tensor& x_pos, const at::Tensor& R, at::IntArrayRef kernel,
                                            at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding) {
  const ConvArgs a = check_products_args("depthwise_sectional_products", x_pos, R, kernel, stride, dilation, padding);
  const int64_t N = a.N, C = a.C;
  TORCH_CHECK(C > 0 ? a.O % C == 0 : a.O == 0, "depthwise_sectional_products: ", a.O,
              " output channels are not a multiple of ", C, " input channels");
  TORCH_CHECK(a.kh * a.kw <= kMaxTaps, "depthwise_sectional_products: kernels up to ", kMaxTaps, " taps, not ", a.kh,
              "x", a.kw);
  // one output row (column) reads the same taps at any stride past the padded plane: capped
  // there, since the phase planes take stride² memory
  const int64_t sh = a.h == 1 ? std::min(a.sh, a.Hp) : a.sh, sw = a.w == 1 ? std::min(a.sw, a.Wp) : a.sw;
  at::Tensor out = at::empty({N, C, a.H, a.W}, x_pos.options());
  if (N == 0 || C == 0) return out;
  const Geometry g{a.H, a.W, a.top, a.left, a.Hp, a.Wp, a.h, a.w, a.kh, a.kw, sh, sw, a.dh, a.dw, a.O / C};
  AT_DISPATCH_FLOATING_TYPES(x_pos.scalar_type(), "depthwise_sectional_products_cpu", [&] {
    const at::Tensor xin = x_pos.contiguous(), r = R.contiguous();
    const scalar_t* xp = xin.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t plane = g.H * g.W, r_plane = g.m * g.h * g.w;
    // planes are independent: a few per task when they are small
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.Hp * g.Wp));
    std::vector<int64_t> offsets(g.kh * g.kw);  // of each tap (its phase, row and column) in the phase planes
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx) offsets[ky * g.kw + kx] = g.phase_index(ky * g.dh, kx * g.dw);
    const int64_t reach = *std::max_element(offsets.begin(), offsets.end());
    const std::vector<PhaseRun> runs = phase_runs(g);
    const auto one_plane = one_plane_for_this_cpu<scalar_t>();
    at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
      Scratch<scalar_t> scratch(g, reach);
      for (int64_t p = p0; p < p1; ++p)
        one_plane(xp + p * plane, rp + p * r_plane, op + p * plane, g, offsets.data(), runs, scratch);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) { m.impl("depthwise_sectional_products", &depthwise_sectional_products_cpu); }

}  // namespace rsp_fast
