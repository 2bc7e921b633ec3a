/* Decode attention straight from the paged KV cache, for CPU workers.
 *
 * One query token per request. Each (request, KV head) task reads that head's K and V runs
 * once, block by block through the block table, for all query heads of its GQA group: scores,
 * softmax in fp32, the weighted sum of V. No gathered copy of the context is made, so the KV
 * crosses the memory bus once instead of three times (gather read, gather write, matmul read).
 *
 * Layouts (contiguous, as workers/attention.py holds them):
 *   q, out          [B, H, D]
 *   k_cache/v_cache [num_blocks, Hkv, block_size, D]
 *   block_tables    [B, max_blocks] int64;  kv_lens [B] int64 (this step's token included)
 * window > 0 keeps the keys t with t > kv_len - 1 - window (HF sliding window).
 *
 * Built by workers/native.py with -fopenmp; the threads are torch's own OpenMP team.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

/* glibc's libmvec has vector expf; math.h only announces it under -ffast-math, which would
 * also set flush-to-zero for the whole process when this library loads. Announce it here. */
#pragma omp declare simd notinbranch
extern float expf(float);

#define MAX_GROUP 16
#define MAX_DIM 256

/* One (request, KV head). Inlined per head_dim so that D is a constant for the compiler. */
static inline __attribute__((always_inline)) void attend(
    const float *restrict q, const float *restrict k_cache, const float *restrict v_cache,
    const int64_t *restrict table, int64_t start, int64_t len, int64_t kh, int64_t Hkv,
    int64_t block_size, const int64_t D, const int64_t group, float scale, float *restrict scores,
    float *restrict out) {
    const int64_t n = len - start;
    const int64_t run = Hkv * block_size * D; /* from one block to the next, same head */

    for (int64_t t = start; t < len;) { /* scores, one block run at a time */
        const int64_t blk = t / block_size, stop = (blk + 1) * block_size < len
                                                       ? (blk + 1) * block_size : len;
        const float *k = k_cache + table[blk] * run + (kh * block_size + t % block_size) * D;
        /* the next run is elsewhere in memory: fetch it while this one computes */
        const float *next = stop < len ? k_cache + table[blk + 1] * run + kh * block_size * D
                                       : k;
        for (; t < stop; t++, k += D, next += D) {
            for (int64_t line = 0; line < D; line += 16) __builtin_prefetch(next + line);
            for (int64_t g = 0; g < group; g++) {
                const float *qg = q + g * D;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < D; d++) s += qg[d] * k[d];
                scores[g * n + (t - start)] = s * scale;
            }
        }
    }

    float inv[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * n;
        float m = sg[0];
        for (int64_t i = 1; i < n; i++) m = sg[i] > m ? sg[i] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; i++) {
            sg[i] = expf(sg[i] - m);
            sum += sg[i];
        }
        inv[g] = 1.0f / sum;
    }

    float acc[MAX_GROUP * MAX_DIM];
    for (int64_t i = 0; i < group * D; i++) acc[i] = 0.0f;
    for (int64_t t = start; t < len;) {
        const int64_t blk = t / block_size, stop = (blk + 1) * block_size < len
                                                       ? (blk + 1) * block_size : len;
        const float *v = v_cache + table[blk] * run + (kh * block_size + t % block_size) * D;
        const float *next = stop < len ? v_cache + table[blk + 1] * run + kh * block_size * D
                                       : v;
        for (; t < stop; t++, v += D, next += D) {
            for (int64_t line = 0; line < D; line += 16) __builtin_prefetch(next + line);
            for (int64_t g = 0; g < group; g++) {
                const float p = scores[g * n + (t - start)];
                float *ag = acc + g * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ag[d] += p * v[d];
            }
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < D; d++) out[g * D + d] = acc[g * D + d] * inv[g];
}

/* Returns 0, or -1 when group or head_dim exceed the stack buffers (nothing is written). */
int zomni_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                           const int64_t *block_tables, const int64_t *kv_lens, float *out,
                           int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t block_size,
                           int64_t max_blocks, float scale, int64_t window) {
    const int64_t group = H / Hkv;
    if (group > MAX_GROUP || D > MAX_DIM) return -1;
    int64_t max_len = 1;
    for (int64_t b = 0; b < B; b++)
        if (kv_lens[b] > max_len) max_len = kv_lens[b];

#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * group * max_len);
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t kh = 0; kh < Hkv; kh++) {
                const int64_t len = kv_lens[b];
                const int64_t start = (window > 0 && len > window) ? len - window : 0;
                const float *qh = q + (b * H + kh * group) * D;
                float *oh = out + (b * H + kh * group) * D;
                const int64_t *table = block_tables + b * max_blocks;
                /* constant shapes let the compiler keep q and the accumulators in registers */
#define ATTEND(DIM, GROUP) attend(qh, k_cache, v_cache, table, start, len, kh, Hkv, \
                                  block_size, DIM, GROUP, scale, scores, oh)
                if (D == 64 && group == 1) ATTEND(64, 1);
                else if (D == 64 && group == 2) ATTEND(64, 2);
                else if (D == 64 && group == 4) ATTEND(64, 4);
                else if (D == 128 && group == 1) ATTEND(128, 1);
                else if (D == 128 && group == 2) ATTEND(128, 2);
                else if (D == 128 && group == 4) ATTEND(128, 4);
                else ATTEND(D, group);
#undef ATTEND
            }
        }
        free(scores);
    }
    return 0;
}
