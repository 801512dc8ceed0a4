/* Decode kernel for GGUF's Q5_0 and Q5_1 (blocks of 32 weights) and F16 and BF16 matrices (layouts in
 * chatloop/quant/blocks.py): y[b, o] = sum_i W[o, i] x[b, i] + bias[o], x float32.
 *
 * Q5_0 and Q5_1, as llama.cpp's vec_dot does, quantize each 32 activations first, as qgemv.c does (Q8_0 for
 * q5_0, Q8_1 for q5_1: int8 q, d = amax / 127 ties to even, and s = d sum(q)), once per call by the same scalar
 * code on every path; then each block's product is an integer dot product of the unsigned 5-bit quants u:
 *   q5_0:  d_w (d_x sum(u q_x) - 16 s_x)          q5_1:  d_w d_x sum(u q_x) + m_w s_x
 * F16 and BF16 multiply the float32 activations by the weights widened to float32, sums in float32.
 * Three paths, chosen at run time by the caller: portable C, AVX2 (maddubs; F16C, or a shift for bfloat16) and
 * AVX-512 (VNNI's vpdpbusd and a mask move for the fifth bits; 512-bit widening and FMA for the float types).
 * q5_0 and q5_1 matrices are also kept in tiles of 16 rows where the CPU has VNNI (GFMT_Q5_*_X16: see their section).
 * This file is compiled without -march=native: each path states its own target.
 */
#include "multipath.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { GFMT_Q5_0 = 0, GFMT_Q5_1 = 1, GFMT_F16 = 2, GFMT_BF16 = 3, GFMT_Q5_0_X16 = 4, GFMT_Q5_1_X16 = 5 };
enum { GISA_PORTABLE = 0, GISA_AVX2 = 1, GISA_AVX512 = 2 };
#define QK 32
#define GROUP 8 /* blocks whose integer sums are reduced and scaled as one vector */

static inline int64_t g_row_bytes(int fmt, int64_t I) {
  return fmt == GFMT_Q5_0 || fmt == GFMT_Q5_0_X16 ? I / QK * 22 : fmt == GFMT_Q5_1 || fmt == GFMT_Q5_1_X16 ? I / QK * 24
                                                                                                          : I * 2;
}

static inline float g_bf16(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ---- portable ----------------------------------------------------------------------------------------------- */
/* q5_0 (one = 0) and q5_1 (one = 1): the caller passes a constant. */
static inline float dot_q5_portable(const uint8_t* w, const int8_t* xq, const float* xd, const float* xs, int64_t nb,
                                    const int one) {
  const int bytes = one ? 24 : 22, at = one ? 4 : 2;
  float acc = 0.0f;
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * bytes;
    uint32_t qh;
    memcpy(&qh, blk + at, 4);
    const uint8_t* qs = blk + at + 4;
    const int8_t* q = xq + k * QK;
    int sum = 0;
    for (int j = 0; j < 16; ++j)
      sum += ((qs[j] & 0x0F) | ((qh >> j) & 1) << 4) * q[j] + ((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) * q[j + 16];
    const float d = half_to_float(blk);
    acc += d * xd[k] * (float)sum + (one ? half_to_float(blk + 2) : -16.0f * d) * xs[k];
  }
  return acc;
}

static float dot_float_portable(const uint8_t* w, const float* x, int64_t I, const int bf16) {
  float acc = 0.0f;
  for (int64_t i = 0; i < I; ++i) acc += (bf16 ? g_bf16(w + 2 * i) : half_to_float(w + 2 * i)) * x[i];
  return acc;
}

/* ---- AVX2 --------------------------------------------------------------------------------------------------- */
#define AVX2_TARGET "avx2,fma,f16c"

__attribute__((target(AVX2_TARGET))) static inline float g_f16c(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

/* Lane j of the result: the sum of the eight lanes of v[j]. */
__attribute__((target(AVX2_TARGET))) static inline __m256i g_sum_lanes8(const __m256i* v) {
  const __m256i s01 = _mm256_hadd_epi32(v[0], v[1]), s23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i s45 = _mm256_hadd_epi32(v[4], v[5]), s67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                          _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* The 32 weights of a block as unsigned bytes 0..31 in lanes 0..31 (low nibbles, then high, plus 16 each fifth
 * bit): the fifth bits spread to bytes by a shuffle, an or and a compare (llama.cpp's bytes_from_bits_32). */
__attribute__((target(AVX2_TARGET))) static inline __m256i q5_weights_avx2(const uint8_t* qh, const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128((const __m128i*)qs);
  const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
  uint32_t bits;
  memcpy(&bits, qh, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)bits),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7FBFDFEFF7FBFDFE)),
                                        _mm256_set1_epi64x(-1));
  return _mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
}

