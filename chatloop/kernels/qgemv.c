/* ChatLoop's quantized linear kernel: y[b, o] = sum_i W[o, i] x[b, i] + bias[o] for W in GGUF's q8_0 or q4_1
 * blocks of 32 (see chatloop/quant/formats.py), x float32.
 *
 * As llama.cpp does, each block of 32 activations is quantized to int8 first (a float scale d and s = d * sum(q)),
 * once per call and by the same scalar code on every path, so that the paths differ only in the order of float
 * additions; then each block's product is an integer dot product:
 *   q8_0:  d_w d_x sum(q_w q_x)            q4_1:  d_w d_x sum(q_w q_x) + m_w s_x
 * Three paths, chosen at run time by the caller (what the CPU has, or CHATLOOP_ISA): portable C, AVX2 (maddubs),
 * AVX-512 VNNI (vpdpbusd). This file is compiled without -march=native: each path states its own target.
 * Each weight block is unpacked once for up to four activation rows (batch-16 SmolLM2 step 41 -> 31 ms).
 *
 * Matrices whose rows come in sixteens are also kept interleaved (FMT_*_X16, made at load time where the CPU has
 * VNNI): per tile of 16 rows and block k, 16 blocks' bytes rearranged: the rows' d (fp16 x 16), q4_1's m (fp16 x
 * 16), then groups of 64 bytes, group g holding quant bytes 4g..4g+3 of each row, row after row (q8_0: 8 groups,
 * plus 128; q4_1: 4 groups of nibble pairs). One 512-bit load then holds four consecutive weights of each of the
 * 16 rows (q4_1's low nibbles: weights 4g..4g+3, high: 16+4g..), and vpdpbusd against four activation bytes
 * broadcast computes a block's dot product for 16 rows at once, with no horizontal sums: 4-7x the multiply-adds
 * per second of the row-by-row kernel (3072 x 576 at 16 rows).
 */
#include "multipath.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FMT_Q8_0 = 0, FMT_Q4_1 = 1, FMT_Q4_1_X16 = 2, FMT_Q8_0_X16 = 3 };
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };
#define QK 32
#define ROW_TILE 16 /* input rows whose activations stay in cache while a group of weight rows is read */
#define X16 16 /* weight rows of an interleaved tile */

static inline int block_bytes(int fmt) { return fmt == FMT_Q8_0 || fmt == FMT_Q8_0_X16 ? 34 : 20; }

/* ---- portable ----------------------------------------------------------------------------------------------- */
static float dot_portable(const uint8_t* w, const int8_t* xq, const float* xd, const float* xs, int64_t nb, int fmt) {
  float acc = 0.0f;
  const int bb = block_bytes(fmt);
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* blk = w + k * bb;
    const int8_t* q = xq + k * QK;
    int sum = 0;
    if (fmt == FMT_Q8_0) {
      for (int j = 0; j < QK; ++j) sum += (int8_t)blk[2 + j] * q[j];
      acc += half_to_float(blk) * xd[k] * (float)sum;
    } else {
      for (int j = 0; j < 16; ++j) sum += (blk[4 + j] & 0x0F) * q[j] + (blk[4 + j] >> 4) * q[j + 16];
      acc += half_to_float(blk) * xd[k] * (float)sum + half_to_float(blk + 2) * xs[k];
    }
  }
  return acc;
}

