/* ChatLoop's small-batch linear kernel: y[b, o] = sum_i w[o, i] x[b, i] + bias[o].
 *
 * A decode step multiplies 1-16 rows by every weight matrix, so its time is the time to
 * stream the weights from memory (at 16 rows, also the FMAs). Four weight rows are read side
 * by side (four hardware prefetch streams per thread) and each is used for up to three input
 * rows while it is in registers. w is row-major [O, I] float32, as checkpoints store it: no second copy.
 * Built with -march=native -fopenmp; OpenMP resolves to the runtime torch already loaded.
 */
#include "simd.h"
#include <stdint.h>

/* Writes y[b + j, o + r] for the tile's accumulators acc[r][j]: horizontal sum, the tail of
 * I past the last full vector, bias. */
static inline void store_tile(const __m256 (*acc)[3], int nb, const float* x, const float* const* wr,
                              const float* bias, float* y, int64_t b, int64_t o, int rows, int64_t O,
                              int64_t I, int64_t vec_end) {
  for (int j = 0; j < nb; ++j) {
    const float* xb = x + (b + j) * I;
    for (int r = 0; r < rows; ++r) {
      float sum = hsum(acc[r][j]);
      for (int64_t i = vec_end; i < I; ++i) sum += wr[r][i] * xb[i];
      y[(b + j) * O + o + r] = sum + (bias ? bias[o + r] : 0.0f);
    }
  }
}

/* Rows o..o+3 of w against input rows b..b+2, prefetching the first pf_lines cache lines at pf
 * into L2 on the way. Twelve accumulators, three input vectors and one weight vector fill the
 * sixteen ymm registers: 7 loads per 12 FMAs. The empty asm statements pin the loaded vectors
 * to registers; gcc otherwise folds every use into an FMA memory operand (16 loads per 12 FMAs:
 * load-bound at ~60% of the FMA peak at 16 rows). */
static inline void tile3(const float* x, const float* const* wr, const float* bias, float* y,
                         int64_t b, int64_t o, int rows, int64_t O, int64_t I, int64_t vec_end,
                         const char* pf, int64_t pf_lines) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
  const float *x0 = x + b * I, *x1 = x0 + I, *x2 = x1 + I;
  for (int64_t i = 0; i < vec_end; i += 8) {
    __m256 v0 = _mm256_loadu_ps(x0 + i), v1 = _mm256_loadu_ps(x1 + i), v2 = _mm256_loadu_ps(x2 + i);
    __asm__("" : "+x"(v0), "+x"(v1), "+x"(v2));
    if ((i >> 3) < pf_lines) _mm_prefetch(pf + 8 * i, _MM_HINT_T1);  /* line i/8: 8 floats a step */
    __m256 w = _mm256_loadu_ps(wr[0] + i);
    __asm__("" : "+x"(w));
    a00 = _mm256_fmadd_ps(w, v0, a00), a01 = _mm256_fmadd_ps(w, v1, a01), a02 = _mm256_fmadd_ps(w, v2, a02);
    w = _mm256_loadu_ps(wr[1] + i);
    __asm__("" : "+x"(w));
    a10 = _mm256_fmadd_ps(w, v0, a10), a11 = _mm256_fmadd_ps(w, v1, a11), a12 = _mm256_fmadd_ps(w, v2, a12);
    w = _mm256_loadu_ps(wr[2] + i);
    __asm__("" : "+x"(w));
    a20 = _mm256_fmadd_ps(w, v0, a20), a21 = _mm256_fmadd_ps(w, v1, a21), a22 = _mm256_fmadd_ps(w, v2, a22);
    w = _mm256_loadu_ps(wr[3] + i);
    __asm__("" : "+x"(w));
    a30 = _mm256_fmadd_ps(w, v0, a30), a31 = _mm256_fmadd_ps(w, v1, a31), a32 = _mm256_fmadd_ps(w, v2, a32);
  }
  const __m256 acc[4][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
  store_tile(acc, 3, x, wr, bias, y, b, o, rows, O, I, vec_end);
}

