/* A decode step through all Llama-family layers of a stage in one call.
 *
 * A batch-1 decode step of a 30-layer model made ~20 torch and ctypes calls a layer, each costing microseconds
 * beyond its work: between the matmuls the step spent as long as in them (torch.profiler, issue 15). Here each
 * layer is RMSNorm, the fused q/k/v projection, rotary embeddings, the new key and value written into the paged
 * cache, decode attention over it, the output projection and residual, RMSNorm, the fused gate/up projection,
 * SiLU(gate) * up, the down projection and residual (each sublayer's output times the residual multiplier, 1 but
 * Granite's, which also sets the attention scale): the same kernels and the same order of operations as the
 * stage's modules (chatloop/models/llama.py), called from C.
 *
 * Matrices are float32 (chatloop_linear_shared, gemv.c) or quantized in any type a partition keeps: qgemv.c's
 * q8_0 / q4_1, kquant.c's k-quants (activations as Q8_K), ggufgemv.c's q5_0 / q5_1 / f16 / bf16, each through the
 * quantized library's *_linear_shared function, which the caller passes in (that library is built for several CPUs
 * and picks its path at run time). q, k and v (gate and up) are one fused matrix, or separate ones where their
 * types differ (a Q4_K_M file's attn_v is often Q6_K beside Q4_K): each part then writes a plane of its own.
 * x [B, C] float32 is updated in place, a row for each new token: a decode step's one a sequence, or a speculative
 * verify step's several of one sequence, each row with its own slot, position (cos/sin) and length over its
 * sequence's block table. Every row's key and value are in the cache before any row attends, so row i of a
 * sequence sees its rows before i (and itself) as a causal mask would let it, and no later one (their positions
 * lie past its length).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

void chatloop_linear_shared(const float* x, const float* w, const float* bias, float* y, int64_t B, int64_t O,
                            int64_t I);
void chatloop_decode_attention_shared(const float* q, const float* keys, const float* values, const int64_t* tables,
                                      const int64_t* lengths, float* scratch, float* out, int64_t B, int64_t H,
                                      int64_t K, int64_t D, int64_t N, int64_t block_size, int64_t max_length,
                                      float scale);
void chatloop_rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps);
void chatloop_rope(float* x, const float* cos, const float* signed_sin, int64_t rows, int64_t row_stride,
                   int64_t offset, int64_t heads, int64_t head_dim);

/* The quantized library's chatloop_quant_linear_shared and chatloop_gguf_linear_shared (work shared in the caller's
 * parallel region); chatloop_kquant_linear_shared takes int16 bsums where these take xs. */
typedef void (*quant_linear_fn)(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                                int64_t I, int fmt, int isa, int8_t* xq, float* xd, float* xs);
typedef void (*kquant_linear_fn)(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B,
                                 int64_t O, int64_t I, int fmt, int isa, int8_t* xq, float* xd, int16_t* bsums);

/* One matrix: format -1 float32 [out, in]; FAMILY * f + its number in its kernel: family 0 qgemv.c's FMT_*,
 * 1 kquant.c's KFMT_*, 2 ggufgemv.c's GFMT_* (chatloop/kernels/__init__.py: FUSED_FAMILIES). out_features 0: no
 * matrix (an unused part). */
#define FAMILY 100
typedef struct {
  int64_t format;
  const void* weight;
  const float* bias; /* or NULL */
  int64_t out_features, in_features;
} chatloop_matrix;

typedef struct {
  chatloop_matrix qkv[3];     /* q, k, v; or all three fused in [0], [1] and [2] empty */
  chatloop_matrix o;
  chatloop_matrix gate_up[2]; /* gate, up; or both fused in [0], [1] empty */
  chatloop_matrix down;
  const float* input_norm;
  const float* post_attention_norm;
} chatloop_llama_layer;