#define AVX512_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
/* The same with a mask move: bit j of qh selects 16 for byte j. */
__attribute__((target(AVX512_TARGET))) static inline __m256i q5_weights_vnni(const uint8_t* qh, const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128((const __m128i*)qs);
  const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
  uint32_t bits;
  memcpy(&bits, qh, 4);
  return _mm256_mask_add_epi8(nibbles, (__mmask32)bits, nibbles, _mm256_set1_epi8(0x10));
}

/* The float16 at p, p + stride, ... p + 7 stride as eight floats, gathered in registers (eight scalar stores and a
 * vector load of them would stall: the load cannot take its bytes from the stores). */
__attribute__((target(AVX2_TARGET))) static inline __m256 eight_halves(const uint8_t* p, const int stride) {
  uint16_t h[8];
  for (int j = 0; j < 8; ++j) memcpy(h + j, p + j * stride, 2);
  return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4], (short)h[5],
                                        (short)h[6], (short)h[7]));
}

#define AVX2_SUMS(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
#define VNNI_SUMS(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)

/* Eight blocks at a time: eight integer sums reduced together and scaled by d_w d_x, and the s_x term, as
 * vectors (as qgemv.c's grouped loop); the rest one block at a time. */
#define DOT_Q5(name, FEATURES, WEIGHTS, SUMS)                                                                       \
  __attribute__((target(FEATURES))) static inline float name(const uint8_t* w, const int8_t* xq, const float* xd,  \
                                                           const float* xs, int64_t nb, const int one) {         \
    const int bytes = one ? 24 : 22, at = one ? 4 : 2;                                                          \
    __m256 acc = _mm256_setzero_ps();                                                                           \
    int64_t k = 0;                                                                                              \
    for (; k + GROUP <= nb; k += GROUP) {                                                                       \
      __m256i sums[GROUP];                                                                                      \
      for (int j = 0; j < GROUP; ++j) {                                                                         \
        const uint8_t* blk = w + (k + j) * bytes;                                                               \
        sums[j] = SUMS(WEIGHTS(blk + at, blk + at + 4), _mm256_loadu_si256((const __m256i*)(xq + (k + j) * QK))); \
      }                                                                                                         \
      const __m256 dw = eight_halves(w + k * bytes, bytes);                                                     \
      const __m256 cw = one ? eight_halves(w + k * bytes + 2, bytes) : _mm256_mul_ps(dw, _mm256_set1_ps(-16.0f)); \
      acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(xd + k)), _mm256_cvtepi32_ps(g_sum_lanes8(sums)),  \
                            acc);                                                                               \
      acc = _mm256_fmadd_ps(cw, _mm256_loadu_ps(xs + k), acc);                                                  \
    }                                                                                                           \
    float rest = 0.0f;                                                                                          \
    for (; k < nb; ++k) {                                                                                       \
      const uint8_t* blk = w + k * bytes;                                                                       \
      const float d = g_f16c(blk);                                                                              \
      const __m256i sums = SUMS(WEIGHTS(blk + at, blk + at + 4), _mm256_loadu_si256((const __m256i*)(xq + k * QK))); \
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[k]), _mm256_cvtepi32_ps(sums), acc);                         \
      rest += (one ? g_f16c(blk + 2) : -16.0f * d) * xs[k];                                                     \
    }                                                                                                           \
    return hsum256(acc) + rest;                                                                                 \
  }
DOT_Q5(dot_q5_avx2, AVX2_TARGET, q5_weights_avx2, AVX2_SUMS)
DOT_Q5(dot_q5_vnni, AVX512_TARGET, q5_weights_vnni, VNNI_SUMS)

