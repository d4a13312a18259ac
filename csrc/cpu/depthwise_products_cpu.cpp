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

// Per-thread buffers, reused from plane to plane. They start zeroed; x's padding and the gaps
// between output rows in rp, rn are never written, so they stay zero for every plane.
template <typename T>
struct Scratch {
  std::vector<T> x, dx, rp, rn, ga, gb, sp, sn;
  explicit Scratch(const Geometry& g)
      : x(g.phases_size()), dx(g.phases_size()), rp(g.h * g.Wq()), rn(g.h * g.Wq()), ga(g.run_length()),
        gb(g.run_length()), sp(g.run_length()), sn(g.run_length()) {}
};

// One output channel (its sections in s.rp, s.rn): the filters, the responses of both sections,
// their normalisation and the back-projection, added into s.dx. ``offsets``: each tap's.
template <typename T>
RSP_INLINE void channel_products_impl(Scratch<T>& s, const int64_t* offsets, int64_t taps, int64_t n_pos) {
  const T* __restrict__ x = s.x.data();
  T* __restrict__ dx = s.dx.data();
  const T* __restrict__ p = s.rp.data();
  const T* __restrict__ n = s.rn.data();
  T* __restrict__ ga = s.ga.data();
  T* __restrict__ gb = s.gb.data();
  T* __restrict__ sp = s.sp.data();
  T* __restrict__ sn = s.sn.data();
  T fp[kMaxTaps], fn[kMaxTaps];
  // filters F+-[t] = sum_l R+-[l] x[l + tap t], kTapBlock taps at a time: each load of the
  // sections serves 2 * kTapBlock independent vector accumulators (one tap at a time waited on
  // the latency of its two multiply-add chains, and loaded the sections once per tap)
  constexpr int64_t V = 64 / sizeof(T);
  const int64_t whole = n_pos / V * V;
  for (int64_t t0 = 0; t0 < taps; t0 += kTapBlock) {
    const int nt = static_cast<int>(std::min<int64_t>(kTapBlock, taps - t0));
    const T* xs[kTapBlock];
    for (int j = 0; j < kTapBlock; ++j) xs[j] = x + offsets[t0 + std::min(j, nt - 1)];  // spare ones: discarded
    T a[kTapBlock][V] = {}, b[kTapBlock][V] = {};
    for (int64_t l = 0; l < whole; l += V)
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
      for (int64_t l = whole; l < n_pos; ++l) {
        sa += p[l] * xs[j][l];
        sb += n[l] * xs[j][l];
      }
      fp[t0 + j] = sa;
      fn[t0 + j] = sb;
    }
  }
  // responses, three taps per pass over them (a third of the loads and stores of one tap per pass)
  int64_t t = 0;
  for (; t + 3 <= taps; t += 3) {
    const T* __restrict__ x0 = x + offsets[t];
    const T* __restrict__ x1 = x + offsets[t + 1];
    const T* __restrict__ x2 = x + offsets[t + 2];
    const T a0 = fp[t], a1 = fp[t + 1], a2 = fp[t + 2], b0 = fn[t], b1 = fn[t + 1], b2 = fn[t + 2];
    const bool first = t == 0;
#pragma omp simd
    for (int64_t l = 0; l < n_pos; ++l) {
      const T ga0 = first ? T(0) : ga[l], gb0 = first ? T(0) : gb[l];
      ga[l] = ga0 + a0 * x0[l] + a1 * x1[l] + a2 * x2[l];
      gb[l] = gb0 + b0 * x0[l] + b1 * x1[l] + b2 * x2[l];
    }
  }
  if (t == 0) {
    std::fill(ga, ga + n_pos, T(0));
    std::fill(gb, gb + n_pos, T(0));
  }
  for (; t < taps; ++t) {
    const T* __restrict__ xs = x + offsets[t];
    const T a = fp[t], b = fn[t];
#pragma omp simd
    for (int64_t l = 0; l < n_pos; ++l) {
      ga[l] += a * xs[l];
      gb[l] += b * xs[l];
    }
  }