typedef struct {
  int64_t hidden, heads, kv_heads, head_dim, intermediate;
  float eps;
  quant_linear_fn quant_linear; /* NULL when no matrix is of its family */
  int64_t isa;                  /* the quantized kernels' path (one numbering in the three) */
  kquant_linear_fn kquant_linear;
  quant_linear_fn gguf_linear;
  float attention_scale;     /* the scores' scale; 0: 1/sqrt(head_dim) (Granite's attention_multiplier else) */
  float residual_multiplier; /* each sublayer's output's, before the residual add (1 but Granite's) */
} chatloop_llama_shape;

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* Floats of scratch the step needs for B sequences and contexts of up to max_length positions. */
int64_t chatloop_llama_decode_scratch(const chatloop_llama_shape* s, int64_t B, int64_t max_length) {
  const int64_t qkv = (s->heads + 2 * s->kv_heads) * s->head_dim, widest = max3(s->hidden, s->heads * s->head_dim,
                                                                                 s->intermediate);
  return B * (s->hidden           /* normalised x */
              + qkv               /* q, k, v */
              + 2 * s->heads * s->head_dim /* q contiguous, attention output */
              + 2 * s->intermediate        /* gate, up */
              + s->intermediate            /* SiLU(gate) * up */
              + s->hidden                  /* a projection's output before the residual */
              + s->heads * max_length      /* attention scores */
              + widest / 4 + 2 * (widest / 32) + 2); /* quantized activations: int8 values, two floats a block of
                                                      * 32 (Q8_K's one float a 256 and int16 sum a 16 fit there) */
}

/* Called by every thread of the region: the work is shared, and all wait at its end. */
static void matmul(const chatloop_matrix* m, const chatloop_llama_shape* s, const float* x, float* y, int64_t B,
                   int8_t* xq, float* xd, float* xs) {
  const uint8_t* w = (const uint8_t*)m->weight;
  const int fmt = (int)(m->format % FAMILY), isa = (int)s->isa;
  if (m->out_features == 0)
    return;
  if (m->format < 0)
    chatloop_linear_shared(x, (const float*)m->weight, m->bias, y, B, m->out_features, m->in_features);
  else if (m->format < FAMILY)
    s->quant_linear(x, w, m->bias, y, B, m->out_features, m->in_features, fmt, isa, xq, xd, xs);
  else if (m->format < 2 * FAMILY)
    s->kquant_linear(x, w, m->bias, y, B, m->out_features, m->in_features, fmt, isa, xq, xd, (int16_t*)xs);
  else
    s->gguf_linear(x, w, m->bias, y, B, m->out_features, m->in_features, fmt, isa, xq, xd, xs);
}

/* The parts' outputs side by side: part p writes plane y + B * (the parts before it's columns), rows of its own
 * width. Fused (one part), that is one [B, width] matrix. */
static void matmuls(const chatloop_matrix* parts, int n, const chatloop_llama_shape* s, const float* x, float* y,
                    int64_t B, int8_t* xq, float* xd, float* xs) {
  for (int p = 0; p < n; y += B * parts[p].out_features, ++p) matmul(parts + p, s, x, y, B, xq, xd, xs);
}

/* Where column c of row b of such parts' output is (the columns a caller reads from there lie in the same part). */
static float* column(const chatloop_matrix* parts, int n, float* y, int64_t B, int64_t b, int64_t c) {
  int p = 0;
  for (; p < n - 1 && c >= parts[p].out_features; ++p) {
    c -= parts[p].out_features;
    y += B * parts[p].out_features;
  }
  return y + b * parts[p].out_features + c;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* keys, values: the stage's pools [L, slots, K, D]; slots [B]: where each row's key and value go; tables [B, N]: each
 * row's block table (its sequence's), lengths [B] (the positions it sees, its own included), max_length =
 * max(lengths); cos, signed_sin [B, D]. */