/* F16 (bf16 = 0) and BF16 (bf16 = 1): four sums of eight in flight. */
__attribute__((target(AVX2_TARGET))) static inline __m256 widen8_avx2(const uint8_t* p, const int bf16) {
  const __m128i raw = _mm_loadu_si128((const __m128i*)p);
  return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)) : _mm256_cvtph_ps(raw);
}

__attribute__((target(AVX2_TARGET))) static inline float dot_float_avx2(const uint8_t* w, const float* x, int64_t I,
                                                                        const int bf16) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= I; i += 32)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_fmadd_ps(widen8_avx2(w + 2 * (i + 8 * u), bf16), _mm256_loadu_ps(x + i + 8 * u), acc[u]);
  for (; i + 8 <= I; i += 8) acc[0] = _mm256_fmadd_ps(widen8_avx2(w + 2 * i, bf16), _mm256_loadu_ps(x + i), acc[0]);
  float sum = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < I; ++i) sum += (bf16 ? g_bf16(w + 2 * i) : g_f16c(w + 2 * i)) * x[i];
  return sum;
}

__attribute__((target(AVX512_TARGET))) static inline __m512 widen16_avx512(const uint8_t* p, const int bf16) {
  const __m256i raw = _mm256_loadu_si256((const __m256i*)p);
  return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)) : _mm512_cvtph_ps(raw);
}

__attribute__((target(AVX512_TARGET))) static inline float dot_float_avx512(const uint8_t* w, const float* x,
                                                                            int64_t I, const int bf16) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= I; i += 64)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm512_fmadd_ps(widen16_avx512(w + 2 * (i + 16 * u), bf16), _mm512_loadu_ps(x + i + 16 * u), acc[u]);
  for (; i + 16 <= I; i += 16)
    acc[0] = _mm512_fmadd_ps(widen16_avx512(w + 2 * i, bf16), _mm512_loadu_ps(x + i), acc[0]);
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  for (; i < I; ++i) sum += (bf16 ? g_bf16(w + 2 * i) : g_f16c(w + 2 * i)) * x[i];
  return sum;
}

/* One (weight row, activation row) product per path and format, the format a constant in each. */
typedef float (*gdot_fn)(const uint8_t*, const int8_t*, const float*, const float*, const float*, int64_t, int64_t);
#define GDOTS(suffix, ATTR, Q5, FLOAT)                                                                          \
  ATTR static float q5_0_##suffix(const uint8_t* w, const int8_t* xq, const float* xd, \
                                                             const float* xs, const float* x, int64_t nb,         \
                                                             int64_t I) {                                          \
    (void)x, (void)I;                                                                                             \
    return Q5(w, xq, xd, xs, nb, 0);                                                                              \
  }                                                                                                               \
  ATTR static float q5_1_##suffix(const uint8_t* w, const int8_t* xq, const float* xd, \
                                                             const float* xs, const float* x, int64_t nb,         \
                                                             int64_t I) {                                          \
    (void)x, (void)I;                                                                                             \
    return Q5(w, xq, xd, xs, nb, 1);                                                                              \
  }                                                                                                               \
  ATTR static float f16_##suffix(const uint8_t* w, const int8_t* xq, const float* xd,  \
                                                            const float* xs, const float* x, int64_t nb,          \
                                                            int64_t I) {                                           \
    (void)xq, (void)xd, (void)xs, (void)nb;                                                                       \
    return FLOAT(w, x, I, 0);                                                                                     \
  }                                                                                                               \
  ATTR static float bf16_##suffix(const uint8_t* w, const int8_t* xq, const float* xd, \
                                                             const float* xs, const float* x, int64_t nb,         \
                                                             int64_t I) {                                          \
    (void)xq, (void)xd, (void)xs, (void)nb;                                                                       \
    return FLOAT(w, x, I, 1);                                                                                     \
  }
#define PORTABLE_ATTR
#define AVX2_ATTR __attribute__((target(AVX2_TARGET)))
#define AVX512_ATTR __attribute__((target(AVX512_TARGET)))
GDOTS(portable, PORTABLE_ATTR, dot_q5_portable, dot_float_portable)
GDOTS(avx2, AVX2_ATTR, dot_q5_avx2, dot_float_avx2)
GDOTS(avx512, AVX512_ATTR, dot_q5_vnni, dot_float_avx512)

