/* The small per-layer ops between the matmuls, for CPU workers in fp32 or bf16.
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
 * Each has a _bf16 twin over bf16 tensors (see below for where it rounds).
 *
 * Layouts (fp32 or bf16, contiguous rows):
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

/* bf16: the same passes, rounding where HF's bf16 modules round. RMSNorm normalises in fp32,
 * rounds, then multiplies by the weight in bf16: out = bf16(w * bf16(x * r)). RoPE rounds each
 * product and the sum: bf16(bf16(x * cos) + bf16(x' * ssin)), with bf16 tables. */
static inline float widen(uint16_t h) {
    const union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static inline uint16_t narrow(float f) { /* to nearest, ties to even */
    const union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return widen(narrow(f)); }

/* Whole-array conversions, for decoder_layer.c's bf16 layer around its fp32 attention. */
void zomni_bf16_to_f32(const uint16_t *restrict x, float *restrict out, int64_t n) {
#pragma omp parallel for simd if (n >= 16 * PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = widen(x[i]);
}

void zomni_f32_to_bf16(const float *restrict x, uint16_t *restrict out, int64_t n) {
#pragma omp parallel for simd if (n >= 16 * PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = narrow(x[i]);
}

static inline float inv_rms_bf16(const uint16_t *restrict x, int64_t dim, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; i++) sum += widen(x[i]) * widen(x[i]);
    return 1.0f / sqrtf(sum / (float)dim + eps);
}

void zomni_rms_norm_bf16(const uint16_t *restrict x, const uint16_t *restrict w,
                         uint16_t *restrict out, int64_t rows, int64_t dim, int64_t x_stride,
                         float eps) {
#pragma omp parallel for if (rows * dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *xt = x + t * x_stride;
        uint16_t *ot = out + t * dim;
        const float r = inv_rms_bf16(xt, dim, eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) ot[i] = narrow(widen(w[i]) * round_bf16(widen(xt[i]) * r));
    }
}

static inline void norm_rope_bf16(const uint16_t *restrict x, const uint16_t *restrict norm_w,
                                  float eps, const uint16_t *restrict cos,
                                  const uint16_t *restrict ssin, int64_t D,
                                  uint16_t *restrict out) {
    float src[MAX_DIM];
    const float r = norm_w ? inv_rms_bf16(x, D, eps) : 1.0f;
#pragma omp simd
    for (int64_t i = 0; i < D; i++)
        src[i] = norm_w ? round_bf16(widen(norm_w[i]) * round_bf16(widen(x[i]) * r)) : widen(x[i]);
    const int64_t half = D / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; i++)
        out[i] = narrow(round_bf16(src[i] * widen(cos[i])) +
                        round_bf16(src[i + half] * widen(ssin[i])));
#pragma omp simd
    for (int64_t i = half; i < D; i++)
        out[i] = narrow(round_bf16(src[i] * widen(cos[i])) +
                        round_bf16(src[i - half] * widen(ssin[i])));
}

int zomni_qkv_rope_cache_bf16(const uint16_t *restrict qkv, int64_t qkv_stride, int64_t T,
                              int64_t H, int64_t Hkv, int64_t D, const uint16_t *restrict cos,
                              const uint16_t *restrict ssin, const uint16_t *restrict q_norm_w,
                              const uint16_t *restrict k_norm_w, float eps,
                              const int64_t *restrict rows, uint16_t *restrict k_cache,
                              uint16_t *restrict v_cache, uint16_t *restrict q_out) {
    if (D > MAX_DIM || D % 2) return -1;
#pragma omp parallel for if (T * (H + 2 * Hkv) * D >= PARALLEL_MIN)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *x = qkv + t * qkv_stride;
        const uint16_t *ct = cos + t * D, *st = ssin + t * D;
        for (int64_t h = 0; h < H; h++)
            norm_rope_bf16(x + h * D, q_norm_w, eps, ct, st, D, q_out + (t * H + h) * D);
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t row = rows[t * Hkv + h];
            norm_rope_bf16(x + (H + h) * D, k_norm_w, eps, ct, st, D, k_cache + row * D);
            memcpy(v_cache + row * D, x + (H + Hkv + h) * D, sizeof(uint16_t) * D);
        }
    }
    return 0;
}
