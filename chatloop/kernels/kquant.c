/* Decode kernel for GGUF's k-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (super-blocks of 256 weights; layouts in
 * chatloop/quant/blocks.py): y[b, o] = sum_i W[o, i] x[b, i] + bias[o], x float32.
 *
 * As llama.cpp does, each 256 activations are quantized first to Q8_K: int8 q, a float scale d (amax / 127, ties
 * to even) and the sums of q over each 16 (bsums), once per call by the same scalar code on every path. Then per
 * super-block, with integer dot products over each 16 or 32 weights:
 *   q4_k, q5_k:  d_x (d sum_s sc_s sum(q_w q_x) - dmin sum_s m_s (bsum_2s + bsum_2s+1))   (8 sub-blocks of 32;
 *                q5_k's fifth bit of weight 32 s + l is bit s of its byte l of high bits)
 *   q6_k:  d_x d (sum_g sc_g sum(q_w q_x) - 32 sum_g sc_g bsum_g)                      (16 groups of 16)
 *   q3_k:  d_x d (sum_g sc_g sum(u_w q_x) - 4 sum_g sc_g bsum_g)   (u = q + 4 in 0..7, 16 groups of 16)
 *   q2_k:  d_x (d sum_g sc_g sum(q_w q_x) - dmin sum_g m_g bsum_g)                      (16 groups of 16)
 * Three paths, chosen at run time by the caller: portable C, AVX2 (maddubs, then madd by the scales) and AVX-512
 * VNNI (vpdpbusd on 512-bit vectors, then vpdpwssd by the scales: see that section). q4_k, q5_k and q6_k matrices are
 * also kept in tiles of 16 rows where the CPU has VNNI (KFMT_Q4_K_X16, KFMT_Q5_K_X16, KFMT_Q6_K_X16: see their
 * section). This file is
 * compiled without -march=native: each path states its own target.
 */
#include "multipath.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
  KFMT_Q4_K = 0, KFMT_Q6_K = 1, KFMT_Q5_K = 2, KFMT_Q3_K = 3, KFMT_Q2_K = 4,
  KFMT_Q4_K_X16 = 5, KFMT_Q5_K_X16 = 6, KFMT_Q6_K_X16 = 7
};
enum { KISA_PORTABLE = 0, KISA_AVX2 = 1, KISA_AVX512_VNNI = 2 };
#define QK_K 256

static inline int k_block_bytes(int fmt) {
  static const int bytes[] = {144, 210, 176, 110, 84, 144, 176, 210};
  return bytes[fmt];
}

/* One row of activations as Q8_K: xq [nb * 256], xd [nb], bsums [nb * 16]. */
static void quantize_row_q8_k(const float* x, int8_t* xq, float* xd, int16_t* bsums, int64_t nb) {
  for (int64_t k = 0; k < nb; ++k) {
    const float* v = x + k * QK_K;
    float amax = 0.0f;
    for (int j = 0; j < QK_K; ++j) amax = fmaxf(amax, fabsf(v[j]));
    const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    for (int g = 0; g < QK_K / 16; ++g) {
      int sum = 0;
      for (int j = 0; j < 16; ++j) {
        const int q = (int)nearbyintf(v[g * 16 + j] * inv);
        xq[k * QK_K + g * 16 + j] = (int8_t)q;
        sum += q;
      }
      bsums[k * 16 + g] = (int16_t)sum;
    }
    xd[k] = d;
  }
}

/* q4_k's eight 6-bit scales and mins. */
static inline void q4_k_scales(const uint8_t* s, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    m[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

/* The same as two 64-bit words: bytes 0-7 the scales, 8-15 the mins (llama.cpp's kmask trick, 10 operations instead
 * of 50). */
static inline void q4_k_scales_words(const uint8_t* s, uint32_t* u) {
  uint32_t a[3];
  memcpy(a, s, 12);
  const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, low2 = 0x03030303u;
  u[0] = a[0] & low6;
  u[1] = (a[2] & low4) | (((a[0] >> 6) & low2) << 4);
  u[2] = a[1] & low6;
  u[3] = ((a[2] >> 4) & low4) | (((a[1] >> 6) & low2) << 4);
}

/* The integer parts of a q4_k super-block's product with a Q8_K block: sum_s sc_s dot_s, and the mins' sum. */
static inline int q4_k_mins(const uint8_t* m, const int16_t* bsums) {
  int summ = 0;
  for (int s = 0; s < 8; ++s) summ += m[s] * (bsums[2 * s] + bsums[2 * s + 1]);
  return summ;
}

/* ---- portable ----------------------------------------------------------------------------------------------- */
/* q4_k (fifth = 0) and q5_k (fifth = 1): the caller passes a constant, so each gets its own code. */
static inline float dot_q45_k_portable(const uint8_t* w, const int8_t* xq, const float* xd, const int16_t* bsums,
                                       int64_t nb, const int fifth) {
  const int bytes = fifth ? 176 : 144;
  float acc = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * bytes;
    uint8_t sc[8], m[8];
    q4_k_scales(blk + 4, sc, m);
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + (fifth ? 48 : 16);
    const int8_t* q = xq + k * QK_K;
    int sumi = 0;
    for (int j = 0; j < 4; ++j) {
      int lo = 0, hi = 0;
      for (int l = 0; l < 32; ++l) {
        const int h_lo = fifth ? ((qh[l] >> (2 * j)) & 1) << 4 : 0, h_hi = fifth ? ((qh[l] >> (2 * j + 1)) & 1) << 4 : 0;
        lo += ((qs[32 * j + l] & 0x0F) | h_lo) * q[64 * j + l];
        hi += ((qs[32 * j + l] >> 4) | h_hi) * q[64 * j + 32 + l];
      }
      sumi += sc[2 * j] * lo + sc[2 * j + 1] * hi;
    }
    acc += xd[k] * (half_to_float(blk) * (float)sumi - half_to_float(blk + 2) * (float)q4_k_mins(m, bsums + k * 16));
  }
  return acc;
}
static float dot_q4_k_portable(const uint8_t* w, const int8_t* xq, const float* xd, const int16_t* bsums, int64_t nb) {
  return dot_q45_k_portable(w, xq, xd, bsums, nb, 0);
}
static float dot_q5_k_portable(const uint8_t* w, const int8_t* xq, const float* xd, const int16_t* bsums, int64_t nb) {
  return dot_q45_k_portable(w, xq, xd, bsums, nb, 1);
}

static float dot_q6_k_portable(const uint8_t* w, const int8_t* xq, const float* xd, const int16_t* bsums,
                               int64_t nb) {
  float acc = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const int8_t* q = xq + k * QK_K;
    int sumi = 0, offset = 0;
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = blk + 64 * h;
      const uint8_t* qh = blk + 128 + 32 * h;
      int part[8] = {0};
      for (int l = 0; l < 32; ++l) {
        const int g = l / 16;
        part[0 + g] += ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) * q[128 * h + l];
        part[2 + g] += ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) * q[128 * h + 32 + l];
        part[4 + g] += ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) * q[128 * h + 64 + l];
        part[6 + g] += ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) * q[128 * h + 96 + l];
      }
      for (int g = 0; g < 8; ++g) sumi += sc[8 * h + g] * part[g];
    }
    for (int g = 0; g < 16; ++g) offset += sc[g] * bsums[k * 16 + g];
    acc += xd[k] * half_to_float(blk + 208) * (float)(sumi - 32 * offset);
  }
  return acc;
}