/* ---- q5_0 and q5_1 in tiles of 16 rows (GFMT_Q5_*_X16; made at load time where the CPU has VNNI) ---------- */
/* Per tile of 16 rows and block k, the 16 blocks' bytes (352, q5_1 384) rearranged as kquant.c's q4_k_x16: the
 * rows' d (fp16 x 16), [q5_1: m (fp16 x 16)], then their 4-byte words side by side (64 bytes a word: the fifth bits,
 * then four words of nibbles). A 512-bit load holds the same 4 bytes of 16 rows: their fifth bits (a 32-bit word a
 * row, in its lane), or 8 weights each (low nibbles: weights 4g..4g+3, high: 16 + 4g..), which vpdpbusd multiplies
 * by four activation bytes broadcast. The fifth bits of weights 4g..4g+3 are bits 4(g % 2).. of byte g / 2 of each
 * lane's word (16 + 4g: of byte 2 + g / 2): a byte shuffle copies that byte to the lane's four bytes, a test against
 * one bit a byte makes the mask under which 16 is added. */
#define GX16 16

static inline int gx16_at(int r, int i, int header) {
  if (i < header) return 32 * (i / 2) + 2 * r + i % 2;
  return 16 * header + 64 * ((i - header) / 4) + 4 * r + (i - header) % 4;
}

/* Rows [O, nb * bytes] of q5_0 or q5_1 (fmt: GFMT_Q5_0 or _1) -> tiles (inverse = 0), or back; O a multiple of 16;
 * out may be w. Returns 0, or -1 without memory for one tile. */
int chatloop_gguf_interleave(const uint8_t* w, uint8_t* out, int64_t O, int64_t nb, int fmt, int inverse) {
  const int bytes = fmt == GFMT_Q5_1 ? 24 : 22, header = fmt == GFMT_Q5_1 ? 4 : 2;
  const int64_t tile_bytes = GX16 * nb * bytes;
  uint8_t* copy = malloc(tile_bytes);
  if (!copy) return -1;
  for (int64_t t = 0; t < O / GX16; ++t) {
    memcpy(copy, w + t * tile_bytes, tile_bytes);
    uint8_t* dst = out + t * tile_bytes;
    for (int64_t k = 0; k < nb; ++k)
      for (int r = 0; r < GX16; ++r)
        for (int i = 0; i < bytes; ++i) {
          const int64_t row_at = (r * nb + k) * bytes + i, tile_at = k * GX16 * bytes + gx16_at(r, i, header);
          if (inverse)
            dst[row_at] = copy[tile_at];
          else
            dst[tile_at] = copy[row_at];
        }
  }
  free(copy);
  return 0;
}

/* Rows ids[n] of a q5_0_x16 or q5_1_x16 matrix (fmt: the rows' GFMT_*) as GGUF's rows: out [R, nb * bytes]. */
void chatloop_gguf_x16_rows(const uint8_t* w, const int64_t* ids, uint8_t* out, int64_t R, int64_t nb, int fmt) {
  const int bytes = fmt == GFMT_Q5_1 ? 24 : 22, header = fmt == GFMT_Q5_1 ? 4 : 2;
  for (int64_t n = 0; n < R; ++n) {
    const uint8_t* tile = w + ids[n] / GX16 * GX16 * nb * bytes;
    const int r = (int)(ids[n] % GX16);
    for (int64_t k = 0; k < nb; ++k)
      for (int i = 0; i < bytes; ++i)
        out[(n * nb + k) * bytes + i] = tile[k * GX16 * bytes + gx16_at(r, i, header)];
  }
}

/* y[r * O + 0..15] for r < rows (<= GX16_ROWS, a constant where inlined): rows activation rows (xq rows of I
 * bytes, xd and xs rows of nb) against one tile, on VNNI. Each block's weights are decoded once for all the rows
 * (at batch 16 the decoding, redone a row, was most of the work); each row's sums are what one row alone gets. */
