/* ChatLoop's bfloat16 linear kernel for decode steps: y[b, o] = sum_i W[o, i] x[b, i] + bias[o], W, x, bias and
 * y bfloat16, products summed in float32 and y rounded to nearest even once, as torch's bfloat16 matmul does.
 *
 * A bfloat16 decode step streams its weights once per step, so it should run at memory bandwidth; torch's
 * oneDNN path read a [11008, 4096] matrix at about half the speed it reads the float32 one (issue 15). Three
 * paths, chosen at run time by the caller: AVX512-BF16 (vdpbf16ps: 32 products a cycle), AVX2 (bfloat16 widened
 * to float32 by a shift, then FMA), portable C. This file is compiled without -march=native: each path states
 * its own target. Each weight row is reused for up to four input rows from cache (AVX512-BF16: one row at a time,
 * the others eight rows side by side). Meant for 1-4 rows (decode steps): beyond that oneDNN's blocked GEMM is
 * faster.
 */
#include "multipath.h"
#include <stdint.h>
#include <string.h>

enum { BF16_PORTABLE = 0, BF16_AVX2 = 1, BF16_AVX512 = 2 };
#define ROWS 8   /* weight rows a tile reads (AVX2, portable: together, eight streams from memory) */
#define INPUTS 4 /* input rows a tile reuses each weight row for */

static inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* Round to nearest even, as torch's float32 -> bfloat16 conversion (NaN stays NaN). */
static inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x40);
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline void store(uint16_t* y, const uint16_t* bias, int64_t b, int64_t o, int64_t O, float sum) {
  y[b * O + o] = float_to_bf16(sum + (bias ? bf16_to_float(bias[o]) : 0.0f));
}

/* ---- portable ----------------------------------------------------------------------------------------------- */
static void tile_portable(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t b0,
                          int64_t nb, int64_t o0, int64_t no, int64_t O, int64_t I, const float* xf) {
  (void)x;
  for (int64_t r = 0; r < no; ++r)
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const uint16_t* wr = w + (o0 + r) * I;
      const float* xr = xf + b * I;
      float sum = 0.0f;
      for (int64_t i = 0; i < I; ++i) sum += bf16_to_float(wr[i]) * xr[i];
      store(y, bias, b, o0 + r, O, sum);
    }
}

/* ---- AVX2 --------------------------------------------------------------------------------------------------- */
__attribute__((target("avx2,fma"))) static inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

