/* ChatLoop's decode attention: one new token per sequence against its context in the paged
 * KV cache, read in place through the block table.
 *
 * torch's path for the same step gathers each sequence's blocks into a contiguous copy (two
 * index_selects per layer) and runs SDPA's flash kernel with an additive mask: SmolLM2 at
 * batch 16 spent ~14 of ~100 ms a step there; this is 3-7x faster per layer. Each (sequence,
 * query head) pair is one unit of work: scores eight positions at a time, softmax, weighted
 * sum of values; the keys and values a query head shares with its group come from cache.
 *
 * q [B, H, D] float32 contiguous; keys and values [slots, K, D] of one layer (slot-major, float32, or bfloat16
 * widened to float32 as they are read, the sums in float32 either way;
 * slot = block * block_size + offset); tables [B, N] int64; lengths [B] int64 (positions
 * visible to each sequence's token, its own included); starts [B] int64 or NULL (a sliding window: the first
 * position each sequence's token sees, the positions before it are not read at all); scratch >= B * H *
 * max(lengths) floats; out [B, H, D]. Query head h reads kv head h / (H / K) (grouped-query attention).
 */
#include "simd.h"
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* Element i of a cache as float32, 8 at a time (AVX2) or one: float32, or bfloat16 widened by a shift. `bf16` is a
 * constant where the kernel is instantiated, so each instance has one kind of load and no branch. */
INLINE __m256 load8(const void* p, int64_t i, const int bf16) {
  if (!bf16) return _mm256_loadu_ps((const float*)p + i);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float load1(const void* p, int64_t i, const int bf16) {
  if (!bf16) return ((const float*)p)[i];
  const uint32_t bits = (uint32_t)((const uint16_t*)p)[i] << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

INLINE float dot(const float* a, const void* b, int64_t n, const int bf16) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b, i, bf16), acc);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * load1(b, i, bf16);
  return sum;
}

/* out[r] = q . k[r * stride] for 8 rows (element offsets), D a multiple of 8: eight independent FMA chains and one
 * transposing reduction, instead of eight latency-bound dot products each ending in a hsum. */
INLINE void dot8(const float* q, const void* k, int64_t stride, int64_t D, float* out, const int bf16) {
  __m256 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(load8(k, r * stride + d, bf16), qv, a[r]);
  }
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31)));
}

/* y += sum_j w[j] * v[start + j * stride] over n rows of D: y in registers 64 floats at a time. */
INLINE void add_weighted_rows(const float* w, const void* v, int64_t start, int64_t stride, int64_t n, int64_t D,
                              float* y, const int bf16) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(y + d + 8 * i);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 wj = _mm256_set1_ps(w[j]);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(wj, load8(v, start + j * stride + d + 8 * i, bf16), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(y + d + 8 * i, acc[i]);
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = d; i < D; ++i) y[i] += w[j] * load1(v, start + j * stride + i, bf16);
}

/* Shared among the threads of the caller's parallel region (an orphaned omp for). Positions first..length-1 of
 * each sequence, block by block: a window's first block is read from its first visible slot. */
INLINE void decode_attention(const float* q, const void* keys, const void* values, const int64_t* tables,
                             const int64_t* lengths, const int64_t* starts, float* scratch, float* out, int64_t B,
                             int64_t H, int64_t K, int64_t D, int64_t N, int64_t block_size, int64_t max_length,
                             float scale, const int bf16) {
  const int64_t group = H / K, stride = K * D;  /* consecutive slots of one kv head are K * D elements apart */
  const size_t element = bf16 ? 2 : 4;
#pragma omp for schedule(static)
  for (int64_t unit = 0; unit < B * H; ++unit) {
    const int64_t b = unit / H, h = unit % H, kv = h / group, length = lengths[b];
    const int64_t first = starts && starts[b] > 0 ? starts[b] : 0;
    const int64_t* table = tables + b * N;
    const float* qh = q + unit * D;
    float* scores = scratch + unit * max_length;  /* scores[p] of position p (those before first unused) */
    float* y = out + unit * D;
    /* The positions of one block are consecutive slots. */
    for (int64_t start = first, n; start < length; start += n) {
      const int64_t offset = start % block_size;
      n = block_size - offset < length - start ? block_size - offset : length - start;
      const char* k = (const char*)keys + ((table[start / block_size] * block_size + offset) * K + kv) * D * element;
      int64_t j = 0;
      if (D % 8 == 0)
        for (; j + 8 <= n; j += 8) dot8(qh, k + j * stride * element, stride, D, scores + start + j, bf16);
      for (; j < n; ++j) scores[start + j] = dot(qh, k + j * stride * element, D, bf16);
    }
    float top = -INFINITY, total = 0.0f;
    for (int64_t p = first; p < length; ++p) top = scores[p] > top ? scores[p] : top;
    for (int64_t p = first; p < length; ++p) total += (scores[p] = expf((scores[p] - top) * scale));
    for (int64_t i = 0; i < D; ++i) y[i] = 0.0f;
    for (int64_t start = first, n; start < length; start += n) {
      const int64_t offset = start % block_size;
      n = block_size - offset < length - start ? block_size - offset : length - start;
      add_weighted_rows(scores + start, values, ((table[start / block_size] * block_size + offset) * K + kv) * D,
                        stride, n, D, y, bf16);
    }
    for (int64_t i = 0; i < D; ++i) y[i] /= total;
  }
}

/* float32 caches, shared among the threads of the caller's parallel region, as chatloop_linear_shared. */
void chatloop_decode_attention_shared(const float* q, const float* keys, const float* values, const int64_t* tables,
                                      const int64_t* lengths, float* scratch, float* out, int64_t B, int64_t H,
                                      int64_t K, int64_t D, int64_t N, int64_t block_size, int64_t max_length,
                                      float scale) {
  decode_attention(q, keys, values, tables, lengths, NULL, scratch, out, B, H, K, D, N, block_size, max_length, scale,
                   0);
}

/* cache_bf16: keys and values are bfloat16 (as uint16); q, scratch and out float32 either way. starts: NULL, or
 * each sequence's first visible position (a sliding window). */
void chatloop_decode_attention(const float* q, const void* keys, const void* values, const int64_t* tables,
                               const int64_t* lengths, const int64_t* starts, float* scratch, float* out, int64_t B,
                               int64_t H, int64_t K, int64_t D, int64_t N, int64_t block_size, int64_t max_length,
                               float scale, int cache_bf16, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    if (cache_bf16)
      decode_attention(q, keys, values, tables, lengths, starts, scratch, out, B, H, K, D, N, block_size, max_length,
                       scale, 1);
    else
      decode_attention(q, keys, values, tables, lengths, starts, scratch, out, B, H, K, D, N, block_size, max_length,
                       scale, 0);
  }
}
