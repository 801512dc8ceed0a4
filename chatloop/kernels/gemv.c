/* ChatLoop's small-batch linear kernel: y[b, o] = sum_i w[o, i] x[b, i] + bias[o].
 *
 * A decode step multiplies 1-16 rows by every weight matrix, so its time is the time to
 * stream the weights from memory. Four weight rows are read side by side (four hardware
 * prefetch streams per thread) and each is used for up to three input rows while it is in
 * registers. w is row-major [O, I] float32, as checkpoints store it: no second copy.
 * Built with -march=native -fopenmp; OpenMP resolves to the runtime torch already loaded.
 */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

/* Rows o..o+3 of w against input rows b..b+NB-1 (NB = 1, 2 or 3). */
#define TILE(NB)                                                                              \
  do {                                                                                        \
    __m256 acc[4 * NB];                                                                       \
    for (int k = 0; k < 4 * NB; ++k) acc[k] = _mm256_setzero_ps();                           \
    for (int64_t i = 0; i < vec_end; i += 8) {                                                \
      __m256 xv[NB];                                                                          \
      for (int j = 0; j < NB; ++j) xv[j] = _mm256_loadu_ps(x + (b + j) * I + i);             \
      for (int r = 0; r < 4; ++r) {                                                           \
        const __m256 wv = _mm256_loadu_ps(wr[r] + i);                                         \
        for (int j = 0; j < NB; ++j) acc[j * 4 + r] = _mm256_fmadd_ps(wv, xv[j], acc[j * 4 + r]); \
      }                                                                                       \
    }                                                                                         \
    for (int j = 0; j < NB; ++j) {                                                            \
      const float* xb = x + (b + j) * I;                                                      \
      for (int r = 0; r < rows; ++r) {                                                        \
        float sum = hsum(acc[j * 4 + r]);                                                     \
        for (int64_t i = vec_end; i < I; ++i) sum += wr[r][i] * xb[i];                        \
        y[(b + j) * O + o + r] = sum + (bias ? bias[o + r] : 0.0f);                           \
      }                                                                                       \
    }                                                                                         \
  } while (0)

void chatloop_linear(const float* x, const float* w, const float* bias, float* y,
                     int64_t B, int64_t O, int64_t I, int num_threads) {
  const int64_t vec_end = I & ~(int64_t)7;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t o = 0; o < O; o += 4) {
    const int rows = O - o < 4 ? (int)(O - o) : 4;
    const float* wr[4];
    for (int r = 0; r < 4; ++r) wr[r] = w + (o + (r < rows ? r : 0)) * I;  /* past the end: repeat row o, unused */
    int64_t b = 0;
    for (; b + 3 <= B; b += 3) TILE(3);
    if (B - b == 2) TILE(2);
    else if (B - b == 1) TILE(1);
  }
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