/* ---- SIMD helpers (AVX2) ------------------------------------------------------------------------------------ */
__attribute__((target("avx2,fma,f16c"))) static inline float half_f16c(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

/* The 32 weights of a q4_1 block as bytes 0..15: weight j in lane j (low nibbles, then high nibbles). */
__attribute__((target("avx2,fma,f16c"))) static inline __m256i q4_weights(const uint8_t* blk) {
  const __m128i raw = _mm_loadu_si128((const __m128i*)(blk + 4));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* Lane j of the result: the sum of the eight lanes of v[j] (one transposing reduction for eight blocks). */
__attribute__((target("avx2,fma,f16c"))) static inline __m256i sum_lanes8(const __m256i* v) {
  const __m256i s01 = _mm256_hadd_epi32(v[0], v[1]), s23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i s45 = _mm256_hadd_epi32(v[4], v[5]), s67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                          _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* Dot products of one weight row with up to ROWS_AT_ONCE activation rows (xq + r * I, xd and xs + r * nb).
 * Eight blocks at a time: their weights are unpacked once for all rows; per row, eight integer block sums are
 * reduced together and scaled by d_w d_x as one vector (q4_1's m_w s_x too), instead of a scalar scale, a
 * broadcast and a conversion per block and row: about a third of the instructions, which a 7B matrix at batch
 * 1 was bound by (11008 x 4096 q4_1: 1.11 -> 0.86 ms). The rest, and short rows, go one block at a time.
 * BLOCK_SUMS(u, s): the path's integer dot product of unsigned u and signed s bytes, as eight int32 sums. */
#define ROWS_AT_ONCE 4
#define GROUP 8
#define GROUPED_FROM 64 /* blocks a row: shorter rows (SmolLM2's 18) were faster one block at a time */
#define DOT_ROWS(name, features, BLOCK_SUMS)                                                                    \
  __attribute__((target(features), always_inline)) static inline void name(                                    \
      const uint8_t* w, const int8_t* xq, const float* xd, const float* xs, int64_t nb, int fmt, int64_t I,   \
      const int rows, float* out) {                                                                           \
    const int bb = block_bytes(fmt), q8 = fmt == FMT_Q8_0;                                                    \
    __m256 acc[ROWS_AT_ONCE];                                                                                 \
    for (int r = 0; r < ROWS_AT_ONCE; ++r) acc[r] = _mm256_setzero_ps();                                     \
    int64_t k = 0;                                                                                            \
    for (; nb >= GROUPED_FROM && k + GROUP <= nb; k += GROUP) {                                              \
      __m256i wq[GROUP], wsign[GROUP]; /* unsigned weights (q4_1's, or q8_0's magnitudes); q8_0's signs */    \
      float dws[GROUP], mws[GROUP];                                                                           \
      for (int j = 0; j < GROUP; ++j) {                                                                       \
        const uint8_t* blk = w + (k + j) * bb;                                                                \
        dws[j] = half_f16c(blk);                                                                              \
        if (q8) {                                                                                             \
          wsign[j] = _mm256_loadu_si256((const __m256i*)(blk + 2));                                          \
          wq[j] = _mm256_sign_epi8(wsign[j], wsign[j]);                                                      \
        } else {                                                                                              \
          wq[j] = q4_weights(blk);                                                                            \
          mws[j] = half_f16c(blk + 2);                                                                        \
        }                                                                                                     \
      }                                                                                                       \
      const __m256 dw = _mm256_loadu_ps(dws);                                                                 \
      for (int r = 0; r < rows; ++r) {                                                                        \
        __m256i sums[GROUP];                                                                                  \
        for (int j = 0; j < GROUP; ++j) {                                                                     \
          const __m256i qx = _mm256_loadu_si256((const __m256i*)(xq + r * I + (k + j) * QK));               \
          sums[j] = q8 ? BLOCK_SUMS(wq[j], _mm256_sign_epi8(qx, wsign[j])) : BLOCK_SUMS(wq[j], qx);           \
        }                                                                                                     \
        const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xd + r * nb + k));                             \
        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum_lanes8(sums)), acc[r]);                        \
        if (!q8) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(mws), _mm256_loadu_ps(xs + r * nb + k), acc[r]);    \
      }                                                                                                       \
    }                                                                                                         \
    float rest[ROWS_AT_ONCE] = {0};                                                                           \
    for (; k < nb; ++k) {                                                                                     \
      const uint8_t* blk = w + k * bb;                                                                        \
      const __m256i qw = q8 ? _mm256_loadu_si256((const __m256i*)(blk + 2)) : q4_weights(blk);               \
      const __m256i unsigned_w = q8 ? _mm256_sign_epi8(qw, qw) : qw;                                          \
      for (int r = 0; r < rows; ++r) {                                                                        \
        const __m256i qx = _mm256_loadu_si256((const __m256i*)(xq + r * I + k * QK));                       \
        const __m256i sums = BLOCK_SUMS(unsigned_w, q8 ? _mm256_sign_epi8(qx, qw) : qx);                     \
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half_f16c(blk) * xd[r * nb + k]), _mm256_cvtepi32_ps(sums),   \
                                 acc[r]);                                                                     \
        if (!q8) rest[r] += half_f16c(blk + 2) * xs[r * nb + k];                                              \
      }                                                                                                       \
    }                                                                                                         \
    for (int r = 0; r < rows; ++r) out[r] = hsum256(acc[r]) + rest[r];                                       \
  }