/* The same for the last one or two input rows (NB = 1 or 2), where gcc allocates registers well. */
#define TILE(NB)                                                                              \
  do {                                                                                        \
    __m256 acc[4][3];                                                                         \
    for (int r = 0; r < 4; ++r)                                                               \
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();                          \
    for (int64_t i = 0; i < vec_end; i += 8) {                                                \
      __m256 xv[NB];                                                                          \
      for (int j = 0; j < NB; ++j) xv[j] = _mm256_loadu_ps(x + (b + j) * I + i);             \
      for (int r = 0; r < 4; ++r) {                                                           \
        const __m256 wv = _mm256_loadu_ps(wr[r] + i);                                         \
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);      \
      }                                                                                       \
    }                                                                                         \
    store_tile((const __m256(*)[3])acc, NB, x, wr, bias, y, b, o, rows, O, I, vec_end);       \
  } while (0)

/* One input row (batch-1 decode): one weight row at a time, start to end, with four independent sums, so that a
 * thread's rows (contiguous under the static schedule) are one sequential stream the hardware prefetchers follow at
 * full speed (as bf16gemv.c; eight rows side by side, eight streams a thread, were slower there by 1.25-1.35x). */
static inline void row1(const float* x, const float* w, const float* bias, float* y, int64_t o, int64_t I,
                        int64_t vec_end) {
  const float* wr = w + o * I;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t end32 = I & ~(int64_t)31;
  for (int64_t i = 0; i < end32; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (int64_t i = end32; i < vec_end; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(x + i), a0);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (int64_t i = vec_end; i < I; ++i) sum += wr[i] * x[i];
  y[o] = sum + (bias ? bias[o] : 0.0f);
}

/* The work of chatloop_linear shared among the threads of the caller's parallel region (an orphaned omp for,
 * ending with its barrier): the fused decode step runs a whole stage in one region. */
void chatloop_linear_shared(const float* x, const float* w, const float* bias, float* y, int64_t B, int64_t O,
                            int64_t I) {
  const int64_t vec_end = I & ~(int64_t)7;
  if (B == 1) {
#pragma omp for schedule(static)
    for (int64_t o = 0; o < O; ++o) row1(x, w, bias, y, o, I, vec_end);
    return;
  }
#pragma omp for schedule(static)
  for (int64_t o = 0; o < O; o += 4) {
    const int rows = O - o < 4 ? (int)(O - o) : 4;
    const float* wr[4];
    for (int r = 0; r < 4; ++r) wr[r] = w + (o + (r < rows ? r : 0)) * I;  /* past the end: repeat row o, unused */
    /* From 4 input rows on, a group of weight rows is read by several tiles and the hardware
     * prefetcher stops running ahead: fetch the next group (4 rows x I floats = I/4 lines) into
     * L2 while this one computes, a share per tile. 1.1-1.3x faster at 16 rows from DRAM. */
    const int64_t tiles = B / 3, next_lines = (B > 3 && o + 8 <= O) ? I / 4 : 0;
    const char* next = (const char*)(w + (o + 4) * I);
    int64_t b = 0;
    for (int64_t t = 0; b + 3 <= B; b += 3, ++t) {
      const int64_t first = t * next_lines / tiles, last = (t + 1) * next_lines / tiles;
      tile3(x, wr, bias, y, b, o, rows, O, I, vec_end, next + 64 * first, last - first);
    }
    if (B - b == 2) TILE(2);
    else if (B - b == 1) TILE(1);
  }
}

void chatloop_linear(const float* x, const float* w, const float* bias, float* y,
                     int64_t B, int64_t O, int64_t I, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  chatloop_linear_shared(x, w, bias, y, B, O, I);
}

/* Reads n floats (n % 4096 == 0) in four streams per thread and returns their sum: the
 * machine's read bandwidth as a kernel like the one above sees it (for the benchmarks). */
float chatloop_stream_read(const float* p, int64_t n, int num_threads) {
  const int64_t quarter = n / 4;
  float total = 0.0f;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(num_threads)
  for (int64_t c = 0; c < quarter; c += 1024) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = c; i < c + 1024; i += 8) {
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + i));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p + quarter + i));
      s2 = _mm256_add_ps(s2, _mm256_loadu_ps(p + 2 * quarter + i));
      s3 = _mm256_add_ps(s3, _mm256_loadu_ps(p + 3 * quarter + i));
    }
    total += hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  }
  return total;
}
