// fp32 SIMD helpers shared by the CPU kernels: GCC/Clang vector types as wide as the build
// machine's registers, and a vectorisable exp for softmax. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace duo_cpu {

// exp(x) for x <= 0 (scores minus their running max), vectorisable: 2^n * e^r with
// r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (relative error < 2e-7);
// below -87 the result is 0 (exp underflows float there anyway).
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const bool tiny = x < -87.0f;
  x = tiny ? -87.0f : x;
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : poly * scale;
}

// fp32 lanes as a GCC/Clang vector as wide as the build machine's registers: 16 with
// AVX-512, 8 otherwise. A 64-byte vector type on an AVX2 build is legal but GCC moves it
// through the stack (8% of the attention loop's instructions were vector stack moves, and
// the op ran 12x slower), so the width follows the ISA. The unaligned alias type reads and writes float rows.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef float vfu __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf loadv(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storev(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }

inline float hsum(vf x) {
  float lanes[kLanes];
  storev(lanes, x);
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += lanes[i];
  return s;
}

inline vf maxv(vf a, vf b) { return a > b ? a : b; }

inline float hmax(vf x) {
  float lanes[kLanes];
  storev(lanes, x);
  float m = lanes[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, lanes[i]);
  return m;
}

// exp of each lane, each <= 0 or -inf, as exp_nonpositive above (same polynomial).
inline vf expv_nonpositive(vf x) {
  const vi tiny = x < -87.0f;
  x = maxv(x, vf{} - 87.0f);
  // Round to nearest by adding and removing 1.5 * 2^23 (|x * log2e| < 2^22 here).
  const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vf poly = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return (vf)bits * poly * (tiny ? 0.0f : 1.0f + vf{});
}

// kLanes bf16 values (raw uint16 bits) as fp32: a bf16 is the top half of a float32. GCC
// widens the generic form through two 128-bit halves, so x86 builds use the one-instruction
// zero extension.
typedef uint16_t vh __attribute__((vector_size(2 * kLanes), aligned(2), may_alias));
inline vf load_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#elif defined(__AVX2__)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#else
  // A cast between vector types of one size keeps the bits (GCC/Clang vector extension).
  return (vf)(__builtin_convertvector(*reinterpret_cast<const vh*>(p), vi) << 16);
#endif
}

}  // namespace duo_cpu
