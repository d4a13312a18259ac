// CPU masked sectional products: RSP's three matrix products for a dense conv layer
// (RSP_SPEC.md section 2, steps 1-4), computed only where the relevance is non-zero.
//
// Every product of an inner conv is a sum over the positions where R+ or R- is non-zero:
//   filters        F+-[o]   = sum_l R+-[o,l] * patch(l)
//   normalisation  S+-[o,l] = R+-[o,l] / (F+-[o] . patch(l))      only where R+-[o,l] != 0
//   back-projection dX[patch(l)] += S+[o,l] F+[o] - S-[o,l] F-[o]
// so each costs nnz(R) * k*k*C multiply-adds, against 2 * O * L * k*k*C for the dense
// products on the stacked sections [R+; R-]. Behind a max pool only one position of each
// window carries relevance (nnz <= O*L/4: 8x fewer), behind a ReLU only the active units.
//
// Layout: each sample's input (already clamped) is copied, padded, to channels-last with the
// channels padded to whole vectors, so a patch is a few runs of contiguous vectors; each
// (channel, sign) keeps its non-zeros as (patch origin, |R|) entries in position order.
// Work goes strip by strip of output rows whose input rows stay in L2.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../products_checks.h"
#include "vector_clones.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

namespace rsp_fast {
namespace {


// A buffer aligned to 64 bytes, not initialised: every vector load then touches one cache
// line, not two (an unaligned 64-byte load straddles lines: the kernels ran 1.1-1.3x slower).
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Aligned = std::unique_ptr<T[], AlignedFree>;
template <typename T>
Aligned<T> aligned(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  TORCH_CHECK(p != nullptr, "masked_sectional_products: out of memory (", bytes, " bytes)");
  return Aligned<T>(static_cast<T*>(p));
}

template <typename T>
struct Entry {
  int32_t origin;  // offset of the patch's first element in the channels-last input (checked < 2^31)
  T value;         // |R| on the way in, the signed sectional ratio S after the normalisation
};

// A patch as blocks of contiguous vectors: block k covers vectors [first, first + count) of
// the flattened filter (ky, kx, channel) and starts at x[origin + offset] in the input.
// With dilation 1 along the width a kernel row is one contiguous run of kw * Cp elements.
struct Block {
  int64_t offset, first;
  int count;
};

// Vectors accumulated in registers per sweep over the entries: 12 of AVX-512's 32 registers
// (1.1-1.2x faster than 8 on 64-128 channels here); 6 where a vector takes two of AVX2's 16.
constexpr int kBlock = 12;
int block_limit() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const int limit = __builtin_cpu_supports("avx512f") ? kBlock : kBlock / 2;
  return limit;
#else
  return kBlock / 2;
#endif
}

// The blocks of the channel vectors [c0, c1) of every tap (all of them: whole kernel rows).
std::vector<Block> patch_blocks(int64_t kh, int64_t kw, int64_t dh, int64_t dw, int64_t Wp, int64_t Cp,
                                int64_t lanes, int64_t c0, int64_t c1) {
  const int64_t cv = Cp / lanes;
  const bool rows = dw == 1 && c0 == 0 && c1 == cv;
  std::vector<Block> blocks;
  const int64_t limit = block_limit();
  auto add_run = [&](int64_t offset, int64_t first, int64_t count) {  // split evenly into <= limit
    const int64_t pieces = (count + limit - 1) / limit;
    for (int64_t p = 0, done = 0; p < pieces; ++p) {
      const int64_t size = (count - done) / (pieces - p);
      blocks.push_back({offset + done * lanes, first + done, static_cast<int>(size)});
      done += size;
    }
  };
  for (int64_t ky = 0; ky < kh; ++ky) {
    if (rows) {
      add_run(ky * dh * Wp * Cp, ky * kw * cv, kw * cv);
      continue;
    }
    for (int64_t kx = 0; kx < kw; ++kx)
      add_run((ky * dh * Wp + kx * dw) * Cp + c0 * lanes, (ky * kw + kx) * cv + c0, c1 - c0);
  }
  return blocks;
}

// out[b] = sum_e e.value * x[e.origin + offset + b] for the B vectors of one block.
template <int B, typename T>
RSP_INLINE void filter_block(T* __restrict__ out, const Entry<T>* entries, int64_t n, const T* __restrict__ x,
                             int64_t offset) {
  constexpr int64_t L = kLanes<T>;
  T acc[B][L] = {};
  for (int64_t e = 0; e < n; ++e) {
    const T v = entries[e].value;
    const T* src = x + entries[e].origin + offset;
    for (int b = 0; b < B; ++b) {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) acc[b][i] += v * src[b * L + i];
    }
  }
  for (int b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) out[b * L + i] = acc[b][i];
}

