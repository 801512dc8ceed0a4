/* Decode kernel for GGUF's k-quants Q4_K, Q5_K and Q6_K (super-blocks of 256 weights; layouts in
 * chatloop/quant/blocks.py): y[b, o] = sum_i W[o, i] x[b, i] + bias[o], x float32.
 *
 * As llama.cpp does, each 256 activations are quantized first to Q8_K: int8 q, a float scale d (amax / 127, ties
 * to even) and the sums of q over each 16 (bsums), once per call by the same scalar code on every path. Then per
 * super-block, with integer dot products over each 16 or 32 weights:
 *   q4_k, q5_k:  d_x (d sum_s sc_s sum(q_w q_x) - dmin sum_s m_s (bsum_2s + bsum_2s+1))   (8 sub-blocks of 32;
 *                q5_k's fifth bit of weight 32 s + l is bit s of its byte l of high bits)
 *   q6_k:  d_x d (sum_g sc_g sum(q_w q_x) - 32 sum_g sc_g bsum_g)                      (16 groups of 16)
 * Three paths, chosen at run time by the caller: portable C, AVX2 (maddubs, then madd by the scales) and AVX-512
 * VNNI (vpdpbusd on 256-bit vectors, then mullo by the scales). This file is compiled without -march=native: each
 * path states its own target.
 */
#include "multipath.h"
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { KFMT_Q4_K = 0, KFMT_Q6_K = 1, KFMT_Q5_K = 2 };
enum { KISA_PORTABLE = 0, KISA_AVX2 = 1, KISA_AVX512_VNNI = 2 };
#define QK_K 256

static inline int k_block_bytes(int fmt) { return fmt == KFMT_Q4_K ? 144 : fmt == KFMT_Q5_K ? 176 : 210; }

/* IEEE half to float, without F16C. */
static inline float k_half(const uint8_t* p) {
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
  } else {
    int shift = 0;
    uint32_t m = mantissa;
    while (!(m & 0x400)) m <<= 1, ++shift;
    bits = sign | ((uint32_t)(113 - shift) << 23) | ((m & 0x3FF) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
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
    acc += xd[k] * (k_half(blk) * (float)sumi - k_half(blk + 2) * (float)q4_k_mins(m, bsums + k * 16));
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
    acc += xd[k] * k_half(blk + 208) * (float)(sumi - 32 * offset);
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
    uint8_t sc[8], m[8];
    q4_k_scales(blk + 4, sc, m);
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

__attribute__((target("avx2,fma,f16c"))) static float dot_q6_k_avx2(const uint8_t* w, const int8_t* xq,
                                                                     const float* xd, const int16_t* bsums,
                                                                     int64_t nb) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F), two_bits = _mm256_set1_epi8(3);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const int8_t* q = xq + k * QK_K;
    __m256i sumi = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i ql0 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h));
      const __m256i ql1 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32));
      const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
      __m256i quants[4];
      quants[0] = _mm256_or_si256(_mm256_and_si256(ql0, low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(qh, two_bits), 4));
      quants[1] = _mm256_or_si256(_mm256_and_si256(ql1, low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two_bits), 4));
      quants[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two_bits), 4));
      quants[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two_bits), 4));
      for (int c = 0; c < 4; ++c) {
        const __m256i p = _mm256_maddubs_epi16(quants[c], _mm256_loadu_si256((const __m256i*)(q + 128 * h + 32 * c)));
        const __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[8 * h + 2 * c + 1]), _mm_set1_epi16(sc[8 * h + 2 * c]));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
      }
    }
    int offset = 0;
    for (int g = 0; g < 16; ++g) offset += sc[g] * bsums[k * 16 + g];
    sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * offset, 0, 0, 0, 0, 0, 0, 0));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[k] * f16_avx2(blk + 208)), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum256(acc);
}

/* ---- AVX-512 VNNI (256-bit vpdpbusd) ------------------------------------------------------------------------- */
#define VNNI_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"