/* ---- AVX2 --------------------------------------------------------------------------------------------------- */
/* maddubs multiplies unsigned by signed bytes into pairs of int16 (no overflow: 2 x 127 x 127 < 32768). */
#define AVX2_SUMS(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
DOT_ROWS(dot_avx2_n, "avx2,fma,f16c", AVX2_SUMS)

/* ---- AVX-512 VNNI ------------------------------------------------------------------------------------------- */
#define VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
#define VNNI_SUMS(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
DOT_ROWS(dot_vnni_n, VNNI_TARGET, VNNI_SUMS)

/* The row count as a constant, so that each case keeps its accumulators in registers (a variable count cost
 * batch-1 steps 15%). */
#define BY_ROWS(name, impl, features)                                                                            \
  __attribute__((target(features))) static void name(const uint8_t* w, const int8_t* xq, const float* xd,          \
                                                   const float* xs, int64_t nb, int fmt, int64_t I, int rows,    \
                                                   float* out) {                                                 \
    switch (rows) {                                                                                             \
      case 1: impl(w, xq, xd, xs, nb, fmt, I, 1, out); break;                                                   \
      case 2: impl(w, xq, xd, xs, nb, fmt, I, 2, out); break;                                                   \
      case 3: impl(w, xq, xd, xs, nb, fmt, I, 3, out); break;                                                   \
      default: impl(w, xq, xd, xs, nb, fmt, I, ROWS_AT_ONCE, out);                                              \
    }                                                                                                           \
  }
BY_ROWS(dot_avx2, dot_avx2_n, "avx2,fma,f16c")
BY_ROWS(dot_vnni, dot_vnni_n, VNNI_TARGET)

static void dot_portable_rows(const uint8_t* w, const int8_t* xq, const float* xd, const float* xs, int64_t nb,
                              int fmt, int64_t I, int rows, float* out) {
  for (int r = 0; r < rows; ++r) out[r] = dot_portable(w, xq + r * I, xd + r * nb, xs + r * nb, nb, fmt);
}

/* ---- interleaved tiles of 16 rows (FMT_Q4_1_X16, FMT_Q8_0_X16) ---------------------------------------------- */
static inline int interleaved(int fmt) { return fmt == FMT_Q4_1_X16 || fmt == FMT_Q8_0_X16; }
/* Where a tile's block keeps its quant bytes: after d (and q4_1's m), 32 bytes of fp16 each. */
static inline int quants_at(int q8) { return q8 ? 32 : 64; }

/* Rows [O, nb * bytes] of q4_1 or q8_0 -> tiles [O / 16, nb, 16 * bytes] (see the top of this file); O a multiple
 * of 16. q8_0's quants are stored plus 128 (unsigned, for vpdpbusd). A tile takes the bytes its 16 rows took, so
 * `out` may be `w`: one tile is copied aside at a time (a copy of the whole matrix, freed after, stayed in the
 * allocator's heap: a 7B int4 worker held 220 MB more). Returns 0, or -1 without memory for one tile. */
