/* A sparse MLP's chosen experts in one call (chatloop/models/moe.py: SparseMoE).
 *
 * Through torch, a batch-1 step of a Qwen3-30B-A3B-shape layer made 16 kernel calls for its 8 experts (gate/up
 * merged, then down), each a ctypes call, a parallel region of its own and its activations quantized, plus a dozen
 * torch ops an expert for SiLU, the weighting and the sum: 1.7 ms a layer where the 16 calls alone took 1.3 and the
 * same bytes in two calls 1.0 (one layer timed alone, benchmarks/results/moe/). Here one parallel region runs every
 * expert that some row chose, as llama.cpp's mul_mat_id does: the gate/up projections of all of them shared among
 * the threads as one list of 16-row slices, then SiLU(gate) * up, then all the down projections the same way, then
 * out[row] = out[row] + weight * y, expert after expert in ascending order as the modules' path adds them. Five
 * barriers a layer, whatever the number of experts (one a projection an expert would make the threads wait on each
 * other 48 times a layer, and each wait costs a time slice when another process holds a core).
 *
 * A slice is multiplied by the quantized library's one-call entry point (chatloop_quant_linear, chatloop_kquant_linear,
 * chatloop_gguf_linear) on one thread: called from inside this region, its parallel region of one thread is run by
 * the calling thread alone. That library is built for several CPUs and picks its path at run time (its functions
 * are passed in, as layers.c takes them); each row of a slice is computed as QuantLinear computes it, each slice's
 * activations quantized by the same code. This file has no SIMD of its own and is built without -march=native.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

/* The quantized library's one-call entry points; kquant's takes int16 bsums where the others take xs. */
typedef void (*linear_fn)(const float* x, const uint8_t* w, const float* bias, float* y, int64_t B, int64_t O,
                          int64_t I, int fmt, int isa, int num_threads, int8_t* xq, float* xd, void* xs);

/* A format as layers.c numbers it: FAMILY * family + its number in that family's kernel (0: qgemv.c, 1: kquant.c,
 * 2: ggufgemv.c; chatloop/kernels/__init__.py: fused_format). */
#define FAMILY 100
#define SLICE 16

typedef struct {
  linear_fn linear[3]; /* by family */
  int64_t isa;
} chatloop_moe_kernels;

static int64_t aligned(int64_t bytes) { return (bytes + 63) / 64 * 64; }

/* Per thread: the quantized activations of a slice's rows (int8 values, two floats a block of 32: Q8_K's one float a
 * 256 and int16 sum a 16 fit there too) and a slice's output before it is spread into its rows. */
static int64_t thread_bytes(int64_t M, int64_t C, int64_t F) {
  const int64_t in = C > F ? C : F, out = C > 2 * F ? C : 2 * F;
  return aligned(M * in) + 2 * aligned(4 * (M * in / 32 + 1)) + aligned(4 * M * out);
}