#pragma omp simd
  for (int64_t l = 0; l < n_pos; ++l) {  // normalisation; R+- >= 0, so "!= 0" is "> 0"
    sp[l] = (p[l] != T(0) && ga[l] != T(0)) ? p[l] / (ga[l] != T(0) ? ga[l] : T(1)) : T(0);
    sn[l] = (n[l] != T(0) && gb[l] != T(0)) ? n[l] / (gb[l] != T(0) ? gb[l] : T(1)) : T(0);
  }
  for (int64_t t = 0; t < taps; ++t) {  // back-projection
    T* __restrict__ ds = dx + offsets[t];
    const T a = fp[t], b = fn[t];
#pragma omp simd
    for (int64_t l = 0; l < n_pos; ++l) ds[l] += a * sp[l] - b * sn[l];
  }
}

RSP_VECTOR_CLONES void channel_products(Scratch<float>& s, const int64_t* offsets, int64_t taps, int64_t n_pos) {
  channel_products_impl(s, offsets, taps, n_pos);
}
RSP_VECTOR_CLONES void channel_products(Scratch<double>& s, const int64_t* offsets, int64_t taps, int64_t n_pos) {
  channel_products_impl(s, offsets, taps, n_pos);
}

// The input plane's elements in runs: f(src, dst, n) for the n elements at src, src + sw, ... of
// the (H, W) plane, which lie at dst, dst + 1, ... in the phase planes.
template <typename F>
void for_each_phase_run(const Geometry& g, const F& f) {
  for (int64_t y = 0; y < g.H; ++y)
    for (int64_t phase = 0; phase < g.sw; ++phase) {
      const int64_t c0 = ((phase - g.left) % g.sw + g.sw) % g.sw;  // first column in this column phase
      if (c0 >= g.W) continue;
      f(y * g.W + c0, g.phase_index(y + g.top, c0 + g.left), (g.W - c0 + g.sw - 1) / g.sw);
    }
}

// One input plane x (H, W) and its m relevance planes R (m, h, w): the back-projection (H, W) into out.
template <typename T>
void one_plane(const T* x, const T* R, T* out, const Geometry& g, const int64_t* offsets, Scratch<T>& s) {
  std::fill(s.dx.begin(), s.dx.end(), T(0));
  for_each_phase_run(g, [&](int64_t src, int64_t dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) s.x[dst + i] = x[src + i * g.sw];
  });
  const int64_t Wq = g.Wq(), taps = g.kh * g.kw;
  for (int64_t j = 0; j < g.m; ++j) {
    const T* r = R + j * g.h * g.w;
    bool any = false;
    for (int64_t oy = 0; oy < g.h; ++oy)
      for (int64_t ox = 0; ox < g.w; ++ox) {
        const T v = r[oy * g.w + ox];
        s.rp[oy * Wq + ox] = v > T(0) ? v : T(0);
        s.rn[oy * Wq + ox] = v < T(0) ? -v : T(0);
        any |= v != T(0);
      }
    if (any) channel_products(s, offsets, taps, g.run_length());  // no relevance: nothing to pass back
  }
  for_each_phase_run(g, [&](int64_t src, int64_t dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[src + i * g.sw] = s.dx[dst + i];
  });
}

}  // namespace

at::Tensor depthwise_sectional_products_cpu(const at::Tensor& x_pos, const at::Tensor& R, at::IntArrayRef kernel,
                                            at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding) {
  const ConvArgs a = check_products_args("depthwise_sectional_products", x_pos, R, kernel, stride, dilation, padding);
  const int64_t N = a.N, C = a.C;
  TORCH_CHECK(C > 0 && a.O % C == 0, "depthwise_sectional_products: ", a.O, " output channels are not a multiple of ",
              C, " input channels");
  TORCH_CHECK(a.kh * a.kw <= kMaxTaps, "depthwise_sectional_products: kernels up to ", kMaxTaps, " taps, not ", a.kh,
              "x", a.kw);
  const Geometry g{a.H, a.W, a.top, a.left, a.Hp, a.Wp, a.h, a.w, a.kh, a.kw, a.sh, a.sw, a.dh, a.dw, a.O / C};
  at::Tensor out = at::empty({N, C, g.H, g.W}, x_pos.options());
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
    at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
      Scratch<scalar_t> scratch(g);
      for (int64_t p = p0; p < p1; ++p)
        one_plane<scalar_t>(xp + p * plane, rp + p * r_plane, op + p * plane, g, offsets.data(), scratch);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) { m.impl("depthwise_sectional_products", &depthwise_sectional_products_cpu); }

}  // namespace rsp_fast
