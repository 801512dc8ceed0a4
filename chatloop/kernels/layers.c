/* A decode step through all Llama-family layers of a stage in one call.
 *
 * A batch-1 decode step of a 30-layer model made ~20 torch and ctypes calls a layer, each costing microseconds
 * beyond its work: between the matmuls the step spent as long as in them (torch.profiler, issue 15). Here each
 * layer is RMSNorm, the fused q/k/v projection, rotary embeddings, the new key and value written into the paged
 * cache, decode attention over it, the output projection and residual, RMSNorm, the fused gate/up projection,
 * SiLU(gate) * up, the down projection and residual: the same kernels and the same order of operations as the
 * stage's modules (chatloop/models/llama.py), called from C.
 *
 * Matrices are float32 (chatloop_linear_shared, gemv.c) or quantized (the quantized library's
 * chatloop_quant_linear_shared, which the caller passes in: that library is built for several CPUs and picks its
 * path at run time).
 * x [B, C] float32 is updated in place; one new token per sequence (T = 1), every sequence real (no padding).
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

/* The quantized library's chatloop_quant_linear_shared (work shared in the caller's parallel region). */
typedef void (*quant_linear_fn)(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                                int64_t I, int fmt, int isa, int8_t* xq, float* xd, float* xs);

/* One matrix: format -1 float32 [out, in], else the quantized format's number (qgemv.c's FMT_*). */
typedef struct {
  int64_t format;
  const void* weight;
  const float* bias; /* or NULL */
  int64_t out_features, in_features;
} chatloop_matrix;

typedef struct {
  chatloop_matrix qkv, o, gate_up, down;
  const float* input_norm;
  const float* post_attention_norm;
} chatloop_llama_layer;

typedef struct {
  int64_t hidden, heads, kv_heads, head_dim, intermediate;
  float eps;
  quant_linear_fn quant_linear; /* NULL when no matrix is quantized */
  int64_t isa;                  /* the quantized kernel's path */
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
              + widest / 4 + 2 * (widest / 32) + 2); /* quantized activations: int8 values, two floats a block */
}

/* Called by every thread of the region: the work is shared, and all wait at its end. */
static void matmul(const chatloop_matrix* m, const chatloop_llama_shape* s, const float* x, float* y, int64_t B,
                   int8_t* xq, float* xd, float* xs) {
  if (m->format < 0)
    chatloop_linear_shared(x, (const float*)m->weight, m->bias, y, B, m->out_features, m->in_features);
  else
    s->quant_linear(x, (const uint8_t*)m->weight, m->bias, y, B, m->out_features, m->in_features, (int)m->format,
                    (int)s->isa, xq, xd, xs);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* keys, values: the stage's pools [L, slots, K, D]; slots [B]: where each sequence's new token goes; tables [B, N],
 * lengths [B] (the new token included), max_length = max(lengths); cos, signed_sin [B, D]. */
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
  const float scale = 1.0f / sqrtf((float)D);
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
    matmul(&layer->qkv, s, normed, qkv, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv + b * qkv_width;
      chatloop_rope(row, cos + b * D, signed_sin + b * D, 1, qkv_width, 0, H + K, D);
      memcpy(q + b * H * D, row, sizeof(float) * H * D);
      memcpy(layer_keys + slots[b] * K * D, row + H * D, sizeof(float) * K * D);
      memcpy(layer_values + slots[b] * K * D, row + (H + K) * D, sizeof(float) * K * D);
    }
    chatloop_decode_attention_shared(q, layer_keys, layer_values, tables, lengths, scores, attention, B, H, K, D, N,
                                     block_size, max_length, scale);
    matmul(&layer->o, s, attention, projected, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = b * C; i < (b + 1) * C; ++i) x[i] += projected[i];
      chatloop_rms_norm(x + b * C, layer->post_attention_norm, normed + b * C, 1, C, s->eps);
    }
    matmul(&layer->gate_up, s, normed, gate_up, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * F; ++i) {
      const int64_t b = i / F, f = i % F;
      act[i] = silu(gate_up[b * 2 * F + f]) * gate_up[b * 2 * F + F + f];
    }
    matmul(&layer->down, s, act, projected, B, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * C; ++i) x[i] += projected[i];
  }
}