// dx[e.origin + offset + b] += e.value * f[b] for the B vectors of one block.
template <int B, typename T>
RSP_INLINE void back_block(T* __restrict__ dx, const Entry<T>* entries, int64_t n, const T* __restrict__ f,
                           int64_t offset) {
  constexpr int64_t L = kLanes<T>;
  T fr[B][L];
  for (int b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) fr[b][i] = f[b * L + i];
  for (int64_t e = 0; e < n; ++e) {
    const T v = entries[e].value;
    T* dst = dx + entries[e].origin + offset;
    for (int b = 0; b < B; ++b) {
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) dst[b * L + i] += v * fr[b][i];
    }
  }
}

// A block's kernel with its size B a compile-time constant (registers, unrolled loops).
#define RSP_BLOCK_SWITCH(fn, count, ...)                  \
  switch (count) {                                         \
    case 1: return fn<1>(__VA_ARGS__);                     \
    case 2: return fn<2>(__VA_ARGS__);                     \
    case 3: return fn<3>(__VA_ARGS__);                     \
    case 4: return fn<4>(__VA_ARGS__);                     \
    case 5: return fn<5>(__VA_ARGS__);                     \
    case 6: return fn<6>(__VA_ARGS__);                     \
    case 7: return fn<7>(__VA_ARGS__);                     \
    case 8: return fn<8>(__VA_ARGS__);                     \
    case 9: return fn<9>(__VA_ARGS__);                     \
    case 10: return fn<10>(__VA_ARGS__);                   \
    case 11: return fn<11>(__VA_ARGS__);                   \
    default: return fn<12>(__VA_ARGS__);                   \
  }

// For each entry: the response g = f . patch, then value <- sign * value / g (0 where g = 0).
// Four entries at a time share each load of the filter.
template <typename T>
RSP_INLINE void normalize_entries(Entry<T>* entries, int64_t n, const T* __restrict__ f, const T* __restrict__ x,
                                  const Block* blocks, int64_t n_blocks, T sign) {
  constexpr int64_t L = kLanes<T>;
  constexpr int kGroup = 4;
  auto finish = [sign](Entry<T>& entry, const T* acc) {
    T g = 0;
    for (int64_t i = 0; i < L; ++i) g += acc[i];
    entry.value = g != T(0) ? sign * entry.value / g : T(0);
  };
  int64_t e = 0;
  for (; e + kGroup <= n; e += kGroup) {
    T acc[kGroup][L] = {};
    for (int64_t k = 0; k < n_blocks; ++k) {
      const Block& blk = blocks[k];
      const T* fb = f + blk.first * L;
      const T* src[kGroup];
      for (int q = 0; q < kGroup; ++q) src[q] = x + entries[e + q].origin + blk.offset;
      for (int b = 0; b < blk.count; ++b)
        for (int q = 0; q < kGroup; ++q) {
#pragma omp simd
          for (int64_t i = 0; i < L; ++i) acc[q][i] += fb[b * L + i] * src[q][b * L + i];
        }
    }
    for (int q = 0; q < kGroup; ++q) finish(entries[e + q], acc[q]);
  }
  for (; e < n; ++e) {
    T acc[L] = {};
    for (int64_t k = 0; k < n_blocks; ++k) {
      const Block& blk = blocks[k];
      const T* fb = f + blk.first * L;
      const T* src = x + entries[e].origin + blk.offset;
      for (int b = 0; b < blk.count; ++b) {
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) acc[i] += fb[b * L + i] * src[b * L + i];
      }
    }
    finish(entries[e], acc);
  }
}