/* q3_k's sixteen 6-bit scales (12 bytes: low nibbles of 16, then 2 high bits each), minus 32. */
static inline void q3_k_scales(const uint8_t* p, int8_t* sc) {
  for (int i = 0; i < 16; ++i) {
    const int low = i < 8 ? p[i] & 0x0F : p[i - 8] >> 4, high = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
    sc[i] = (int8_t)((low | (high << 4)) - 32);
  }
}

/* q2_k and q3_k: weight 128 h + 32 s + l (h < 2, s < 4, l < 32) is bits 2s, 2s + 1 of quant byte 32 h + l (q3_k:
 * plus 4 where bit 4h + s of high-bit byte l is set: u = q + 4, the 4 taken back as 4 sc_g bsum_g), under scale
 * 8 h + 2 s + l / 16. */
static float dot_q2_k_portable(const uint8_t* w, const int8_t* xq, const float* xd, const int16_t* bsums,
                               int64_t nb) {
  float acc = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * 84;
    const uint8_t* qs = blk + 16;
    const int8_t* q = xq + k * QK_K;
    int part[16] = {0}, sumi = 0, summ = 0;
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int l = 0; l < 32; ++l) part[8 * h + 2 * s + l / 16] += ((qs[32 * h + l] >> (2 * s)) & 3) * q[128 * h + 32 * s + l];
    for (int g = 0; g < 16; ++g) {
      sumi += (blk[g] & 0x0F) * part[g];
      summ += (blk[g] >> 4) * bsums[k * 16 + g];
    }
    acc += xd[k] * (half_to_float(blk + 80) * (float)sumi - half_to_float(blk + 82) * (float)summ);
  }
  return acc;
}

static float dot_q3_k_portable(const uint8_t* w, const int8_t* xq, const float* xd, const int16_t* bsums,
                               int64_t nb) {
  float acc = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * 110;
    const uint8_t *hm = blk, *qs = blk + 32;
    int8_t sc[16];
    q3_k_scales(blk + 96, sc);
    const int8_t* q = xq + k * QK_K;
    int part[16] = {0}, sumi = 0, offset = 0;
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int l = 0; l < 32; ++l) {
          const int u = ((qs[32 * h + l] >> (2 * s)) & 3) | (((hm[l] >> (4 * h + s)) & 1) << 2);
          part[8 * h + 2 * s + l / 16] += u * q[128 * h + 32 * s + l];
        }
    for (int g = 0; g < 16; ++g) {
      sumi += sc[g] * part[g];
      offset += sc[g] * bsums[k * 16 + g];
    }
    acc += xd[k] * half_to_float(blk + 108) * (float)(sumi - 4 * offset);
  }
  return acc;
}

/* ---- AVX2 --------------------------------------------------------------------------------------------------- */
__attribute__((target("avx2,fma,f16c"))) static inline float f16_avx2(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

/* q5_k's fifth bits of sub-blocks 2j (lo) and 2j + 1 (hi), as 16 or 0 a byte. */
__attribute__((target("avx2,fma,f16c"))) static inline void fifth_bits(__m256i high, int j, __m256i* lo,
                                                                      __m256i* hi) {
  const __m256i one = _mm256_set1_epi8(1);
  *lo = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * j)), one), 4);
  *hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * j + 1)), one), 4);
}

__attribute__((target("avx2,fma,f16c"))) static inline float dot_q45_k_avx2(const uint8_t* w, const int8_t* xq,
                                                                            const float* xd, const int16_t* bsums,
                                                                            int64_t nb, const int fifth) {
  const int block = fifth ? 176 : 144;
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * block;
    uint32_t words[4];
    q4_k_scales_words(blk + 4, words);
    const uint8_t* sc = (const uint8_t*)words;
    const uint8_t* m = sc + 8;
    const uint8_t* qs = blk + (fifth ? 48 : 16);
    const __m256i high = fifth ? _mm256_loadu_si256((const __m256i*)(blk + 16)) : _mm256_setzero_si256();
    const int8_t* q = xq + k * QK_K;
    __m256i sumi = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
      __m256i lo = _mm256_and_si256(bytes, low_mask);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
      if (fifth) {
        __m256i h_lo, h_hi;
        fifth_bits(high, j, &h_lo, &h_hi);
        lo = _mm256_or_si256(lo, h_lo);
        hi = _mm256_or_si256(hi, h_hi);
      }
      const __m256i p_lo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(q + 64 * j)));
      const __m256i p_hi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(q + 64 * j + 32)));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_lo, _mm256_set1_epi16(sc[2 * j])));
      sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_hi, _mm256_set1_epi16(sc[2 * j + 1])));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[k] * f16_avx2(blk)), _mm256_cvtepi32_ps(sumi), acc);
    mins += xd[k] * f16_avx2(blk + 2) * (float)q4_k_mins(m, bsums + k * 16);
  }
  return hsum256(acc) - mins;
}
__attribute__((target("avx2,fma,f16c"))) static float dot_q4_k_avx2(const uint8_t* w, const int8_t* xq,
                                                                     const float* xd, const int16_t* bsums,
                                                                     int64_t nb) {
  return dot_q45_k_avx2(w, xq, xd, bsums, nb, 0);
}
__attribute__((target("avx2,fma,f16c"))) static float dot_q5_k_avx2(const uint8_t* w, const int8_t* xq,
                                                                     const float* xd, const int16_t* bsums,
                                                                     int64_t nb) {
  return dot_q45_k_avx2(w, xq, xd, bsums, nb, 1);
}

#define VNNI_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"