int chatloop_interleave(const uint8_t* w, uint8_t* out, int64_t O, int64_t nb, int fmt) {
  const int bb = block_bytes(fmt), q8 = fmt == FMT_Q8_0, header = q8 ? 2 : 4, groups = q8 ? 8 : 4;
  const int at = quants_at(q8);
  const int64_t tile_bytes = X16 * nb * bb;
  uint8_t* rows = malloc(tile_bytes);
  if (!rows) return -1;
  for (int64_t t = 0; t < O / X16; ++t) {
    memcpy(rows, w + t * tile_bytes, tile_bytes);
    for (int64_t k = 0; k < nb; ++k) {
      uint8_t* dst = out + t * tile_bytes + k * X16 * bb;
      for (int j = 0; j < X16; ++j) {
        const uint8_t* blk = rows + (j * nb + k) * bb;
        memcpy(dst + 2 * j, blk, 2);
        if (!q8) memcpy(dst + 32 + 2 * j, blk + 2, 2);
        for (int g = 0; g < groups; ++g)
          for (int i = 0; i < 4; ++i) dst[at + g * 64 + j * 4 + i] = blk[header + 4 * g + i] ^ (q8 ? 0x80 : 0);
      }
    }
  }
  free(rows);
  return 0;
}

/* Quant byte i of row j in an interleaved block (q8_0: plus 128; q4_1: a pair of nibbles). */
static inline uint8_t x16_byte(const uint8_t* block, int at, int j, int i) {
  return block[at + (i / 4) * 64 + j * 4 + i % 4];
}

/* y[r, 0..15] (row stride O) for `rows` activation rows against one tile; the portable path. */
static void x16_tile_portable(const uint8_t* tile, int fmt, const int8_t* xq, const float* xd, const float* xs,
                              int64_t nb, int64_t I, int rows, float* y, int64_t O) {
  const int q8 = fmt == FMT_Q8_0_X16, at = quants_at(q8);
  const int64_t tile_block = X16 * block_bytes(fmt);
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < X16; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < nb; ++k) {
        const uint8_t* block = tile + k * tile_block;
        const int8_t* q = xq + r * I + k * QK;
        int sum = 0;
        if (q8) {
          for (int i = 0; i < QK; ++i) sum += (int8_t)(x16_byte(block, at, j, i) ^ 0x80) * q[i];
          acc += half_to_float(block + 2 * j) * xd[r * nb + k] * (float)sum;
        } else {
          for (int i = 0; i < 16; ++i)
            sum += (x16_byte(block, at, j, i) & 0x0F) * q[i] + (x16_byte(block, at, j, i) >> 4) * q[i + 16];
          acc += half_to_float(block + 2 * j) * xd[r * nb + k] * (float)sum +
                 half_to_float(block + 32 + 2 * j) * xs[r * nb + k];
        }
      }
      y[r * O + j] = acc;
    }
}

/* The same on VNNI: per block, the 16 rows' weights are loaded (and q4_1's nibbles split) once for all activation
 * rows; per row, vpdpbusd against four activation bytes broadcast, 8 times, gives the 16 rows' integer sums. q8_0's
 * weights are stored plus 128: sum((w + 128) q) - 128 sum(q), and d_x sum(q) is s_x, so the correction is
 * -128 d_w s_x, the form of q4_1's m_w s_x. */