#define RSP_CLONED_KERNELS(T, suffix)                                                                         \
  RSP_VECTOR_CLONES void filters_##suffix(T* out, const Entry<T>* entries, int64_t n, const T* x,             \
                                          const Block& blk) {                                                 \
    RSP_BLOCK_SWITCH(filter_block, blk.count, out, entries, n, x, blk.offset)                                 \
  }                                                                                                           \
  RSP_VECTOR_CLONES void back_##suffix(T* dx, const Entry<T>* entries, int64_t n, const T* f, const Block& blk) { \
    RSP_BLOCK_SWITCH(back_block, blk.count, dx, entries, n, f + blk.first * kLanes<T>, blk.offset)            \
  }                                                                                                           \
  RSP_VECTOR_CLONES void normalize_##suffix(Entry<T>* entries, int64_t n, const T* f, const T* x,             \
                                            const Block* blocks, int64_t n_blocks, T sign) {                  \
    normalize_entries(entries, n, f, x, blocks, n_blocks, sign);                                              \
  }
RSP_CLONED_KERNELS(float, f)
RSP_CLONED_KERNELS(double, d)

template <typename T>
struct Kernels;
template <>
struct Kernels<float> {
  static constexpr auto filters = filters_f;
  static constexpr auto normalize = normalize_f;
  static constexpr auto back = back_f;
};
template <>
struct Kernels<double> {
  static constexpr auto filters = filters_d;
  static constexpr auto normalize = normalize_d;
  static constexpr auto back = back_d;
};

struct Shape {
  int64_t C, H, W, top, left;  // the input and where it sits in the padded one
  int64_t Hp, Wp, Cp, O, h, w, sh, sw, kh, kw, dh, dw;
};

constexpr int64_t kTile = 16;  // pixels per tile of the layout changes: a tile's channels-last block stays in L1

// One NCHW sample into the padded channels-last buffer: border and extra channels zero.
template <typename T>
void to_channels_last(const T* src, T* dst, const Shape& s) {
  at::parallel_for(0, s.Hp, 1, [&](int64_t y0, int64_t y1) {
    for (int64_t yp = y0; yp < y1; ++yp) {
      T* row = dst + yp * s.Wp * s.Cp;
      const int64_t y = yp - s.top;
      if (y < 0 || y >= s.H) {
        std::fill(row, row + s.Wp * s.Cp, T(0));
        continue;
      }
      std::fill(row, row + s.left * s.Cp, T(0));
      std::fill(row + (s.left + s.W) * s.Cp, row + s.Wp * s.Cp, T(0));
      for (int64_t x0 = 0; x0 < s.W; x0 += kTile) {
        const int64_t n = std::min(kTile, s.W - x0);
        T* tile = row + (s.left + x0) * s.Cp;
        for (int64_t c = 0; c < s.C; ++c) {
          const T* in = src + (c * s.H + y) * s.W + x0;
          for (int64_t i = 0; i < n; ++i) tile[i * s.Cp + c] = in[i];
        }
        for (int64_t i = 0; i < n; ++i) std::fill(tile + i * s.Cp + s.C, tile + (i + 1) * s.Cp, T(0));
      }
    }
  });
}

// The inside of the padded channels-last buffer back into one NCHW sample.
template <typename T>
void from_channels_last(const T* src, T* dst, const Shape& s) {
  at::parallel_for(0, s.H, 1, [&](int64_t y0, int64_t y1) {
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t x0 = 0; x0 < s.W; x0 += kTile) {
        const int64_t n = std::min(kTile, s.W - x0);
        const T* tile = src + ((y + s.top) * s.Wp + s.left + x0) * s.Cp;
        for (int64_t c = 0; c < s.C; ++c) {
          T* out = dst + (c * s.H + y) * s.W + x0;
          for (int64_t i = 0; i < n; ++i) out[i] = tile[i * s.Cp + c];
        }
      }
  });
}

// Output rows per strip: the input rows a strip reads (its patches) fill about 384 KB, so
// that they stay in the core's L2 cache while every channel's entries in the strip use them.
template <typename T>
int64_t strip_rows(const Shape& s) {
  const int64_t row_bytes = s.Wp * s.Cp * static_cast<int64_t>(sizeof(T));
  const int64_t input_rows = std::max<int64_t>(1, (384 << 10) / row_bytes);
  return std::max<int64_t>(1, (input_rows - (s.kh - 1) * s.dh - 1) / s.sh + 1);
}