#define GX16_ROWS 4
__attribute__((target(AVX512_TARGET), always_inline)) static inline void q5_x16_tile_vnni(
    const uint8_t* tile, const int8_t* xq, const float* xd, const float* xs, int64_t nb, int64_t I, int rows,
    float* y, int64_t O, const int one) {
  const int bytes = one ? 24 : 22, header = one ? 4 : 2;
  const __m512i low4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(0x10);
  const __m512i dword_base = _mm512_set_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0, 0x0C0C0C0C, 0x08080808,
                                              0x04040404, 0, 0x0C0C0C0C, 0x08080808, 0x04040404, 0, 0x0C0C0C0C,
                                              0x08080808, 0x04040404, 0);
  __m512 acc[GX16_ROWS];
#pragma GCC unroll 4
  for (int r = 0; r < GX16_ROWS; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = tile + k * GX16 * bytes;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)blk));
    const __m512 c = one ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 32)))
                         : _mm512_mul_ps(d, _mm512_set1_ps(-16.0f));
    const __m512i qh = _mm512_loadu_si512(blk + 16 * header);
    __m512i lo[4], hi[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512i v = _mm512_loadu_si512(blk + 16 * header + 64 + 64 * g);
      const int shift = 4 * (g % 2);
      const __m512i bits = _mm512_set1_epi32((int)((1u << shift) | (2u << shift) << 8 | (4u << shift) << 16 |
                                                   (8u << shift) << 24));
      const __m512i lo_bytes = _mm512_shuffle_epi8(qh, _mm512_add_epi8(dword_base, _mm512_set1_epi8((char)(g / 2))));
      const __m512i hi_bytes = _mm512_shuffle_epi8(qh, _mm512_add_epi8(dword_base, _mm512_set1_epi8((char)(2 + g / 2))));
      lo[g] = _mm512_and_si512(v, low4), hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      lo[g] = _mm512_mask_add_epi8(lo[g], _mm512_test_epi8_mask(lo_bytes, bits), lo[g], sixteen);
      hi[g] = _mm512_mask_add_epi8(hi[g], _mm512_test_epi8_mask(hi_bytes, bits), hi[g], sixteen);
    }
#pragma GCC unroll 4
    for (int r = 0; r < GX16_ROWS; ++r) {
      if (r >= rows)
        break;
      const int8_t* q = xq + r * I + k * QK;
      __m512i isum = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        int32_t x_lo, x_hi;
        memcpy(&x_lo, q + 4 * g, 4);
        memcpy(&x_hi, q + 16 + 4 * g, 4);
        isum = _mm512_dpbusd_epi32(isum, lo[g], _mm512_set1_epi32(x_lo));
        isum = _mm512_dpbusd_epi32(isum, hi[g], _mm512_set1_epi32(x_hi));
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(xd[r * nb + k])), acc[r]);
      acc[r] = _mm512_fmadd_ps(c, _mm512_set1_ps(xs[r * nb + k]), acc[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < GX16_ROWS; ++r)
    if (r < rows)
      _mm512_storeu_ps(y + r * O, acc[r]);
}
/* Each row count its own code (rows a constant in each inlined copy). */
#define Q5_X16_TILE(name, one)                                                                                        \
  __attribute__((target(AVX512_TARGET))) static void name(const uint8_t* tile, const int8_t* xq, const float* xd,   \
                                                          const float* xs, int64_t nb, int64_t I, int rows,       \
                                                          float* y, int64_t O) {                                  \
    switch (rows) {                                                                                                 \
      case 4: q5_x16_tile_vnni(tile, xq, xd, xs, nb, I, 4, y, O, one); break;                                       \
      case 3: q5_x16_tile_vnni(tile, xq, xd, xs, nb, I, 3, y, O, one); break;                                       \
      case 2: q5_x16_tile_vnni(tile, xq, xd, xs, nb, I, 2, y, O, one); break;                                       \
      default: q5_x16_tile_vnni(tile, xq, xd, xs, nb, I, 1, y, O, one); break;                                      \
    }                                                                                                               \
  }
Q5_X16_TILE(q5_0_x16_tile_vnni, 0)
Q5_X16_TILE(q5_1_x16_tile_vnni, 1)