#define X16_ROWS 8 /* activation rows a tile's blocks are unpacked for at once */
__attribute__((target(VNNI_TARGET), always_inline)) static inline void x16_tile_vnni_n(
    const uint8_t* tile, const int q8, const int8_t* xq, const float* xd, const float* xs, int64_t nb, int64_t I,
    const int rows, float* y, int64_t O) {
  __m512 acc[X16_ROWS];
  for (int r = 0; r < X16_ROWS; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t tile_block = X16 * block_bytes(q8 ? FMT_Q8_0 : FMT_Q4_1);
  for (int64_t k = 0; k < nb; ++k) {
    const uint8_t* block = tile + k * tile_block;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)block));
    const __m512 m = q8 ? _mm512_mul_ps(d, _mm512_set1_ps(-128.0f))
                        : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(block + 32)));
    __m512i weights[8]; /* weights[g]: quants 4g..4g+3 of every row (q4_1: g < 4 low nibbles, g >= 4 high) */
    for (int g = 0; g < (q8 ? 8 : 4); ++g) {
      const __m512i v = _mm512_loadu_si512(block + quants_at(q8) + g * 64);
      if (q8) {
        weights[g] = v;
      } else {
        weights[g] = _mm512_and_si512(v, low4);
        weights[g + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int8_t* q = xq + r * I + k * QK;
      __m512i sums = _mm512_setzero_si512();
      for (int g = 0; g < 8; ++g) {
        int32_t four;
        memcpy(&four, q + 4 * g, 4);
        sums = _mm512_dpbusd_epi32(sums, weights[g], _mm512_set1_epi32(four));
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(d, _mm512_set1_ps(xd[r * nb + k])), acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r * nb + k]), acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) _mm512_storeu_ps(y + r * O, acc[r]);
}

/* The format and row count as constants, as BY_ROWS. */
#define X16_BY_ROWS(name, q8)                                                                                    \
  __attribute__((target(VNNI_TARGET))) static void name(const uint8_t* tile, const int8_t* xq, const float* xd,   \
                                                      const float* xs, int64_t nb, int64_t I, int rows, float* y, \
                                                      int64_t O) {                                                \
    switch (rows) {                                                                                               \
      case 1: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, 1, y, O); break;                                      \
      case 2: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, 2, y, O); break;                                      \
      case 3: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, 3, y, O); break;                                      \
      case 4: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, 4, y, O); break;                                      \
      case 5: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, 5, y, O); break;                                      \
      case 6: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, 6, y, O); break;                                      \
      case 7: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, 7, y, O); break;                                      \
      default: x16_tile_vnni_n(tile, q8, xq, xd, xs, nb, I, X16_ROWS, y, O);                                     \
    }                                                                                                             \
  }
X16_BY_ROWS(x16_tile_vnni_q4_1, 0)
X16_BY_ROWS(x16_tile_vnni_q8_0, 1)

typedef void (*dot_fn)(const uint8_t*, const int8_t*, const float*, const float*, int64_t, int, int64_t, int,
                       float*);

/* y [B, O] = x [B, I] W^T + bias, shared among the threads of the caller's parallel region (orphaned omp fors,
 * each ending with its barrier): quantize the rows, then multiply. xq [B, I], xd and xs [B, I / 32]: scratch the
 * caller provides. */
void chatloop_quant_linear_shared(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B,
                                  int64_t O, int64_t I, int fmt, int isa, int8_t* xq, float* xd, float* xs) {
  const int64_t nb = I / QK, row_bytes = nb * block_bytes(fmt);
  const dot_fn dot = isa == ISA_AVX512_VNNI ? dot_vnni : isa == ISA_AVX2 ? dot_avx2 : dot_portable_rows;
#pragma omp for schedule(static)
  for (int64_t b = 0; b < B; ++b) quantize_row_q8_1(x + b * I, xq + b * I, xd + b * nb, xs + b * nb, nb);
  if (interleaved(fmt)) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < O / X16; ++t)
      for (int64_t b = 0; b < B; b += X16_ROWS) {
        const int rows = B - b < X16_ROWS ? (int)(B - b) : X16_ROWS;
        const uint8_t* tile = w + t * X16 * row_bytes;
        float* out = y + b * O + t * X16;
        if (isa != ISA_AVX512_VNNI)
          x16_tile_portable(tile, fmt, xq + b * I, xd + b * nb, xs + b * nb, nb, I, rows, out, O);
        else if (fmt == FMT_Q8_0_X16)
          x16_tile_vnni_q8_0(tile, xq + b * I, xd + b * nb, xs + b * nb, nb, I, rows, out, O);
        else
          x16_tile_vnni_q4_1(tile, xq + b * I, xd + b * nb, xs + b * nb, nb, I, rows, out, O);
        if (bias)
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < X16; ++j) out[r * O + j] += bias[t * X16 + j];
      }
    return;
  }