__attribute__((target(VNNI_TARGET))) static inline float dot_q45_k_vnni(const uint8_t* w, const int8_t* xq,
                                                                       const float* xd, const int16_t* bsums,
                                                                       int64_t nb, const int fifth) {
  const int block = fifth ? 176 : 144;
  const __m256i low_mask = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  __m256 acc = _mm256_setzero_ps();
  float mins = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * block;
    uint8_t sc[8], m[8];
    q4_k_scales(blk + 4, sc, m);
    const uint8_t* qs = blk + (fifth ? 48 : 16);
    const __m256i high = fifth ? _mm256_loadu_si256((const __m256i*)(blk + 16)) : zero;
    const int8_t* q = xq + k * QK_K;
    __m256i sumi = zero;
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
      const __m256i p_lo = _mm256_dpbusd_epi32(zero, lo, _mm256_loadu_si256((const __m256i*)(q + 64 * j)));
      const __m256i p_hi = _mm256_dpbusd_epi32(zero, hi, _mm256_loadu_si256((const __m256i*)(q + 64 * j + 32)));
      sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p_lo, _mm256_set1_epi32(sc[2 * j])));
      sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p_hi, _mm256_set1_epi32(sc[2 * j + 1])));
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[k] * f16_avx2(blk)), _mm256_cvtepi32_ps(sumi), acc);
    mins += xd[k] * f16_avx2(blk + 2) * (float)q4_k_mins(m, bsums + k * 16);
  }
  return hsum256(acc) - mins;
}
__attribute__((target(VNNI_TARGET))) static float dot_q4_k_vnni(const uint8_t* w, const int8_t* xq, const float* xd,
                                                                const int16_t* bsums, int64_t nb) {
  return dot_q45_k_vnni(w, xq, xd, bsums, nb, 0);
}
__attribute__((target(VNNI_TARGET))) static float dot_q5_k_vnni(const uint8_t* w, const int8_t* xq, const float* xd,
                                                                const int16_t* bsums, int64_t nb) {
  return dot_q45_k_vnni(w, xq, xd, bsums, nb, 1);
}

__attribute__((target(VNNI_TARGET))) static float dot_q6_k_vnni(const uint8_t* w, const int8_t* xq, const float* xd,
                                                                const int16_t* bsums, int64_t nb) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F), two_bits = _mm256_set1_epi8(3), zero = _mm256_setzero_si256();
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const int8_t* q = xq + k * QK_K;
    __m256i sumi = zero;
    for (int h = 0; h < 2; ++h) {
      const __m256i ql0 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h));
      const __m256i ql1 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32));
      const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
      __m256i quants[4];
      quants[0] = _mm256_or_si256(_mm256_and_si256(ql0, low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(qh, two_bits), 4));
      quants[1] = _mm256_or_si256(_mm256_and_si256(ql1, low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two_bits), 4));
      quants[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two_bits), 4));
      quants[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low_mask),
                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two_bits), 4));
      for (int c = 0; c < 4; ++c) {
        const __m256i p = _mm256_dpbusd_epi32(zero, quants[c], _mm256_loadu_si256((const __m256i*)(q + 128 * h + 32 * c)));
        const __m256i scales = _mm256_set_m128i(_mm_set1_epi32(sc[8 * h + 2 * c + 1]), _mm_set1_epi32(sc[8 * h + 2 * c]));
        sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, scales));
      }
    }
    int offset = 0;
    for (int g = 0; g < 16; ++g) offset += sc[g] * bsums[k * 16 + g];
    sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * offset, 0, 0, 0, 0, 0, 0, 0));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(xd[k] * f16_avx2(blk + 208)), _mm256_cvtepi32_ps(sumi), acc);
  }
  return hsum256(acc);
}

/* y [B, O] = x [B, I] W^T + bias for W [O, I / 256 * block bytes] in fmt (KFMT_*); scratch: xq [B * I] int8,
 * xd [B * I / 256] float, bsums [B * I / 16] int16. */
void chatloop_kquant_linear(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                            int64_t I, int fmt, int isa, int num_threads, int8_t* xq, float* xd, int16_t* bsums) {
  const int64_t nb = I / QK_K, row_bytes = nb * k_block_bytes(fmt);
  for (int64_t b = 0; b < B; ++b) quantize_row_q8_k(x + b * I, xq + b * I, xd + b * nb, bsums + b * nb * 16, nb);
  float (*dot)(const uint8_t*, const int8_t*, const float*, const int16_t*, int64_t);
  if (isa >= KISA_AVX512_VNNI) {
    dot = fmt == KFMT_Q4_K ? dot_q4_k_vnni : fmt == KFMT_Q5_K ? dot_q5_k_vnni : dot_q6_k_vnni;
  } else if (isa == KISA_AVX2) {
    dot = fmt == KFMT_Q4_K ? dot_q4_k_avx2 : fmt == KFMT_Q5_K ? dot_q5_k_avx2 : dot_q6_k_avx2;
  } else {
    dot = fmt == KFMT_Q4_K ? dot_q4_k_portable : fmt == KFMT_Q5_K ? dot_q5_k_portable : dot_q6_k_portable;
  }
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t o = 0; o < O; ++o) {
    const uint8_t* row = w + o * row_bytes;
    for (int64_t b = 0; b < B; ++b) {
      y[b * O + o] = dot(row, xq + b * I, xd + b * nb, bsums + b * nb * 16, nb) + (bias ? bias[o] : 0.0f);
    }
  }
}
