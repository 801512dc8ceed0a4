/* Small row operations of a decode step, each one call instead of several torch ops (a batch-1 decode step of a
 * 30-layer model spends more time between its matmuls than in them): RMSNorm, and rotary embeddings applied in
 * place to the query and key columns of a fused q/k/v projection's output. float32; built with -march=native.
 */
#include <math.h>
#include <stdint.h>

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows of dim floats; the sum of squares in double. */
void chatloop_rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    double squares = 0.0;
    for (int64_t i = 0; i < dim; ++i) squares += (double)xr[i] * xr[i];
    const float scale = (float)(1.0 / sqrt(squares / (double)dim + (double)eps));
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * scale * w[i];
  }
}

/* Rotary embeddings, half-split layout, in place: for each of `rows` rows (stride `row_stride` floats) the first
 * `heads` vectors of head_dim floats from `offset` on: x' = x * cos + rotate_half(x) * signed_sin, where
 * rotate_half swaps the halves and signed_sin is sin with its first half negated (cos, sin: [rows, head_dim]). */
void chatloop_rope(float* x, const float* cos, const float* signed_sin, int64_t rows, int64_t row_stride,
                   int64_t offset, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * head_dim;
    const float* s = signed_sin + r * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + r * row_stride + offset + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] + b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}