// One thread's scratch, allocated once and reused from sample to sample: each channel's
// non-zeros and where each strip's begin, and the sectional filters.
template <typename T>
struct Sections {
  int64_t positions, rows, strips, filter_size;
  std::unique_ptr<Entry<T>[]> entries;  // channel o's row: positives from the front, negatives from the back
  std::vector<int64_t> pos_end, neg_end;  // [o][strip + 1]: entries of the sign before the strip's end
  Aligned<T> filters;                      // [sign][o][filter_size]

  explicit Sections(const Shape& s)
      : positions(s.h * s.w),
        rows(strip_rows<T>(s)),
        strips((s.h + rows - 1) / rows),
        filter_size(s.kh * s.kw * s.Cp),
        entries(new Entry<T>[s.O * positions]),  // not initialised: only written entries are read
        pos_end(s.O * (strips + 1), 0),          // [o][0] stays 0, the rest is rewritten per sample
        neg_end(s.O * (strips + 1), 0),
        filters(aligned<T>(2 * s.O * filter_size)) {}

  // the entries of channel o, sign, strip t: a contiguous range
  std::pair<Entry<T>*, int64_t> range(int64_t o, int sign, int64_t t) {
    const int64_t* ends = (sign == 0 ? pos_end : neg_end).data() + o * (strips + 1);
    Entry<T>* row = entries.get() + o * positions;
    if (sign == 0) return {row + ends[t], ends[t + 1] - ends[t]};
    return {row + positions - ends[t + 1], ends[t + 1] - ends[t]};
  }
  T* filter(int64_t o, int sign, int64_t O) { return filters.get() + (sign * O + o) * filter_size; }
};

// Channel o's non-zeros in position order, split by sign, with the strip boundaries. The
// writes are unconditional and the counters advance by comparisons: R's signs and zeros
// are unpredictable, branches on them mispredict. The slots between the two ends are free.
template <typename T>
void collect_entries(Sections<T>& sec, const T* r, int64_t o, const Shape& s) {
  const int64_t positions = sec.positions, rows = sec.rows;
  Entry<T>* row = sec.entries.get() + o * positions;
  int64_t* pe = sec.pos_end.data() + o * (sec.strips + 1);
  int64_t* ne = sec.neg_end.data() + o * (sec.strips + 1);
  int64_t np = 0, nn = 0;
  for (int64_t y = 0; y < s.h; ++y) {
    for (int64_t xq = 0; xq < s.w; ++xq) {
      const T v = r[y * s.w + xq];
      const auto origin = static_cast<int32_t>((y * s.sh * s.Wp + xq * s.sw) * s.Cp);
      // Both free ends are written, the value's own last: the ends meet at the last free slot.
      // The slots are picked by arithmetic: written as conditionals, GCC branched on the sign.
      // a NaN is an entry (of F+): it reaches the output over its patch (the dense reference's NaN
      // covers the whole sample; the API refuses NaN inputs and checks the map, so no finite map differs)
      const int64_t pos = !(v <= T(0));
      const int64_t front = np, back = positions - 1 - nn;
      row[front + (back - front) * pos] = {origin, T(0)};
      row[back + (front - back) * pos] = {origin, std::abs(v)};
      np += pos;
      nn += v < T(0);
    }
    if ((y + 1) % rows == 0 || y + 1 == s.h) {
      pe[(y + rows) / rows] = np;
      ne[(y + rows) / rows] = nn;
    }
  }
}