void chatloop_llama_decode(float* x, const chatloop_llama_layer* layers, int64_t num_layers,
                           const chatloop_llama_shape* s, float* keys, float* values, int64_t pool_slots,
                           const int64_t* slots, const int64_t* tables, const int64_t* lengths, int64_t N,
                           int64_t block_size, int64_t max_length, const float* cos, const float* signed_sin,
                           int64_t B, float* scratch, int num_threads) {
  const int64_t C = s->hidden, H = s->heads, K = s->kv_heads, D = s->head_dim, F = s->intermediate;
  const int64_t qkv_width = (H + 2 * K) * D, widest = max3(C, H * D, F);
  float* normed = scratch;
  float* qkv = normed + B * C;
  float* q = qkv + B * qkv_width;
  float* attention = q + B * H * D;
  float* gate_up = attention + B * H * D;
  float* act = gate_up + B * 2 * F;
  float* projected = act + B * F;
  float* scores = projected + B * C;
  float* xd = scores + B * H * max_length;
  float* xs = xd + B * (widest / 32) + 1;
  int8_t* xq = (int8_t*)(xs + B * (widest / 32) + 1);
  const float scale = s->attention_scale != 0.0f ? s->attention_scale : 1.0f / sqrtf((float)D);
  const float residual = s->residual_multiplier;
  /* One parallel region for the whole step: the threads wake once, not at each of ~5 calls a layer (with four
   * workers on two cores a stage's threads slept between calls, and each wake-up cost more than the call). The
   * matmuls and attention share their work, and so do the row operations between them, by rows or elements (each
   * element computed as on one thread: a row operation on one thread while the others waited at its barrier was
   * ~10% of a batch-16 step). */
#pragma omp parallel num_threads(num_threads)
  for (int64_t l = 0; l < num_layers; ++l) {
    const chatloop_llama_layer* layer = layers + l;
    float* layer_keys = keys + l * pool_slots * K * D;
    float* layer_values = values + l * pool_slots * K * D;

#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) chatloop_rms_norm(x + b * C, layer->input_norm, normed + b * C, 1, C, s->eps);
    matmuls(layer->qkv, 3, s, normed, qkv, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      float* q_row = column(layer->qkv, 3, qkv, B, b, 0);
      float* k_row = column(layer->qkv, 3, qkv, B, b, H * D);
      /* each head rotated as one call over q and k rotates it (q and k are side by side only when fused) */
      chatloop_rope(q_row, cos + b * D, signed_sin + b * D, 1, H * D, 0, H, D);
      chatloop_rope(k_row, cos + b * D, signed_sin + b * D, 1, K * D, 0, K, D);
      memcpy(q + b * H * D, q_row, sizeof(float) * H * D);
      memcpy(layer_keys + slots[b] * K * D, k_row, sizeof(float) * K * D);
      memcpy(layer_values + slots[b] * K * D, column(layer->qkv, 3, qkv, B, b, (H + K) * D), sizeof(float) * K * D);
    } /* (the loop's barrier: every row's key and value are in the cache before any row attends) */
    chatloop_decode_attention_shared(q, layer_keys, layer_values, tables, lengths, scores, attention, B, H, K, D, N,
                                     block_size, max_length, scale);
    matmul(&layer->o, s, attention, projected, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = b * C; i < (b + 1) * C; ++i) x[i] += projected[i] * residual;
      chatloop_rms_norm(x + b * C, layer->post_attention_norm, normed + b * C, 1, C, s->eps);
    }
    matmuls(layer->gate_up, 2, s, normed, gate_up, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * F; ++i) {
      const int64_t b = i / F, f = i % F;
      const float *gate = column(layer->gate_up, 2, gate_up, B, b, 0), *up = column(layer->gate_up, 2, gate_up, B, b, F);
      act[i] = silu(gate[f]) * up[f];
    }
    matmul(&layer->down, s, act, projected, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * C; ++i) x[i] += projected[i] * residual;
  }
}