/* ---- q2_k, q3_k, q6_k: scales per 16 weights (AVX2) -------------------------------------------------------- */
/* These three share a walk: weight 128 h + 32 s + l under scale g = 8 h + 2 s + l / 16. The sixteen scales are
 * widened to int16 once a super-block; per 32 weights one shuffle puts scale g in the low 128-bit lane and g + 1
 * in the high one (llama.cpp's get_scale_shuffle), as int16 for madd after maddubs (AVX2), or as int32 with a zero
 * high half for madd after vpdpbusd (VNNI: madd_epi16 then multiplies each 32-bit sum, below 32768 in magnitude
 * (4 x 63 x 127 at most), by its scale exactly: one cheap instruction instead of a 32-bit vpmulld). The scale
 * times bsum terms (q6_k's 32, q3_k's 4, q2_k's mins) are one madd of the sixteen bsums by the scales. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256i pair_scales16(__m256i half, const int s) {
  const short lo = (short)((4 * s) | (4 * s + 1) << 8), hi = (short)((4 * s + 2) | (4 * s + 3) << 8);
  return _mm256_shuffle_epi8(half, _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo)));
}
__attribute__((target("avx2,fma,f16c"))) static inline __m256i pair_scales32(__m256i half, const int s) {
  const int lo = (int)((4u * s) | (4u * s + 1) << 8 | 0x80800000u);
  const int hi = (int)((4u * s + 2) | (4u * s + 3) << 8 | 0x80800000u);
  return _mm256_shuffle_epi8(half, _mm256_set_m128i(_mm_set1_epi32(hi), _mm_set1_epi32(lo)));
}

/* q3_k_scales' sixteen scales as int8 lanes, by 32-bit words (llama.cpp's kmask trick): word j of the result is
 * the low nibbles (j < 2) or high nibbles (j >= 2) of packed word j % 2, or'd with bits 2j, 2j + 1 of each byte of
 * packed word 2 as bits 4, 5. */
__attribute__((target("avx2,fma,f16c"))) static inline __m128i q3_k_scales_simd(const uint8_t* p) {
  uint32_t a[3];
  memcpy(a, p, 12);
  const uint32_t low4 = 0x0F0F0F0Fu, low2 = 0x03030303u;
  const __m128i words = _mm_set_epi32((int)(((a[1] >> 4) & low4) | (((a[2] >> 6) & low2) << 4)),
                                      (int)(((a[0] >> 4) & low4) | (((a[2] >> 4) & low2) << 4)),
                                      (int)((a[1] & low4) | (((a[2] >> 2) & low2) << 4)),
                                      (int)((a[0] & low4) | ((a[2] & low2) << 4)));
  return _mm_sub_epi8(words, _mm_set1_epi8(32)); /* built in registers: a store and a wider load would stall */
}

/* The 32 unsigned quants of (h, s) of a super-block (q2_k: 0..3, q3_k: q + 4 in 0..7, q6_k: q + 32 in 0..63). */
__attribute__((target("avx2,fma,f16c"))) static inline __m256i k16_quants(const uint8_t* blk, const int fmt,
                                                                         const int h, const int s) {
  const __m256i two_bits = _mm256_set1_epi8(3);
  if (fmt == KFMT_Q6_K) {
    const __m256i ql = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32 * (s & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
    const __m256i low = _mm256_and_si256(s < 2 ? ql : _mm256_srli_epi16(ql, 4), _mm256_set1_epi8(0x0F));
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), two_bits);
    return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
  }
  const __m256i bits = _mm256_loadu_si256((const __m256i*)(blk + (fmt == KFMT_Q3_K ? 32 : 16) + 32 * h));
  const __m256i low = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * s), two_bits);
  if (fmt == KFMT_Q2_K) return low;
  /* bit 4h + s of each high-bit byte moved to bit 2 (16-bit shifts: at most 5 right, nothing crosses a byte) */
  const __m256i hm = _mm256_loadu_si256((const __m256i*)blk);
  const int shift = 4 * h + s;
  const __m256i moved = shift >= 2 ? _mm256_srli_epi16(hm, shift - 2) : _mm256_slli_epi16(hm, 2 - shift);
  return _mm256_or_si256(low, _mm256_and_si256(moved, _mm256_set1_epi8(4)));
}

#define DOT_K16(name, FEATURES, VNNI)                                                                             \
  __attribute__((target(FEATURES))) static inline float name(const uint8_t* w, const int8_t* xq, const float* xd, \
                                                             const int16_t* bsums, int64_t nb, const int fmt) {  \
    const int bytes = k_block_bytes(fmt);                                                                         \
    __m256 acc = _mm256_setzero_ps();                                                                             \
    for (int64_t k = 0; k < nb; ++k) {                                                                            \
      const uint8_t* blk = w + k * bytes;                                                                         \
      const int8_t* q = xq + k * QK_K;                                                                            \
      __m256i sc16;                                                                                               \
      if (fmt == KFMT_Q2_K) {                                                                                     \
        sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_loadu_si128((const __m128i*)blk), _mm_set1_epi8(0x0F)));   \
      } else if (fmt == KFMT_Q3_K) {                                                                              \
        sc16 = _mm256_cvtepi8_epi16(q3_k_scales_simd(blk + 96));                                                  \
      } else {                                                                                                    \
        sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(blk + 192)));                                \
      }                                                                                                           \
      __m256i sumi = _mm256_setzero_si256();                                                                      \
      for (int h = 0; h < 2; ++h) {                                                                               \
        const __m256i half = _mm256_permute2x128_si256(sc16, sc16, h ? 0x11 : 0x00);                              \
        for (int s = 0; s < 4; ++s) {                                                                             \
          const __m256i u = k16_quants(blk, fmt, h, s);                                                           \
          const __m256i x8 = _mm256_loadu_si256((const __m256i*)(q + 128 * h + 32 * s));                         \
          sumi = _mm256_add_epi32(sumi, VNNI ? _mm256_madd_epi16(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x8), \
                                                                 pair_scales32(half, s))                          \
                                             : _mm256_madd_epi16(_mm256_maddubs_epi16(u, x8), pair_scales16(half, s))); \
        }                                                                                                         \
      }                                                                                                           \
      const __m256i bs = _mm256_loadu_si256((const __m256i*)(bsums + k * 16));                                    \
      if (fmt == KFMT_Q2_K) {                                                                                     \
        const __m256i m16 = _mm256_cvtepu8_epi16(                                                                 \
            _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128((const __m128i*)blk), 4), _mm_set1_epi8(0x0F)));         \
        acc = _mm256_fmadd_ps(_mm256_set1_ps(-xd[k] * f16_avx2(blk + 82)),                                       \
                              _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, m16)), acc);                               \
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[k] * f16_avx2(blk + 80)), _mm256_cvtepi32_ps(sumi), acc);        \
      } else {                                                                                                    \
        const __m256i offset = _mm256_madd_epi16(bs, sc16);                                                       \
        sumi = _mm256_sub_epi32(sumi, fmt == KFMT_Q3_K ? _mm256_slli_epi32(offset, 2) : _mm256_slli_epi32(offset, 5)); \
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[k] * f16_avx2(blk + bytes - 2)), _mm256_cvtepi32_ps(sumi), acc);  \
      }                                                                                                           \
    }                                                                                                             \
    return hsum256(acc);                                                                                          \
  }
DOT_K16(dot_k16_avx2, "avx2,fma,f16c", 0)

