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
 *
 * Qwen3's layers normalise each head of q and k (RMSNorm over head_dim) before rotary; a mixture-of-experts layer
 * (Qwen3-MoE, Mixtral) replaces gate/up/down with its sparse MLP: the router's logits (float32, on
 * chatloop_linear_shared), softmax over the experts, the top k, renormalised where norm_topk_prob says so, and the
 * chosen experts through experts.c's chatloop_moe_experts_shared (passed in, as the quantized functions are),
 * which adds each expert's weighted output into a zeroed buffer in ascending expert order, as
 * chatloop/models/moe.py's SparseMoE does; then the residual. torch.topk breaks ties among equal probabilities its
 * own way, which this file cannot reproduce: where the k-th and (k+1)-th largest probabilities of a row are within
 * a relative TIE of each other the step stops after that layer's attention and says so, and the caller finishes it
 * on the modules (torch's routing).
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

/* experts.c's chatloop_moe_experts_shared (its kernels struct opaque here). */
typedef void (*moe_experts_fn)(const float* x, float* out, int64_t C, int64_t F, int64_t n,
                               const uint8_t* const* gate_up, const uint8_t* const* down, int64_t gate_up_format,
                               int64_t down_format, int64_t gate_up_row_bytes, int64_t down_row_bytes,
                               const int64_t* counts, const int64_t* rows, const float* weights, int64_t max_rows,
                               const void* kernels, uint8_t* scratch);

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

/* A sparse MLP: the router [experts, hidden] (float32) and every expert's merged gate/up and down matrices, all of
 * one format pair (the experts' numbers in layers.c's numbering, and a row's bytes). */
typedef struct {
  const float* router;
  const uint8_t* const* gate_up; /* [experts] */
  const uint8_t* const* down;    /* [experts] */
  int64_t gate_up_format, down_format, gate_up_row_bytes, down_row_bytes;
} chatloop_moe_layer;

typedef struct {
  chatloop_matrix qkv[3];     /* q, k, v; or all three fused in [0], [1] and [2] empty */
  chatloop_matrix o;
  chatloop_matrix gate_up[2]; /* gate, up; or both fused in [0], [1] empty */
  chatloop_matrix down;
  const float* input_norm;
  const float* post_attention_norm;
  const float* q_norm, *k_norm;  /* [head_dim] each, Qwen3's per-head norms; NULL: none */
  const chatloop_moe_layer* moe; /* NULL: a dense MLP (gate_up, down) */
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
  int64_t experts, top_k, expert_intermediate, norm_topk_prob; /* the sparse layers' (experts 0: none) */
  moe_experts_fn moe_experts;
  const void* moe_kernels; /* experts.c's chatloop_moe_kernels */
} chatloop_llama_shape;

/* Relative gap under which two routing probabilities count as tied (see the top). float32 logits from another
 * matmul than torch's differ by ~1e-6 relative; a gap this small is rare in a trained router. */
#define TIE 1e-5f

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

/* Bytes the sparse layers' routing needs for B rows, 64-aligned (the experts' scratch follows it). */
int64_t chatloop_llama_decode_moe_scratch(const chatloop_llama_shape* s, int64_t B) {
  const int64_t E = s->experts, P = B * s->top_k;
  return E == 0 ? 0 : ((4 * B * E + 4 * B * s->hidden + 8 * (E + 1) + 8 * P * 3 + 4 * P * 2 + 16 * P) + 63) / 64 * 64;
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

/* Softmax, top k and renormalisation of rows' router logits probs [B, E] (made probabilities in place), then the
 * (row, expert) pairs grouped by expert, experts ascending and rows ascending within one, as moe.py groups them:
 * the used experts' counts, matrices and number (*n), their rows and weights, the largest count (*max_rows).
 * Returns whether some row's k-th and (k+1)-th probabilities tie (see TIE): then nothing else is valid. */
static int route(const chatloop_llama_shape* s, const chatloop_moe_layer* moe, float* probs, int64_t B,
                 int64_t* chosen, float* chosen_weights, int64_t* counts, int64_t* used_counts,
                 const uint8_t** gate_up, const uint8_t** down, int64_t* rows, float* weights, int64_t* n,
                 int64_t* max_rows) {
  const int64_t E = s->experts, k = s->top_k;
  char taken[E];
  int64_t start[E];
  for (int64_t b = 0; b < B; ++b) {
    float* p = probs + b * E;
    float top = p[0], sum = 0.0f;
    for (int64_t e = 1; e < E; ++e) top = p[e] > top ? p[e] : top;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = expf(p[e] - top));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    for (int64_t e = 0; e < E; ++e) taken[e] = 0;
    for (int64_t j = 0; j <= k && j < E; ++j) { /* the k largest, then the next one to see a tie */
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      if (j == k) {
        if (p[best] >= p[chosen[b * k + k - 1]] * (1.0f - TIE))
          return 1;
        break;
      }
      taken[best] = 1;
      chosen[b * k + j] = best;
      chosen_weights[b * k + j] = p[best];
    }
    if (s->norm_topk_prob) {
      float total = 0.0f;
      for (int64_t j = 0; j < k; ++j) total += chosen_weights[b * k + j];
      for (int64_t j = 0; j < k; ++j) chosen_weights[b * k + j] /= total;
    }
  }
  memset(counts, 0, sizeof(int64_t) * E);
  for (int64_t i = 0; i < B * k; ++i) ++counts[chosen[i]];
  *n = 0;
  *max_rows = 0;
  for (int64_t e = 0, at = 0; e < E; at += counts[e], ++e) {
    start[e] = at;
    if (counts[e] == 0)
      continue;
    used_counts[*n] = counts[e];
    gate_up[*n] = moe->gate_up[e];
    down[*n] = moe->down[e];
    ++*n;
    *max_rows = counts[e] > *max_rows ? counts[e] : *max_rows;
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t at = start[chosen[b * k + j]]++;
      rows[at] = b;
      weights[at] = chosen_weights[b * k + j];
    }
  return 0;
}

/* keys, values: the stage's pools [L, slots, K, D]; slots [B]: where each row's key and value go; tables [B, N]: each
 * row's block table (its sequence's), lengths [B] (the positions it sees, its own included), max_length =
 * max(lengths); cos, signed_sin [B, D]; moe_scratch: chatloop_llama_decode_moe_scratch bytes, then experts.c's
 * chatloop_moe_scratch(B * top_k, B, hidden, expert_intermediate, num_threads) (none without sparse layers).
 * Returns the number of layers done: num_layers, or the sparse layer whose routing tied (see the top), whose
 * attention and residual are done (x holds them) and whose MLP is not. */
int64_t chatloop_llama_decode(float* x, const chatloop_llama_layer* layers, int64_t num_layers,
                              const chatloop_llama_shape* s, float* keys, float* values, int64_t pool_slots,
                              const int64_t* slots, const int64_t* tables, const int64_t* lengths, int64_t N,
                              int64_t block_size, int64_t max_length, const float* cos, const float* signed_sin,
                              int64_t B, float* scratch, int num_threads, uint8_t* moe_scratch) {
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
  /* the sparse layers' routing: int64s and pointers first, then floats (chatloop_llama_decode_moe_scratch) */
  const int64_t E = s->experts, P = B * s->top_k;
  int64_t* counts = (int64_t*)moe_scratch;
  int64_t* chosen = counts + E + 1;
  int64_t* moe_rows = chosen + P;
  int64_t* used_counts = moe_rows + P;
  const uint8_t** used_gate_up = (const uint8_t**)(used_counts + P);
  const uint8_t** used_down = used_gate_up + P;
  float* probs = (float*)(used_down + P);
  float* moe_out = probs + B * E;
  float* chosen_weights = moe_out + B * C;
  float* moe_weights = chosen_weights + P;
  uint8_t* experts_scratch = moe_scratch + chatloop_llama_decode_moe_scratch(s, B);
  int64_t used = 0, max_rows = 0, stop = -1;
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
      if (layer->q_norm != NULL) { /* each head's D values, in place */
        chatloop_rms_norm(q_row, layer->q_norm, q_row, H, D, s->eps);
        chatloop_rms_norm(k_row, layer->k_norm, k_row, K, D, s->eps);
      }
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
    if (layer->moe != NULL) {
      chatloop_linear_shared(normed, layer->moe->router, NULL, probs, B, E, C);
#pragma omp single
      {
        if (route(s, layer->moe, probs, B, chosen, chosen_weights, counts, used_counts, used_gate_up, used_down,
                  moe_rows, moe_weights, &used, &max_rows))
          stop = l;
        memset(moe_out, 0, sizeof(float) * B * C);
      } /* (its barrier: every thread sees the routing, or the stop) */
      if (stop >= 0)
        break;
      s->moe_experts(normed, moe_out, C, s->expert_intermediate, used, used_gate_up, used_down,
                     layer->moe->gate_up_format, layer->moe->down_format, layer->moe->gate_up_row_bytes,
                     layer->moe->down_row_bytes, used_counts, moe_rows, moe_weights, max_rows, s->moe_kernels,
                     experts_scratch);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B * C; ++i) x[i] += moe_out[i] * residual;
      continue;
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
  return stop >= 0 ? stop : num_layers;
}
