/* What the multi-path library's files (qgemv.c, bf16gemv.c, kquant.c, ggufgemv.c) share. They are compiled without
 * -march=native, so each SIMD helper states the target it needs; callers of a wider target may inline it. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* IEEE half to float, without F16C (the portable paths). */
static inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else { /* subnormal: normalise */
    int shift = 0;
    uint32_t m = mantissa;
    while (!(m & 0x400)) m <<= 1, ++shift;
    bits = sign | ((uint32_t)(113 - shift) << 23) | ((m & 0x3FF) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* One row of activations as int8 blocks of 32, llama.cpp's Q8_1 (Q8_0 is its q and d): xq [nb * 32], xd [nb], xs [nb]
 * (d times the sum of q). Ties round to even (nearbyintf), as torch.round. */
static inline void quantize_row_q8_1(const float* x, int8_t* xq, float* xd, float* xs, int64_t nb) {
  for (int64_t k = 0; k < nb; ++k) {
    const float* v = x + k * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(v[j]));
    const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int q = (int)nearbyintf(v[j] * inv);
      xq[k * 32 + j] = (int8_t)q;
      sum += q;
    }
    xd[k] = d;
    xs[k] = d * (float)sum;
  }
}

/* The sum of the eight lanes of v. */
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
