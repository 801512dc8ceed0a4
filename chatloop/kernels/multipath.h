/* What the multi-path library's files (qgemv.c, bf16gemv.c) share. They are compiled without -march=native, so
 * each SIMD helper states the target it needs; callers of a wider target may inline it. */
#pragma once
#include <immintrin.h>

/* The sum of the eight lanes of v. */
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