// One sample: x (Hp, Wp, Cp) channels-last, R (O, h, w); adds the back-projection into dx
// (Hp, Wp, Cp, zero on entry). Parallel inside when called outside a parallel region.
template <typename T>
void one_sample(const T* x, const T* R, T* dx, const Shape& s, Sections<T>& sec) {
  constexpr int64_t L = kLanes<T>;
  const int64_t channel_vectors = s.Cp / L;
  const std::vector<Block> blocks = patch_blocks(s.kh, s.kw, s.dh, s.dw, s.Wp, s.Cp, L, 0, channel_vectors);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  std::fill(sec.filters.get(), sec.filters.get() + 2 * s.O * sec.filter_size, T(0));
  at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) collect_entries(sec, R + o * sec.positions, o, s);
  });
  // Each pass walks the strips in order; inside a strip, channels in parallel (phases 1, 2)
  // or the channels of the input in parallel (phase 3: threads never write the same place).
  for (int64_t t = 0; t < sec.strips; ++t) {  // 1: filters, summed over the strips
    at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
      T part[kBlock * L];
      for (int64_t o = o0; o < o1; ++o)
        for (int sign = 0; sign < 2; ++sign) {
          auto [list, n] = sec.range(o, sign, t);
          if (n == 0) continue;
          T* f = sec.filter(o, sign, s.O);
          for (const Block& blk : blocks) {
            Kernels<T>::filters(part, list, n, x, blk);
            T* dst = f + blk.first * L;
            for (int64_t i = 0; i < blk.count * L; ++i) dst[i] += part[i];
          }
        }
    });
  }
  for (int64_t t = 0; t < sec.strips; ++t) {  // 2: responses, normalised in place
    at::parallel_for(0, s.O, 1, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int sign = 0; sign < 2; ++sign) {
          auto [list, n] = sec.range(o, sign, t);
          if (n > 0) Kernels<T>::normalize(list, n, sec.filter(o, sign, s.O), x, blocks.data(), n_blocks, sign ? T(-1) : T(1));
        }
    });
  }
  at::parallel_for(0, channel_vectors, 1, [&](int64_t c0, int64_t c1) {  // 3: back-projection
    const std::vector<Block> mine = patch_blocks(s.kh, s.kw, s.dh, s.dw, s.Wp, s.Cp, L, c0, c1);
    for (int64_t t = 0; t < sec.strips; ++t)
      for (int64_t o = 0; o < s.O; ++o)
        for (int sign = 0; sign < 2; ++sign) {
          auto [list, n] = sec.range(o, sign, t);
          if (n == 0) continue;
          const T* f = sec.filter(o, sign, s.O);
          for (const Block& blk : mine) Kernels<T>::back(dx, list, n, f, blk);
        }
  });
}

}  // namespace

at::Tensor masked_sectional_products_cpu(const at::Tensor& x_pos, const at::Tensor& R, at::IntArrayRef kernel,
                                         at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding) {
  const ConvArgs a = check_products_args("masked_sectional_products", x_pos, R, kernel, stride, dilation, padding);
  const int64_t N = a.N, C = a.C, H = a.H, W = a.W, Hp = a.Hp, Wp = a.Wp;
  at::Tensor out = at::empty({N, C, H, W}, x_pos.options());
  if (N == 0 || C == 0 || a.O == 0) return out.zero_();  // nothing to gather (and no row to size a strip by)
  AT_DISPATCH_FLOATING_TYPES(x_pos.scalar_type(), "masked_sectional_products_cpu", [&] {
    constexpr int64_t L = kLanes<scalar_t>;
    const int64_t Cp = (C + L - 1) / L * L, plane = Hp * Wp * Cp;
    TORCH_CHECK(plane < (int64_t(1) << 31), "masked_sectional_products: one padded sample has ", plane,
                " elements, past the kernels' 32-bit offsets");
    const Shape shape{C, H, W, a.top, a.left, Hp, Wp, Cp, a.O, a.h, a.w, a.sh, a.sw, a.kh, a.kw, a.dh, a.dw};
    const at::Tensor xin = x_pos.contiguous(), r = R.contiguous();
    const scalar_t* xp = xin.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t x_step = C * H * W, r_step = shape.O * shape.h * shape.w;
    // Each thread's samples go through its own channels-last buffers (input and back-projection)
    // and scratch, reused from sample to sample: the layout changes happen while the sample is in cache.
    auto run = [&](int64_t n0, int64_t n1) {
      Aligned<scalar_t> x = aligned<scalar_t>(plane), dx = aligned<scalar_t>(plane);
      Sections<scalar_t> sections(shape);
      for (int64_t n = n0; n < n1; ++n) {
        to_channels_last(xp + n * x_step, x.get(), shape);
        std::fill(dx.get(), dx.get() + plane, scalar_t(0));
        one_sample<scalar_t>(x.get(), rp + n * r_step, dx.get(), shape, sections);
        from_channels_last(dx.get(), op + n * x_step, shape);
      }
    };
    // samples in parallel when there are enough of them (each thread whole samples: nothing
    // shared); the inside of one sample in parallel otherwise
    if (N >= at::get_num_threads())
      at::parallel_for(0, N, 1, run);
    else
      run(0, N);
  });
  return out;
}

TORCH_LIBRARY_IMPL(rsp_fast, CPU, m) { m.impl("masked_sectional_products", &masked_sectional_products_cpu); }

}  // namespace rsp_fast