/* y [B, O] = x [B, I] W^T + bias for W [O, row bytes] in fmt (GFMT_*), shared among the threads of the caller's
 * parallel region (orphaned omp fors, each ending with its barrier: layers.c's one-call decode step calls it so);
 * scratch for q5_0 and q5_1: xq [B * I] int8, xd and xs [B * I / 32] float. */
void chatloop_gguf_linear_shared(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                                 int64_t I, int fmt, int isa, int8_t* xq, float* xd, float* xs) {
  const int64_t nb = I / QK, row_bytes = g_row_bytes(fmt, I);
  const int quantized = fmt != GFMT_F16 && fmt != GFMT_BF16;
  if (quantized) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) quantize_row_q8_1(x + b * I, xq + b * I, xd + b * nb, xs + b * nb, nb);
  }
  static const gdot_fn table[3][4] = {{q5_0_portable, q5_1_portable, f16_portable, bf16_portable},
                                      {q5_0_avx2, q5_1_avx2, f16_avx2, bf16_avx2},
                                      {q5_0_avx512, q5_1_avx512, f16_avx512, bf16_avx512}};
  const int rows_fmt = fmt == GFMT_Q5_0_X16 ? GFMT_Q5_0 : fmt == GFMT_Q5_1_X16 ? GFMT_Q5_1 : fmt;
  const gdot_fn dot = table[isa >= GISA_AVX512 ? 2 : isa == GISA_AVX2 ? 1 : 0][rows_fmt];
  if (rows_fmt != fmt) { /* tiles: VNNI's kernel, or each row gathered back for the other paths' */
    uint8_t row[isa >= GISA_AVX512 ? 1 : row_bytes]; /* a row gathered back (a few kB: on the thread's stack) */
    const int bytes = rows_fmt == GFMT_Q5_1 ? 24 : 22, header = rows_fmt == GFMT_Q5_1 ? 4 : 2;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < O / GX16; ++t)
      for (int64_t b = 0; b < B; ++b) {
        float out[GX16];
        const uint8_t* tile = w + t * GX16 * row_bytes;
        if (isa >= GISA_AVX512) { /* GX16_ROWS rows at once, straight into y */
          const int rows = B - b < GX16_ROWS ? (int)(B - b) : GX16_ROWS;
          (fmt == GFMT_Q5_0_X16 ? q5_0_x16_tile_vnni : q5_1_x16_tile_vnni)(tile, xq + b * I, xd + b * nb,
                                                                          xs + b * nb, nb, I, rows,
                                                                          y + b * O + t * GX16, O);
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < GX16; ++j) y[(b + r) * O + t * GX16 + j] += bias ? bias[t * GX16 + j] : 0.0f;
          b += rows - 1;
          continue;
        } else {
          for (int r = 0; r < GX16; ++r) {
            for (int64_t k = 0; k < nb; ++k)
              for (int i = 0; i < bytes; ++i) row[k * bytes + i] = tile[k * GX16 * bytes + gx16_at(r, i, header)];
            out[r] = dot(row, xq + b * I, xd + b * nb, xs + b * nb, NULL, nb, I);
          }
        }
        for (int r = 0; r < GX16; ++r) y[b * O + t * GX16 + r] = out[r] + (bias ? bias[t * GX16 + r] : 0.0f);
      }
    return;
  }
#pragma omp for schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    const uint8_t* row = w + o * row_bytes;
    for (int64_t b = 0; b < B; ++b)
      y[b * O + o] = (quantized ? dot(row, xq + b * I, xd + b * nb, xs + b * nb, NULL, nb, I)
                                : dot(row, NULL, NULL, NULL, x + b * I, nb, I)) +
                     (bias ? bias[o] : 0.0f);
  }
}

/* The same in a parallel region of its own (one wake-up of the threads a call). */
void chatloop_gguf_linear(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                          int64_t I, int fmt, int isa, int num_threads, int8_t* xq, float* xd, float* xs) {
#pragma omp parallel num_threads(num_threads)
  chatloop_gguf_linear_shared(x, w, bias, y, B, O, I, fmt, isa, xq, xd, xs);
}