__attribute__((target("avx2,fma"))) static void tile_avx2(const uint16_t* x, const uint16_t* w, const uint16_t* bias,
                                                          uint16_t* y, int64_t b0, int64_t nb, int64_t o0, int64_t no,
                                                          int64_t O, int64_t I, const float* xf) {
  (void)x;
  __m256 acc[ROWS][INPUTS];
  for (int r = 0; r < ROWS; ++r)
    for (int b = 0; b < INPUTS; ++b) acc[r][b] = _mm256_setzero_ps();
  const int64_t end = I & ~(int64_t)7;
  for (int64_t i = 0; i < end; i += 8) {
    __m256 xv[INPUTS];
    for (int b = 0; b < nb; ++b) xv[b] = _mm256_loadu_ps(xf + (b0 + b) * I + i);
    for (int r = 0; r < no; ++r) {
      const __m256 wv = widen8(w + (o0 + r) * I + i);
      for (int b = 0; b < nb; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < no; ++r)
    for (int b = 0; b < nb; ++b) {
      float sum = hsum256(acc[r][b]);
      for (int64_t i = end; i < I; ++i) sum += bf16_to_float(w[(o0 + r) * I + i]) * xf[(b0 + b) * I + i];
      store(y, bias, b0 + b, o0 + r, O, sum);
    }
}

/* ---- AVX512-BF16 -------------------------------------------------------------------------------------------- */
#define BF16_TARGET "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
#define UNROLL 4 /* 32-element chunks of a row in flight: vdpbf16ps' latency hidden behind independent sums */
/* One weight row at a time, start to end, each reused for the input rows: a thread's rows are contiguous, so it
 * reads one sequential stream, which the hardware prefetchers follow at full speed. Reading eight rows side by side
 * (eight streams, with software prefetch) read [11008, 4096] at 67-75 GB/s where this reads 86-94 (2 threads,
 * the machine's plain read 76-79). The input row count is a constant so that the accumulators stay in registers. */
__attribute__((target(BF16_TARGET), always_inline)) static inline void row_avx512_n(
    const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t b0, const int nb, int64_t o,
    int64_t O, int64_t I) {
  __m512 acc[INPUTS][UNROLL];
  for (int b = 0; b < INPUTS; ++b)
    for (int u = 0; u < UNROLL; ++u) acc[b][u] = _mm512_setzero_ps();
  const uint16_t* wr = w + o * I;
  const int64_t whole = I - I % (32 * UNROLL);
  for (int64_t i = 0; i < whole; i += 32 * UNROLL)
    for (int u = 0; u < UNROLL; ++u) {
      const __m512i wv = _mm512_loadu_si512(wr + i + 32 * u);
      for (int b = 0; b < nb; ++b)
        acc[b][u] = _mm512_dpbf16_ps(acc[b][u], (__m512bh)wv,
                                     (__m512bh)_mm512_loadu_si512(x + (b0 + b) * I + i + 32 * u));
    }
  for (int64_t i = whole; i < I; i += 32) { /* the rest, past I masked to zeros: they add nothing */
    const __mmask32 mask = I - i >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (I - i)) - 1u);
    const __m512i wv = _mm512_maskz_loadu_epi16(mask, wr + i);
    for (int b = 0; b < nb; ++b)
      acc[b][0] = _mm512_dpbf16_ps(acc[b][0], (__m512bh)wv,
                                   (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (b0 + b) * I + i));
  }
  for (int b = 0; b < nb; ++b) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3]));
    store(y, bias, b0 + b, o, O, _mm512_reduce_add_ps(sum));
  }
}

__attribute__((target(BF16_TARGET))) static void tile_avx512(const uint16_t* x, const uint16_t* w,
                                                              const uint16_t* bias, uint16_t* y, int64_t b0,
                                                              int64_t nb, int64_t o0, int64_t no, int64_t O,
                                                              int64_t I, const float* xf) {
  (void)xf;
  for (int64_t o = o0; o < o0 + no; ++o) switch (nb) {
      case 1: row_avx512_n(x, w, bias, y, b0, 1, o, O, I); break;
      case 2: row_avx512_n(x, w, bias, y, b0, 2, o, O, I); break;
      case 3: row_avx512_n(x, w, bias, y, b0, 3, o, O, I); break;
      default: row_avx512_n(x, w, bias, y, b0, INPUTS, o, O, I);
    }
}

typedef void (*tile_fn)(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t,
                        int64_t, int64_t, int64_t, const float*);

/* y [B, O] = x [B, I] W^T + bias, all bfloat16 (as uint16). xf: B * I floats of scratch (the float32 paths widen
 * x into it once per call). */
void chatloop_bf16_linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t B,
                          int64_t O, int64_t I, int isa, int num_threads, float* xf) {
  const tile_fn tile = isa == BF16_AVX512 ? tile_avx512 : isa == BF16_AVX2 ? tile_avx2 : tile_portable;
#pragma omp parallel num_threads(num_threads)
  {
    if (isa != BF16_AVX512) {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < B * I; ++k) xf[k] = bf16_to_float(x[k]);
    }
#pragma omp for schedule(static)
    for (int64_t o = 0; o < O; o += ROWS) {
      const int64_t no = O - o < ROWS ? O - o : ROWS;
      for (int64_t b = 0; b < B; b += INPUTS) tile(x, w, bias, y, b, B - b < INPUTS ? B - b : INPUTS, o, no, O, I, xf);
    }
  }
}