#pragma omp for schedule(static)
  for (int64_t o0 = 0; o0 < O; o0 += ROW_TILE) {
    const int64_t o1 = o0 + ROW_TILE < O ? o0 + ROW_TILE : O;
    for (int64_t b0 = 0; b0 < B; b0 += ROW_TILE) {
      const int64_t b1 = b0 + ROW_TILE < B ? b0 + ROW_TILE : B;
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t b = b0; b < b1; b += ROWS_AT_ONCE) {
          const int rows = b1 - b < ROWS_AT_ONCE ? (int)(b1 - b) : ROWS_AT_ONCE;
          float sums[ROWS_AT_ONCE];
          dot(w + o * row_bytes, xq + b * I, xd + b * nb, xs + b * nb, nb, fmt, I, rows, sums);
          for (int r = 0; r < rows; ++r) y[(b + r) * O + o] = sums[r] + (bias ? bias[o] : 0.0f);
        }
    }
  }
}

/* The same in a parallel region of its own (one wake-up of the threads a call). */
void chatloop_quant_linear(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                           int64_t I, int fmt, int isa, int num_threads, int8_t* xq, float* xd, float* xs) {
#pragma omp parallel num_threads(num_threads)
  chatloop_quant_linear_shared(x, w, bias, y, B, O, I, fmt, isa, xq, xd, xs);
}

/* Rows ids[r] of a quantized matrix as float32 [R, I] (embedding lookups). */
void chatloop_dequantize_rows(const uint8_t* w, const int64_t* ids, float* out, int64_t R, int64_t I, int fmt) {
  const int64_t nb = I / QK, row_bytes = nb * block_bytes(fmt);
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* row = w + ids[r] * row_bytes;
    float* dst = out + r * I;
    if (interleaved(fmt)) {
      const int64_t t = ids[r] / X16, tile_block = X16 * block_bytes(fmt);
      const int j = (int)(ids[r] % X16), at = quants_at(fmt == FMT_Q8_0_X16);
      for (int64_t k = 0; k < nb; ++k) {
        const uint8_t* block = w + t * X16 * row_bytes + k * tile_block;
        const float d = half_to_float(block + 2 * j);
        if (fmt == FMT_Q8_0_X16) {
          for (int i = 0; i < QK; ++i) dst[k * QK + i] = d * (float)(int8_t)(x16_byte(block, at, j, i) ^ 0x80);
          continue;
        }
        const float m = half_to_float(block + 32 + 2 * j);
        for (int i = 0; i < 16; ++i) {
          dst[k * QK + i] = d * (float)(x16_byte(block, at, j, i) & 0x0F) + m;
          dst[k * QK + i + 16] = d * (float)(x16_byte(block, at, j, i) >> 4) + m;
        }
      }
      continue;
    }
    for (int64_t k = 0; k < nb; ++k) {
      const uint8_t* blk = row + k * block_bytes(fmt);
      const float d = half_to_float(blk);
      if (fmt == FMT_Q8_0) {
        for (int j = 0; j < QK; ++j) dst[k * QK + j] = d * (float)(int8_t)blk[2 + j];
      } else {
        const float m = half_to_float(blk + 2);
        for (int j = 0; j < 16; ++j) {
          dst[k * QK + j] = d * (float)(blk[4 + j] & 0x0F) + m;
          dst[k * QK + j + 16] = d * (float)(blk[4 + j] >> 4) + m;
        }
      }
    }
  }
}
