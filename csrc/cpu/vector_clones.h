// Hot loops of the CPU kernels are compiled for AVX-512, AVX2+FMA and baseline x86-64 and
// chosen at load time, so one binary runs everywhere with the widest vectors the CPU has.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RSP_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define RSP_VECTOR_CLONES
#endif
// for the templates a clone calls: inlined into it, so they are compiled for its target
#define RSP_INLINE inline __attribute__((always_inline))

#include <cstdint>

namespace rsp_fast {
// Lanes of one vector: 64 bytes (an AVX-512 register; two AVX2 registers), one cache line.
template <typename T>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));
}  // namespace rsp_fast
