/* The small per-layer ops between the matmuls, for CPU workers in fp32.
 *
 * In torch each is 3-8 ops over a [tokens, width] tensor, and at decode batch sizes every op
 * costs more in dispatch and thread wake-ups than in arithmetic: at batch 64 on the `small`
 * shape they took ~15% of a decode step. Here each is one pass over the rows.
 *
 *   zomni_rms_norm_f32      out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w         (HF RMSNorm)
 *   zomni_qkv_rope_cache_f32
 *       the fused qkv projection's output -> optional per-head RMSNorm of q and k (Qwen3),
 *       rotary embedding of q and k (rotate-half), q into q_out, k and v into the paged cache.
 *
 * Layouts (fp32, contiguous rows):
 *   qkv        [T, (H + 2 * Hkv) * D], row stride `qkv_stride` (q heads, k heads, v heads)
 *   cos, ssin  [T, D]: cos, and sin with its first half negated (see rotary_embedding.py):
 *              rope(x)[i] = x[i] * cos[i] + x[(i + D/2) % D] * ssin[i]
 *   rows       [T * Hkv]: row of the cache viewed as [num_rows, D] that (token t, kv head h)
 *              writes (AttentionMetadata.write_rows)
 *   q_out      [T, H, D]
 *
 * Built by workers/native.py; the threads are torch's own OpenMP team.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_DIM 512

/* Splitting rows over threads pays only past this many floats: a parallel region costs a few
 * microseconds of wake-ups, more than one pass over a small batch. */
#define PARALLEL_MIN 16384

static inline float inv_rms(const float *restrict x, int64_t dim, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; i++) sum += x[i] * x[i];
    return 1.0f / sqrtf(sum / (float)dim + eps);
}

void zomni_rms_norm_f32(const float *restrict x, const float *restrict w, float *restrict out,
                        int64_t rows, int64_t dim, int64_t x_stride, float eps) {
#pragma omp parallel for if (rows * dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < rows; t++) {
        const float *xt = x + t * x_stride;
        float *ot = out + t * dim;
        const float r = inv_rms(xt, dim, eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) ot[i] = xt[i] * r * w[i];
    }
}

/* One head: optional RMSNorm with `norm_w`, then the rotation, into `out`. */
static inline void norm_rope(const float *restrict x, const float *restrict norm_w, float eps,
                             const float *restrict cos, const float *restrict ssin,
                             int64_t D, float *restrict out) {
    float buf[MAX_DIM];
    const float *src = x;
    if (norm_w) {
        const float r = inv_rms(x, D, eps);
#pragma omp simd
        for (int64_t i = 0; i < D; i++) buf[i] = x[i] * r * norm_w[i];
        src = buf;
    }
    const int64_t half = D / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) out[i] = src[i] * cos[i] + src[i + half] * ssin[i];
#pragma omp simd
    for (int64_t i = half; i < D; i++) out[i] = src[i] * cos[i] + src[i - half] * ssin[i];
}

/* Returns 0, or -1 when D is odd or above MAX_DIM (nothing is written). */
int zomni_qkv_rope_cache_f32(const float *restrict qkv, int64_t qkv_stride, int64_t T,
                             int64_t H, int64_t Hkv, int64_t D, const float *restrict cos,
                             const float *restrict ssin, const float *restrict q_norm_w,
                             const float *restrict k_norm_w, float eps,
                             const int64_t *restrict rows, float *restrict k_cache,
                             float *restrict v_cache, float *restrict q_out) {
    if (D > MAX_DIM || D % 2) return -1;
#pragma omp parallel for if (T * (H + 2 * Hkv) * D >= PARALLEL_MIN)
    for (int64_t t = 0; t < T; t++) {
        const float *x = qkv + t * qkv_stride;
        const float *ct = cos + t * D, *st = ssin + t * D;
        for (int64_t h = 0; h < H; h++)
            norm_rope(x + h * D, q_norm_w, eps, ct, st, D, q_out + (t * H + h) * D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t row = rows[t * Hkv + h];
            norm_rope(x + (H + h) * D, k_norm_w, eps, ct, st, D, k_cache + row * D);
            memcpy(v_cache + row * D, x + (H + Hkv + h) * D, sizeof(float) * D);
        }
    }
    return 0;
}