#define K16_FORMATS(path, FEATURES)                                                                               \
  __attribute__((target(FEATURES))) static float dot_q2_k_##path(const uint8_t* w, const int8_t* xq,             \
                                                                 const float* xd, const int16_t* bsums,          \
                                                                 int64_t nb) {                                   \
    return dot_k16_##path(w, xq, xd, bsums, nb, KFMT_Q2_K);                                                      \
  }                                                                                                             \
  __attribute__((target(FEATURES))) static float dot_q3_k_##path(const uint8_t* w, const int8_t* xq,             \
                                                                 const float* xd, const int16_t* bsums,          \
                                                                 int64_t nb) {                                   \
    return dot_k16_##path(w, xq, xd, bsums, nb, KFMT_Q3_K);                                                      \
  }                                                                                                             \
  __attribute__((target(FEATURES))) static float dot_q6_k_##path(const uint8_t* w, const int8_t* xq,             \
                                                                 const float* xd, const int16_t* bsums,          \
                                                                 int64_t nb) {                                   \
    return dot_k16_##path(w, xq, xd, bsums, nb, KFMT_Q6_K);                                                      \
  }
K16_FORMATS(avx2, "avx2,fma,f16c")

/* ---- AVX-512 VNNI (512-bit vpdpbusd, then vpdpwssd by the scales) ------------------------------------------- */
/* Every k-quant's 64 consecutive weights come from one 32-byte row of its quant bytes (q4_k, q5_k: low nibbles of
 * row j are weights 64 j.., high nibbles 64 j + 32..; q2_k, q3_k: bits 2s, 2s + 2 of row h are weights 128 h + 64 t
 * .. with s = 2t; q6_k: 64 bytes of low nibbles and one row of high bits, the same way): the row broadcast to both
 * halves of a 512-bit vector and shifted per half (vpsrlvw) gives them in order, against 64 activations in order.
 * vpdpbusd sums each four products; each 32-bit sum (below 2^15: 4 x 63 x 127 at most) times its scale, held as an
 * int32 with a zero high half, is an exact vpdpwssd, which adds it to the super-block's sums. */
__attribute__((target(VNNI_TARGET))) static inline __m512i halves(int lo, int hi) {
  return _mm512_inserti64x4(_mm512_set1_epi16((short)lo), _mm256_set1_epi16((short)hi), 1);
}
__attribute__((target(VNNI_TARGET))) static inline __m512i halves8(int lo, int hi) {
  return _mm512_inserti64x4(_mm512_set1_epi8((char)lo), _mm256_set1_epi8((char)hi), 1);
}
/* Lanes 4i..4i+3 (per16 = 1: scales per 16 weights) or 8i..8i+7 (scales per 32) take scale first + i. */
__attribute__((target(VNNI_TARGET))) static inline __m512i spread_scales(__m512i scales, int first, const int per16) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(first), _mm512_srli_epi32(lane, per16 ? 2 : 3));
  return _mm512_permutexvar_epi32(index, scales);
}

/* out[r] for r < rows (<= K_ROWS, a constant where inlined): one row of weights against rows activation rows (xq
 * rows of I bytes, xd rows of nb, bsums rows of 16 nb). Each super-block's weights (quants, scales) are decoded
 * once for all the rows: at batch 16 the decoding, redone a row, was most of the work. Each row's sums are those
 * it gets alone, in the same order. */
#define K_ROWS 4
__attribute__((target(VNNI_TARGET), always_inline)) static inline void dot_k_vnni(
    const uint8_t* w, const int8_t* xq, const float* xd, const int16_t* bsums, int64_t nb, int64_t I, int rows,
    float* out, const int fmt) {
  const int bytes = k_block_bytes(fmt), per16 = fmt == KFMT_Q2_K || fmt == KFMT_Q3_K || fmt == KFMT_Q6_K;
  const __m512i zero = _mm512_setzero_si512(), low16 = _mm512_set1_epi32(0xFFFF);
  __m512 acc[K_ROWS];
  __m256 mins[K_ROWS];
#pragma GCC unroll 4
  for (int r = 0; r < K_ROWS; ++r) acc[r] = _mm512_setzero_ps(), mins[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * bytes;
    __m512i sumi[K_ROWS], scales;
    __m256i bs[K_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < K_ROWS; ++r)
      if (r < rows) bs[r] = _mm256_loadu_si256((const __m256i*)(bsums + r * nb * 16 + k * 16)), sumi[r] = zero;
    if (fmt == KFMT_Q4_K || fmt == KFMT_Q5_K) {
      uint32_t words[4];
      q4_k_scales_words(blk + 4, words);
      const __m128i sm = _mm_set_epi32((int)words[3], (int)words[2], (int)words[1], (int)words[0]);
      scales = _mm512_cvtepu8_epi32(sm); /* lanes 0-7 the scales, 8-15 the mins */
      const __m256i m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm)); /* each min twice: one per 16 */
      const float dmin = f16_avx2(blk + 2);
#pragma GCC unroll 4
      for (int r = 0; r < K_ROWS; ++r)
        if (r < rows)
          mins[r] = _mm256_fmadd_ps(_mm256_set1_ps(xd[r * nb + k] * dmin),
                                    _mm256_cvtepi32_ps(_mm256_madd_epi16(bs[r], m16)), mins[r]);
      const uint8_t* qs = blk + (fmt == KFMT_Q5_K ? 48 : 16);
      const __m512i high = fmt == KFMT_Q5_K ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 16)))
                                            : zero;
      for (int j = 0; j < 4; ++j) {
        const __m512i row = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(qs + 32 * j)));
        __m512i u = _mm512_and_si512(_mm512_srlv_epi16(row, halves(0, 4)), _mm512_set1_epi8(0x0F));
        if (fmt == KFMT_Q5_K)
          u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(high, halves8(1 << (2 * j), 1 << (2 * j + 1))), u,
                                   _mm512_set1_epi8(0x10));
        const __m512i spread = spread_scales(scales, 2 * j, 0);
#pragma GCC unroll 4
        for (int r = 0; r < K_ROWS; ++r)
          if (r < rows) {
            const __m512i p = _mm512_dpbusd_epi32(zero, u, _mm512_loadu_si512(xq + r * I + k * QK_K + 64 * j));
            sumi[r] = _mm512_dpwssd_epi32(sumi[r], p, spread);
          }
      }
    } else {
      if (fmt == KFMT_Q2_K) {
        const __m128i packed = _mm_loadu_si128((const __m128i*)blk);
        scales = _mm512_cvtepu8_epi32(_mm_and_si128(packed, _mm_set1_epi8(0x0F)));
        const __m256i m16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F)));
        const float dmin = f16_avx2(blk + 82);