/* Bytes of scratch for P (row, expert) pairs, experts of up to M rows, hidden size C, expert width F, T threads. */
int64_t chatloop_moe_scratch(int64_t P, int64_t M, int64_t C, int64_t F, int64_t T) {
  return aligned(4 * P * C) + aligned(8 * P * F) + aligned(4 * P * F) + aligned(4 * P * C) +
         T * thread_bytes(M, C, F) + 64;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* This thread's share of the n experts' O-row matrices w[e] (row_bytes a row) against their inputs in[e] (counts[e]
 * rows of I, at pair offset first[e]): y [pairs, O] at the same offsets. The experts' rows are one list of slices of
 * SLICE rows (single rows where O is not a multiple of SLICE, which no tiled format allows), cut evenly among the
 * threads; a thread multiplies each run of slices of one expert in one call. */
static void project(const uint8_t* const* w, const float* const* in, const int64_t* counts, const int64_t* first,
                    int64_t n, int64_t O, int64_t I, int64_t row_bytes, float* y, linear_fn linear, int fmt,
                    int isa, uint8_t* mine, int64_t M) {
  const int64_t step = O % SLICE ? 1 : SLICE, per = O / step, total = n * per;
  const int t = omp_get_thread_num(), T = omp_get_num_threads();
  const int64_t lo = total * t / T, hi = total * (t + 1) / T, in_max = I;
  int8_t* xq = (int8_t*)mine;
  float* xd = (float*)(mine + aligned(M * in_max));
  float* xs = (float*)(mine + aligned(M * in_max) + aligned(4 * (M * in_max / 32 + 1)));
  float* part = (float*)(mine + aligned(M * in_max) + 2 * aligned(4 * (M * in_max / 32 + 1)));
  for (int64_t s = lo; s < hi;) {
    const int64_t e = s / per, o0 = s % per * step;
    const int64_t end = hi < (e + 1) * per ? hi : (e + 1) * per, rows = (end - s) * step, B = counts[e];
    float* out = y + first[e] * O;
    if (B == 1) {
      linear(in[e], w[e] + o0 * row_bytes, NULL, out + o0, 1, rows, I, fmt, isa, 1, xq, xd, xs);
    } else { /* a slice's rows are [B, rows]: spread them into [B, O] */
      linear(in[e], w[e] + o0 * row_bytes, NULL, part, B, rows, I, fmt, isa, 1, xq, xd, xs);
      for (int64_t b = 0; b < B; ++b) memcpy(out + b * O + o0, part + b * rows, rows * sizeof(float));
    }
    s = end;
  }
}

/* out [N, C] += for each of the n experts e (ascending), for each of its counts[e] pairs p (row rows[p], grouped by
 * expert): weights[p] * down_e(SiLU(gate_e(x[row])) * up_e(x[row])). gate_up[e] is the expert's gate and up
 * projections merged ([2F, C]: gate rows first), down[e] its down projection ([C, F]), in formats gate_up_format and
 * down_format, of gate_up_row_bytes and down_row_bytes a row; no expert has more than max_rows rows; scratch:
 * chatloop_moe_scratch(sum counts, max_rows, C, F, the region's threads) bytes. Called by every thread of a parallel
 * region (layers.c's one-call decode step calls it so, between its attention and the next layer): the work is
 * shared, and all threads wait at its end. */
void chatloop_moe_experts_shared(const float* x, float* out, int64_t C, int64_t F, int64_t n,
                                 const uint8_t* const* gate_up, const uint8_t* const* down, int64_t gate_up_format,
                                 int64_t down_format, int64_t gate_up_row_bytes, int64_t down_row_bytes,
                                 const int64_t* counts, const int64_t* rows, const float* weights, int64_t max_rows,
                                 const chatloop_moe_kernels* k, uint8_t* scratch) {
  int64_t P = 0;
  for (int64_t e = 0; e < n; ++e) P += counts[e];
  const int64_t M = max_rows;
  uint8_t* p = (uint8_t*)(((uintptr_t)scratch + 63) / 64 * 64);
  float* xg = (float*)p;
  float* h = (float*)(p += aligned(4 * P * C));
  float* a = (float*)(p += aligned(8 * P * F));
  float* y = (float*)(p += aligned(4 * P * F));
  uint8_t* threads = p + aligned(4 * P * C);
  int64_t first[n]; /* each thread its own copy of these few pointers */
  const float* up_in[n];
  const float* down_in[n];
  for (int64_t e = 0, at = 0; e < n; at += counts[e], ++e) {
    first[e] = at;
    up_in[e] = counts[e] == 1 ? x + rows[at] * C : xg + at * C; /* one row: read in place */
    down_in[e] = a + at * F;
  }
  const linear_fn up_fn = k->linear[gate_up_format / FAMILY], down_fn = k->linear[down_format / FAMILY];
  const int up_fmt = (int)(gate_up_format % FAMILY), down_fmt = (int)(down_format % FAMILY), isa = (int)k->isa;
  uint8_t* mine = threads + omp_get_thread_num() * thread_bytes(M, C, F);
  if (M > 1) {
#pragma omp for schedule(static)
    for (int64_t q = 0; q < P; ++q) memcpy(xg + q * C, x + rows[q] * C, C * sizeof(float));
  }
  project(gate_up, up_in, counts, first, n, 2 * F, C, gate_up_row_bytes, h, up_fn, up_fmt, isa, mine, M);
#pragma omp barrier
#pragma omp for schedule(static)
  for (int64_t i = 0; i < P * F; ++i) {
    const int64_t q = i / F, f = i % F;
    a[i] = silu(h[q * 2 * F + f]) * h[q * 2 * F + F + f];
  }
  project(down, down_in, counts, first, n, C, F, down_row_bytes, y, down_fn, down_fmt, isa, mine, M);
#pragma omp barrier
  /* Each thread its own columns, every pair of them, experts in order: no two threads write one element. */
#pragma omp for schedule(static)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t q = 0; q < P; ++q) {
      const float weighted = y[q * C + c] * weights[q];
      out[rows[q] * C + c] = out[rows[q] * C + c] + weighted;
    }
}

/* chatloop_moe_experts_shared in a parallel region of num_threads threads of its own. */
void chatloop_moe_experts(const float* x, float* out, int64_t C, int64_t F, int64_t n, const uint8_t* const* gate_up,
                          const uint8_t* const* down, int64_t gate_up_format, int64_t down_format,
                          int64_t gate_up_row_bytes, int64_t down_row_bytes, const int64_t* counts,
                          const int64_t* rows, const float* weights, int64_t max_rows, const chatloop_moe_kernels* k,
                          int num_threads, uint8_t* scratch) {
#pragma omp parallel num_threads(num_threads)
  chatloop_moe_experts_shared(x, out, C, F, n, gate_up, down, gate_up_format, down_format, gate_up_row_bytes,
                              down_row_bytes, counts, rows, weights, max_rows, k, scratch);
}
