/* ChatLoop's decode attention: one new token per sequence against its context in the paged
 * KV cache, read in place through the block table.
 *
 * torch's path for the same step gathers each sequence's blocks into a contiguous copy (two
 * index_selects per layer) and runs SDPA's flash kernel with an additive mask: SmolLM2 at
 * batch 16 spent ~14 of ~100 ms a step there; this is 3-7x faster per layer. Each (sequence,
 * query head) pair is one unit of work: scores eight positions at a time, softmax, weighted
 * sum of values; the keys and values a query head shares with its group come from cache.
 *
 * q [B, H, D] float32 contiguous; keys and values [slots, K, D] of one layer (slot-major,
 * slot = block * block_size + offset); tables [B, N] int64; lengths [B] int64 (positions
 * visible to each sequence's token, its own included); scratch >= B * H * max(lengths) floats;
 * out [B, H, D]. Query head h reads kv head h / (H / K) (grouped-query attention).
 */
#include "simd.h"
#include <math.h>
#include <stdint.h>

static inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

/* out[r] = q . k[r * stride] for 8 rows, D a multiple of 8: eight independent FMA chains and one
 * transposing reduction, instead of eight latency-bound dot products each ending in a hsum. */
static inline void dot8(const float* q, const float* k, int64_t stride, int64_t D, float* out) {
  __m256 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(k + r * stride + d), qv, a[r]);
  }
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31)));
}

/* y += sum_j w[j] * v[j * stride] over n rows of D floats: y in registers 64 floats at a time. */
static inline void add_weighted_rows(const float* w, const float* v, int64_t stride, int64_t n, int64_t D, float* y) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(y + d + 8 * i);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 wj = _mm256_set1_ps(w[j]);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + j * stride + d + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(y + d + 8 * i, acc[i]);
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = d; i < D; ++i) y[i] += w[j] * v[j * stride + i];
}

/* Shared among the threads of the caller's parallel region (an orphaned omp for), as chatloop_linear_shared. */
void chatloop_decode_attention_shared(const float* q, const float* keys, const float* values, const int64_t* tables,
                                      const int64_t* lengths, float* scratch, float* out, int64_t B, int64_t H,
                                      int64_t K, int64_t D, int64_t N, int64_t block_size, int64_t max_length,
                                      float scale) {
  const int64_t group = H / K, stride = K * D;  /* consecutive slots of one kv head are K * D floats apart */
#pragma omp for schedule(static)
  for (int64_t unit = 0; unit < B * H; ++unit) {
    const int64_t b = unit / H, h = unit % H, kv = h / group, length = lengths[b];
    const int64_t* table = tables + b * N;
    const float* qh = q + unit * D;
    float* scores = scratch + unit * max_length;
    float* y = out + unit * D;
    /* Block by block: the positions of one block are consecutive slots. */
    for (int64_t start = 0; start < length; start += block_size) {
      const int64_t n = length - start < block_size ? length - start : block_size;
      const float* k = keys + (table[start / block_size] * block_size * K + kv) * D;
      int64_t j = 0;
      if (D % 8 == 0)
        for (; j + 8 <= n; j += 8) dot8(qh, k + j * stride, stride, D, scores + start + j);
      for (; j < n; ++j) scores[start + j] = dot(qh, k + j * stride, D);
    }
    float top = -INFINITY, total = 0.0f;
    for (int64_t p = 0; p < length; ++p) top = scores[p] > top ? scores[p] : top;
    for (int64_t p = 0; p < length; ++p) total += (scores[p] = expf((scores[p] - top) * scale));
    for (int64_t i = 0; i < D; ++i) y[i] = 0.0f;
    for (int64_t start = 0; start < length; start += block_size) {
      const int64_t n = length - start < block_size ? length - start : block_size;
      add_weighted_rows(scores + start, values + (table[start / block_size] * block_size * K + kv) * D, stride, n, D, y);
    }
    for (int64_t i = 0; i < D; ++i) y[i] /= total;
  }
}

void chatloop_decode_attention(const float* q, const float* keys, const float* values, const int64_t* tables,
                               const int64_t* lengths, float* scratch, float* out, int64_t B, int64_t H,
                               int64_t K, int64_t D, int64_t N, int64_t block_size, int64_t max_length,
                               float scale, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  chatloop_decode_attention_shared(q, keys, values, tables, lengths, scratch, out, B, H, K, D, N, block_size,
                                   max_length, scale);
}