#pragma GCC unroll 4
        for (int r = 0; r < K_ROWS; ++r)
          if (r < rows)
            mins[r] = _mm256_fmadd_ps(_mm256_set1_ps(xd[r * nb + k] * dmin),
                                      _mm256_cvtepi32_ps(_mm256_madd_epi16(bs[r], m16)), mins[r]);
      } else {
        const __m128i sc8 = fmt == KFMT_Q3_K ? q3_k_scales_simd(blk + 96) : _mm_loadu_si128((const __m128i*)(blk + 192));
        scales = _mm512_and_si512(_mm512_cvtepi8_epi32(sc8), low16);
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
#pragma GCC unroll 4
        for (int r = 0; r < K_ROWS; ++r)
          if (r < rows) {
            const __m256i offset = _mm256_madd_epi16(bs[r], sc16);
            sumi[r] = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(),
                                                              _mm256_slli_epi32(offset, fmt == KFMT_Q3_K ? 2 : 5)));
          }
      }
      for (int h = 0; h < 2; ++h) {
        const __m512i bits = _mm512_broadcast_i64x4(
            _mm256_loadu_si256((const __m256i*)(blk + (fmt == KFMT_Q6_K ? 128 : fmt == KFMT_Q3_K ? 32 : 16) + 32 * h)));
        const __m512i hm = fmt == KFMT_Q3_K ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)blk)) : zero;
        const __m512i ql = fmt == KFMT_Q6_K ? _mm512_loadu_si512(blk + 64 * h) : zero;
        for (int t = 0; t < 2; ++t) {
          __m512i u = _mm512_and_si512(_mm512_srlv_epi16(bits, halves(4 * t, 4 * t + 2)), _mm512_set1_epi8(3));
          if (fmt == KFMT_Q6_K) {
            const __m512i low = _mm512_and_si512(t ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(0x0F));
            u = _mm512_or_si512(low, _mm512_slli_epi16(u, 4));
          } else if (fmt == KFMT_Q3_K) {
            const __mmask64 set = _mm512_test_epi8_mask(hm, halves8(1 << (4 * h + 2 * t), 1 << (4 * h + 2 * t + 1)));
            u = _mm512_mask_add_epi8(u, set, u, _mm512_set1_epi8(4));
          }
          const __m512i spread = spread_scales(scales, 8 * h + 4 * t, 1);
#pragma GCC unroll 4
          for (int r = 0; r < K_ROWS; ++r)
            if (r < rows) {
              const __m512i p = _mm512_dpbusd_epi32(zero, u, _mm512_loadu_si512(xq + r * I + k * QK_K + 128 * h + 64 * t));
              sumi[r] = _mm512_dpwssd_epi32(sumi[r], p, spread);
            }
        }
      }
    }
    const float d = f16_avx2(blk + (fmt == KFMT_Q2_K ? 80 : per16 ? bytes - 2 : 0));
#pragma GCC unroll 4
    for (int r = 0; r < K_ROWS; ++r)
      if (r < rows) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xd[r * nb + k] * d), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < K_ROWS; ++r)
    if (r < rows) out[r] = _mm512_reduce_add_ps(acc[r]) - hsum256(mins[r]);
}

/* Each format and row count its own code (fmt and rows constants in each inlined copy); the one-row ones are the
 * table's kdot_fn. */
#define K_VNNI(name, fmt)                                                                                          \
  __attribute__((target(VNNI_TARGET))) static void name##_rows(const uint8_t* w, const int8_t* xq, const float* xd, \
                                                               const int16_t* bsums, int64_t nb, int64_t I,       \
                                                               int rows, float* out) {                            \
    switch (rows) {                                                                                                \
      case 4: dot_k_vnni(w, xq, xd, bsums, nb, I, 4, out, fmt); break;                                             \
      case 3: dot_k_vnni(w, xq, xd, bsums, nb, I, 3, out, fmt); break;                                             \
      case 2: dot_k_vnni(w, xq, xd, bsums, nb, I, 2, out, fmt); break;                                             \
      default: dot_k_vnni(w, xq, xd, bsums, nb, I, 1, out, fmt); break;                                            \
    }                                                                                                              \
  }                                                                                                                \
  __attribute__((target(VNNI_TARGET))) static float name(const uint8_t* w, const int8_t* xq, const float* xd,       \
                                                         const int16_t* bsums, int64_t nb) {                        \
    float out;                                                                                                     \
    dot_k_vnni(w, xq, xd, bsums, nb, 0, 1, &out, fmt);                                                             \
    return out;                                                                                                    \
  }
K_VNNI(dot_q2_k_vnni, KFMT_Q2_K)
K_VNNI(dot_q3_k_vnni, KFMT_Q3_K)
K_VNNI(dot_q4_k_vnni, KFMT_Q4_K)
K_VNNI(dot_q5_k_vnni, KFMT_Q5_K)
K_VNNI(dot_q6_k_vnni, KFMT_Q6_K)

/* ---- q4_k, q5_k and q6_k in tiles of 16 rows (KFMT_*_X16; made at load time where the CPU has VNNI) ---------- */
/* Per tile of 16 rows and super-block k, the 16 blocks' bytes (2304, q5_k 2816) rearranged: the rows' d (fp16 x 16),
 * dmin (fp16 x 16), then their 12 bytes of scales as three 64-byte groups (group i: 32-bit word i of each row, row
 * after row), [q5_k: the 32 bytes of fifth bits as 8 groups of 64, the same way], then the 128 quant bytes as 32
 * groups of 64 (group g: bytes 4g..4g+3 of each row). One 512-bit load then holds
 * word i of the scales, or four quant bytes, of the 16 rows in its 16 lanes: the scales of 16 rows are decoded by
 * the same few instructions that decode one row's, and vpdpbusd against four activation bytes broadcast computes 4
 * weights of 16 rows (low nibbles: weights 64 j + 4 g'..; high: 64 j + 32 + 4 g'.., j = g / 8, g' = g % 8) with no
 * horizontal sums. q6_k's tiles (3360 bytes a super-block) the same way: the rows' d (fp16 x 16), then the 208
 * bytes before d as 52 groups of 64 (32 of low nibbles, 16 of high bits, 4 of scales). The same bytes as the rows
 * took, so it is made in place, one tile copied aside at a time. */
#define KX16 16

/* Where byte i of row r's block (fmt: q4_k, q5_k or q6_k) lies in its tile's block: past the rows' float16 fields
 * (q4_k, q5_k: d then dmin, 64 bytes; q6_k: d, 32 bytes), the rows' 4-byte words side by side. */
static inline int kx16_at(int r, int i, int fmt) {
  if (fmt == KFMT_Q6_K) return i >= 208 ? 2 * r + i - 208 : 32 + 64 * (i / 4) + 4 * r + i % 4;
  if (i < 2) return 2 * r + i;
  if (i < 4) return 32 + 2 * r + i - 2;
  return 64 + 64 * ((i - 4) / 4) + 4 * r + (i - 4) % 4;
}

