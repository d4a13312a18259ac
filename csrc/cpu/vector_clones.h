// Hot loops of the CPU kernels are compiled for AVX-512, AVX2+FMA and baseline x86-64 and
// chosen when run, so one binary runs everywhere with the widest vectors the CPU has: loops over
// lanes as GCC target clones (chosen at load time); kernels written with GCC's vector types (one
// type, one register) once per vector width, the width chosen per call (vector_bytes below): a
// clone for AVX2 of a 64-byte vector type went through the stack lane by lane (GCC 12), at a
// sixth of the speed of 32-byte vectors.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RSP_X86_TARGETS 1
#define RSP_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#define RSP_TARGET_AVX512 __attribute__((target("avx512f")))
#define RSP_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define RSP_X86_TARGETS 0
#define RSP_VECTOR_CLONES
#define RSP_TARGET_AVX512
#define RSP_TARGET_AVX2
#endif
// for the templates a clone calls: inlined into it, so they are compiled for its target
#define RSP_INLINE inline __attribute__((always_inline))

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace rsp_fast {
// Lanes of one vector: 64 bytes (an AVX-512 register; two AVX2 registers), one cache line.
template <typename T>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));

// Bytes of the vectors for the kernels compiled per width: the widest this CPU has (64: AVX-512,
// 32: AVX2 with FMA, else 16), or narrower where RSP_FAST_CPU_CAPABILITY asks for it ("avx2",
// "default"; as ATEN_CPU_CAPABILITY for PyTorch's own kernels). Read at each call, so that the
// tests run every width the CPU has.
inline int vector_bytes() {
#if RSP_X86_TARGETS
  static const int widest = __builtin_cpu_supports("avx512f") ? 64 : __builtin_cpu_supports("x86-64-v3") ? 32 : 16;
#else
  static const int widest = 16;
#endif
  const char* asked = std::getenv("RSP_FAST_CPU_CAPABILITY");
  if (asked == nullptr || *asked == '\0') return widest;
  const std::string name(asked);
  const int bytes = name == "avx512" ? 64 : name == "avx2" ? 32 : name == "default" ? 16 : 0;
  TORCH_CHECK(bytes > 0, "RSP_FAST_CPU_CAPABILITY is '", name, "': it takes avx512, avx2 or default");
  return std::min(bytes, widest);
}
}  // namespace rsp_fast