/* Rows [O, nb * bytes] of q4_k, q5_k or q6_k (fmt KFMT_*, the rows' own) -> tiles (inverse = 0), or back (inverse = 1);
 * O a multiple of 16; out may be w. Returns 0, or -1 without memory for one tile. */
int chatloop_kquant_interleave(const uint8_t* w, uint8_t* out, int64_t O, int64_t nb, int fmt, int inverse) {
  const int bytes = k_block_bytes(fmt);
  const int64_t tile_bytes = KX16 * nb * bytes;
  uint8_t* copy = malloc(tile_bytes);
  if (!copy) return -1;
  for (int64_t t = 0; t < O / KX16; ++t) {
    memcpy(copy, w + t * tile_bytes, tile_bytes);
    uint8_t* dst = out + t * tile_bytes;
    for (int64_t k = 0; k < nb; ++k)
      for (int r = 0; r < KX16; ++r)
        for (int i = 0; i < bytes; ++i) {
          const int64_t row_at = (r * nb + k) * bytes + i, tile_at = k * KX16 * bytes + kx16_at(r, i, fmt);
          if (inverse)
            dst[row_at] = copy[tile_at];
          else
            dst[tile_at] = copy[row_at];
        }
  }
  free(copy);
  return 0;
}

/* Rows ids[n] of a q4_k_x16, q5_k_x16 or q6_k_x16 matrix (fmt: the rows' KFMT_*) as GGUF's rows: out [R, nb * bytes]. */
void chatloop_kquant_x16_rows(const uint8_t* w, const int64_t* ids, uint8_t* out, int64_t R, int64_t nb, int fmt) {
  const int bytes = k_block_bytes(fmt);
  for (int64_t n = 0; n < R; ++n) {
    const uint8_t* tile = w + ids[n] / KX16 * KX16 * nb * bytes;
    const int r = (int)(ids[n] % KX16);
    for (int64_t k = 0; k < nb; ++k)
      for (int i = 0; i < bytes; ++i) out[(n * nb + k) * bytes + i] = tile[k * KX16 * bytes + kx16_at(r, i, fmt)];
  }
}

/* y[r * O + 0..15] for r < rows (<= K_ROWS, a constant where inlined): rows activation rows (xq rows of I bytes, xd
 * rows of nb, bsums rows of 16 nb) against one tile, on VNNI (fifth: q5_k, whose fifth bits of weights 64 j + 4 g'..
 * and 64 j + 32 + 4 g'.. are bits 2j and 2j + 1 of fifth-bit group g', added as 16 under a mask). Each block's
 * weights (scales, nibbles, fifth bits) are decoded once for all the rows; each row's sums are what it gets alone. */
__attribute__((target(VNNI_TARGET), always_inline)) static inline void q45_k_x16_tile_vnni(
    const uint8_t* tile, const int8_t* xq, const float* xd, const int16_t* bsums, int64_t nb, int64_t I, int rows,
    float* y, int64_t O, const int fifth) {
  const int block = KX16 * (fifth ? 176 : 144), quants = fifth ? 768 : 256;
  const __m512i low4 = _mm512_set1_epi8(0x0F), byte = _mm512_set1_epi32(0xFF);
  const __m512i m6 = _mm512_set1_epi32(0x3F3F3F3F), m4 = _mm512_set1_epi32(0x0F0F0F0F), m2 = _mm512_set1_epi32(0x03030303);
  __m512 acc[K_ROWS];
#pragma GCC unroll 4
  for (int r = 0; r < K_ROWS; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = tile + k * block;
    const __m512i a0 = _mm512_loadu_si512(blk + 64), a1 = _mm512_loadu_si512(blk + 128),
                  a2 = _mm512_loadu_si512(blk + 192);
    __m512i u[4]; /* per row: scales 0-3, 4-7, mins 0-3, 4-7 (q4_k_scales_words) */
    u[0] = _mm512_and_si512(a0, m6);
    u[1] = _mm512_or_si512(_mm512_and_si512(a2, m4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a0, 6), m2), 4));
    u[2] = _mm512_and_si512(a1, m6);
    u[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(a2, 4), m4),
                           _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a1, 6), m2), 4));
    __m512i isum[K_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < K_ROWS; ++r) isum[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i lo[K_ROWS], hi[K_ROWS];
#pragma GCC unroll 4
      for (int r = 0; r < K_ROWS; ++r) lo[r] = _mm512_setzero_si512(), hi[r] = _mm512_setzero_si512();
      for (int g = 0; g < 8; ++g) {
        const __m512i v = _mm512_loadu_si512(blk + quants + 64 * (8 * j + g));
        __m512i w_lo = _mm512_and_si512(v, low4), w_hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        if (fifth) {
          const __m512i h = _mm512_loadu_si512(blk + 256 + 64 * g);
          w_lo = _mm512_mask_add_epi8(w_lo, _mm512_test_epi8_mask(h, _mm512_set1_epi8((char)(1 << (2 * j)))), w_lo,
                                      _mm512_set1_epi8(0x10));
          w_hi = _mm512_mask_add_epi8(w_hi, _mm512_test_epi8_mask(h, _mm512_set1_epi8((char)(2 << (2 * j)))), w_hi,
                                      _mm512_set1_epi8(0x10));
        }
#pragma GCC unroll 4
        for (int r = 0; r < K_ROWS; ++r)
          if (r < rows) {
            const int8_t* q = xq + r * I + k * QK_K + 64 * j + 4 * g;
            int32_t x_lo, x_hi;
            memcpy(&x_lo, q, 4);
            memcpy(&x_hi, q + 32, 4);
            lo[r] = _mm512_dpbusd_epi32(lo[r], w_lo, _mm512_set1_epi32(x_lo));
            hi[r] = _mm512_dpbusd_epi32(hi[r], w_hi, _mm512_set1_epi32(x_hi));
          }
      }
      const int c = 2 * j; /* sums up to 32 x 31 x 127: a 32-bit multiply */
      const __m512i s_lo = _mm512_and_si512(_mm512_srli_epi32(u[c / 4], 8 * (c % 4)), byte);
      const __m512i s_hi = _mm512_and_si512(_mm512_srli_epi32(u[(c + 1) / 4], 8 * ((c + 1) % 4)), byte);
#pragma GCC unroll 4
      for (int r = 0; r < K_ROWS; ++r)
        if (r < rows) {
          isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(lo[r], s_lo));
          isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(hi[r], s_hi));
        }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)blk));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 32)));
#pragma GCC unroll 4
    for (int r = 0; r < K_ROWS; ++r)
      if (r < rows) {
        const int16_t* bs = bsums + r * nb * 16 + k * 16;
        __m512i msum = _mm512_setzero_si512();
        for (int c = 0; c < 8; ++c) { /* mins: each below 64, each bsum pair below 2^15 in magnitude: exact vpdpwssd */
          const __m512i m = _mm512_and_si512(_mm512_srli_epi32(u[2 + c / 4], 8 * (c % 4)), byte);
          msum = _mm512_dpwssd_epi32(msum, m, _mm512_set1_epi32((bs[2 * c] + bs[2 * c + 1]) & 0xFFFF));
        }
        const __m512 dx = _mm512_set1_ps(xd[r * nb + k]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(d, dx), acc[r]);
        acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmin, dx), acc[r]);
      }
  }
#pragma GCC unroll 4
  for (int r = 0; r < K_ROWS; ++r)
    if (r < rows) _mm512_storeu_ps(y + r * O, acc[r]);
}
/* Each format and row count its own code (rows a constant in each inlined copy). */
#define K_X16_TILE(name, fifth)                                                                                    \
  __attribute__((target(VNNI_TARGET))) static void name(const uint8_t* tile, const int8_t* xq, const float* xd,    \
                                                        const int16_t* bsums, int64_t nb, int64_t I, int rows,     \
                                                        float* y, int64_t O) {                                     \
    switch (rows) {                                                                                                \
      case 4: q45_k_x16_tile_vnni(tile, xq, xd, bsums, nb, I, 4, y, O, fifth); break;                             \
      case 3: q45_k_x16_tile_vnni(tile, xq, xd, bsums, nb, I, 3, y, O, fifth); break;                             \
      case 2: q45_k_x16_tile_vnni(tile, xq, xd, bsums, nb, I, 2, y, O, fifth); break;                             \
      default: q45_k_x16_tile_vnni(tile, xq, xd, bsums, nb, I, 1, y, O, fifth); break;                            \
    }                                                                                                              \
  }
K_X16_TILE(q4_k_x16_tile_vnni, 0)
K_X16_TILE(q5_k_x16_tile_vnni, 1)

/* q6_k's: each weight 128 h + 32 q + l (l < 32) is the low (q < 2) or high nibble of low-nibble byte 64 h + 32 (q & 1)
 * + l, or'd with bits 2q, 2q + 1 of high-bit byte 32 h + l as bits 4, 5: in 0..63, the weight plus 32; its scale is
 * g = 8 h + 2 q + l / 16. The three 64-byte groups holding weights 128 h + 32 q + l..l+3 of the 16 rows for all four q
 * are decoded together, and per scale group four vpdpbusd (16 weights of 16 rows) per activation row; each group's
 * integer sum (below 2^17) times its scale is exact in float32, and summed there (a cvt and an fma where a 32-bit
 * multiply and an add cost a third more here); the 32 is taken off after, as 32 sum_g sc_g bsum_g (vpdpwssd on
 * pairs of scales). */
static inline int pair16(int16_t lo, int16_t hi) { return (int)((uint32_t)(uint16_t)lo | (uint32_t)(uint16_t)hi << 16); }
__attribute__((target(VNNI_TARGET), always_inline)) static inline void q6_k_x16_tile_vnni_n(
    const uint8_t* tile, const int8_t* xq, const float* xd, const int16_t* bsums, int64_t nb, int64_t I, int rows,
    float* y, int64_t O) {
  const int block = KX16 * 210;
  const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
  __m512 acc[K_ROWS];
#pragma GCC unroll 4
  for (int r = 0; r < K_ROWS; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = tile + k * block;
    const uint8_t* groups = blk + 32; /* group n: bytes 4n..4n+3 of each row */
    const __m512i sc4[4] = {_mm512_loadu_si512(groups + 64 * 48), _mm512_loadu_si512(groups + 64 * 49),
                            _mm512_loadu_si512(groups + 64 * 50), _mm512_loadu_si512(groups + 64 * 51)};
    __m512 fsum[K_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < K_ROWS; ++r) fsum[r] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
      for (int s = 0; s < 2; ++s) { /* scale groups 8 h + 2 q + s, q = 0..3: 16 weights each */
        __m512i part[4][K_ROWS];
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
          for (int r = 0; r < K_ROWS; ++r) part[q][r] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const int l = 16 * s + 4 * i;
          const __m512i ql0 = _mm512_loadu_si512(groups + 64 * ((64 * h + l) / 4));
          const __m512i ql1 = _mm512_loadu_si512(groups + 64 * ((64 * h + 32 + l) / 4));
          const __m512i qh = _mm512_loadu_si512(groups + 64 * ((128 + 32 * h + l) / 4));
          const __m512i u[4] = {
              _mm512_or_si512(_mm512_and_si512(ql0, low4), _mm512_and_si512(_mm512_slli_epi16(qh, 4), bits45)),
              _mm512_or_si512(_mm512_and_si512(ql1, low4), _mm512_and_si512(_mm512_slli_epi16(qh, 2), bits45)),
              _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql0, 4), low4), _mm512_and_si512(qh, bits45)),
              _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql1, 4), low4),
                              _mm512_and_si512(_mm512_srli_epi16(qh, 2), bits45))};
#pragma GCC unroll 4
          for (int r = 0; r < K_ROWS; ++r)
            if (r < rows)
#pragma GCC unroll 4
              for (int q = 0; q < 4; ++q) {
                int32_t x4;
                memcpy(&x4, xq + r * I + k * QK_K + 128 * h + 32 * q + l, 4);
                part[q][r] = _mm512_dpbusd_epi32(part[q][r], u[q], _mm512_set1_epi32(x4));
              }
        }
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          /* scale g of each row, sign-extended */
          const int g = 8 * h + 2 * q + s;
          const __m512 sc = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(sc4[g / 4], 24 - 8 * (g % 4)), 24));
#pragma GCC unroll 4
          for (int r = 0; r < K_ROWS; ++r)
            if (r < rows) fsum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[q][r]), sc, fsum[r]);
        }
      }
    /* scales as int16 pairs: (sc 4i, sc 4i + 2) and (sc 4i + 1, sc 4i + 3) of each row */
    __m512i even[4], odd[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) even[i] = _mm512_srai_epi16(_mm512_slli_epi16(sc4[i], 8), 8), odd[i] = _mm512_srai_epi16(sc4[i], 8);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)blk));
#pragma GCC unroll 4
    for (int r = 0; r < K_ROWS; ++r)
      if (r < rows) {
        const int16_t* bs = bsums + r * nb * 16 + k * 16;
        __m512i offset = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          offset = _mm512_dpwssd_epi32(offset, even[i], _mm512_set1_epi32(pair16(bs[4 * i], bs[4 * i + 2])));
          offset = _mm512_dpwssd_epi32(offset, odd[i], _mm512_set1_epi32(pair16(bs[4 * i + 1], bs[4 * i + 3])));
        }
        const __m512 sum = _mm512_sub_ps(fsum[r], _mm512_cvtepi32_ps(_mm512_slli_epi32(offset, 5)));
        acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(xd[r * nb + k])), acc[r]);
      }
  }
#pragma GCC unroll 4
  for (int r = 0; r < K_ROWS; ++r)
    if (r < rows) _mm512_storeu_ps(y + r * O, acc[r]);
}
__attribute__((target(VNNI_TARGET))) static void q6_k_x16_tile_vnni(const uint8_t* tile, const int8_t* xq,
                                                                    const float* xd, const int16_t* bsums, int64_t nb,
                                                                    int64_t I, int rows, float* y, int64_t O) {
  switch (rows) {
    case 4: q6_k_x16_tile_vnni_n(tile, xq, xd, bsums, nb, I, 4, y, O); break;
    case 3: q6_k_x16_tile_vnni_n(tile, xq, xd, bsums, nb, I, 3, y, O); break;
    case 2: q6_k_x16_tile_vnni_n(tile, xq, xd, bsums, nb, I, 2, y, O); break;
    default: q6_k_x16_tile_vnni_n(tile, xq, xd, bsums, nb, I, 1, y, O); break;
  }
}

typedef float (*kdot_fn)(const uint8_t*, const int8_t*, const float*, const int16_t*, int64_t);
/* VNNI's: rows (1..K_ROWS) activation rows at once into out[rows]. */
typedef void (*krows_fn)(const uint8_t*, const int8_t*, const float*, const int16_t*, int64_t, int64_t, int, float*);

/* The other paths: each row gathered back to GGUF's layout, then the path's row kernel. */
static void kx16_tile_rows(const uint8_t* tile, const int8_t* xq, const float* xd, const int16_t* bsums,
                           int64_t nb, float* y, uint8_t* row, kdot_fn dot, int fmt) {
  const int bytes = k_block_bytes(fmt);
  for (int r = 0; r < KX16; ++r) {
    for (int64_t k = 0; k < nb; ++k)
      for (int i = 0; i < bytes; ++i) row[k * bytes + i] = tile[k * KX16 * bytes + kx16_at(r, i, fmt)];
    y[r] = dot(row, xq, xd, bsums, nb);
  }
}

/* y [B, O] = x [B, I] W^T + bias for W [O, I / 256 * block bytes] in fmt (KFMT_*), shared among the threads of the
 * caller's parallel region (orphaned omp fors, each ending with its barrier: layers.c's one-call decode step calls
 * it so); scratch: xq [B * I] int8, xd [B * I / 256] float, bsums [B * I / 16] int16. */
void chatloop_kquant_linear_shared(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B,
                                   int64_t O, int64_t I, int fmt, int isa, int8_t* xq, float* xd, int16_t* bsums) {
  const int64_t nb = I / QK_K, row_bytes = nb * k_block_bytes(fmt);
#pragma omp for schedule(static)
  for (int64_t b = 0; b < B; ++b) quantize_row_q8_k(x + b * I, xq + b * I, xd + b * nb, bsums + b * nb * 16, nb);
  static const kdot_fn table[3][5] = {
      {dot_q4_k_portable, dot_q6_k_portable, dot_q5_k_portable, dot_q3_k_portable, dot_q2_k_portable},
      {dot_q4_k_avx2, dot_q6_k_avx2, dot_q5_k_avx2, dot_q3_k_avx2, dot_q2_k_avx2},
      {dot_q4_k_vnni, dot_q6_k_vnni, dot_q5_k_vnni, dot_q3_k_vnni, dot_q2_k_vnni}};
  const int rows_fmt = fmt == KFMT_Q4_K_X16   ? KFMT_Q4_K
                       : fmt == KFMT_Q5_K_X16 ? KFMT_Q5_K
                       : fmt == KFMT_Q6_K_X16 ? KFMT_Q6_K
                                              : fmt;
  const kdot_fn dot = table[isa >= KISA_AVX512_VNNI ? 2 : isa == KISA_AVX2 ? 1 : 0][rows_fmt];
  if (rows_fmt != fmt) {
    uint8_t row[isa >= KISA_AVX512_VNNI ? 1 : row_bytes]; /* a row gathered back (a few kB: on the thread's stack) */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < O / KX16; ++t)
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* tile = w + t * KX16 * row_bytes;
        if (isa >= KISA_AVX512_VNNI) { /* K_ROWS rows at once, straight into y */
          const int rows = B - b < K_ROWS ? (int)(B - b) : K_ROWS;
          (fmt == KFMT_Q4_K_X16   ? q4_k_x16_tile_vnni
           : fmt == KFMT_Q5_K_X16 ? q5_k_x16_tile_vnni
                                  : q6_k_x16_tile_vnni)(tile, xq + b * I, xd + b * nb, bsums + b * nb * 16, nb, I,
                                                        rows, y + b * O + t * KX16, O);
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < KX16; ++j) y[(b + r) * O + t * KX16 + j] += bias ? bias[t * KX16 + j] : 0.0f;
          b += rows - 1;
          continue;
        }
        float out[KX16];
        kx16_tile_rows(tile, xq + b * I, xd + b * nb, bsums + b * nb * 16, nb, out, row, dot, rows_fmt);
        for (int r = 0; r < KX16; ++r) y[b * O + t * KX16 + r] = out[r] + (bias ? bias[t * KX16 + r] : 0.0f);
      }
    return;
  }
  if (isa >= KISA_AVX512_VNNI) { /* K_ROWS activation rows a pass over each weight row */
    static const krows_fn rows_table[5] = {dot_q4_k_vnni_rows, dot_q6_k_vnni_rows, dot_q5_k_vnni_rows,
                                           dot_q3_k_vnni_rows, dot_q2_k_vnni_rows};
    const krows_fn dot_rows = rows_table[fmt];
#pragma omp for schedule(static)
    for (int64_t o = 0; o < O; ++o) {
      const uint8_t* row = w + o * row_bytes;
      for (int64_t b = 0; b < B; b += K_ROWS) {
        const int rows = B - b < K_ROWS ? (int)(B - b) : K_ROWS;
        float out[K_ROWS];
        dot_rows(row, xq + b * I, xd + b * nb, bsums + b * nb * 16, nb, I, rows, out);
        for (int r = 0; r < rows; ++r) y[(b + r) * O + o] = out[r] + (bias ? bias[o] : 0.0f);
      }
    }
    return;
  }
#pragma omp for schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    const uint8_t* row = w + o * row_bytes;
    for (int64_t b = 0; b < B; ++b) {
      y[b * O + o] = dot(row, xq + b * I, xd + b * nb, bsums + b * nb * 16, nb) + (bias ? bias[o] : 0.0f);
    }
  }
}

/* The same in a parallel region of its own (one wake-up of the threads a call). */
void chatloop_kquant_linear(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                            int64_t I, int fmt, int isa, int num_threads, int8_t* xq, float* xd, int16_t* bsums) {
#pragma omp parallel num_threads(num_threads)
  chatloop_kquant_linear_shared(x, w, bias, y, B, O, I, fmt, isa, xq, xd, bsums);
}
