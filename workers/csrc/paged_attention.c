/* Attention straight from the paged KV cache, for CPU workers.
 *
 * One row per query token, decodes and prefill chunks alike: row b attends to the first
 * kv_lens[b] positions of its request (its own position + 1, so prefill rows are causal with no
 * masked work). Each (KV head, row) task reads that head's K and V runs once, block by block
 * through the block table, for all query heads of its GQA group: scores, softmax in fp32, the
 * weighted sum of V. No gathered copy of the context is made, so for decodes the KV crosses the
 * memory bus once instead of three times (gather read, gather write, matmul read); the rows of
 * a prefill chunk, taken head by head, find their request's K and V in L2.
 *
 * Layouts (contiguous, as workers/attention.py holds them):
 *   q, out          [B, H, D]
 *   k_cache/v_cache [num_blocks, Hkv, block_size, D]
 *   block_tables    [R, max_blocks] int64; row b reads table_of_row[b] (NULL: table b)
 *   kv_lens         [B] int64
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

#ifdef __AVX512F__
#include <immintrin.h>

/* q . k[t] for the 16 rows k[0..15] of one full block (D a multiple of 16): 16 vector
 * accumulators reduced together by a transpose-and-add tree, ~3 instructions a row instead of
 * a horizontal sum each. */
static inline __attribute__((always_inline)) __m512 dot16(const float *restrict k,
                                                          const float *restrict q,
                                                          const int64_t D) {
    __m512 a[16];
    for (int t = 0; t < 16; t++) {
        a[t] = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k + t * D));
        for (int64_t d = 16; d < D; d += 16)
            a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + t * D + d), a[t]);
    }
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++) /* lane: a2i.x, a2i+1.x, a2i.y, a2i+1.y */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* lane: rows 4i..4i+3, each summed over 4 of its columns */
        const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]),
                                              _mm512_castps_pd(b[2 * i + 1]));
        const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]),
                                              _mm512_castps_pd(b[2 * i + 1]));
        c[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    /* sum each c over its four 128-bit lanes; c[i]'s total lands in lane i */
    const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44),
                                     _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
    const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44),
                                     _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88),
                         _mm512_shuffle_f32x4(e01, e23, 0xDD));
}
#endif

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
#ifdef __AVX512F__
        if (block_size == 16 && D % 16 == 0 && stop - t == 16) { /* a whole block */
            for (int64_t line = 0; line < 16 * D; line += 16) __builtin_prefetch(next + line);
            const __m512 s = _mm512_set1_ps(scale);
            for (int64_t g = 0; g < group; g++)
                _mm512_storeu_ps(scores + g * n + (t - start),
                                 _mm512_mul_ps(dot16(k, q + g * D, D), s));
            t = stop;
            continue;
        }
#endif
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
int zomni_paged_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                              const int64_t *block_tables, const int64_t *table_of_row,
                              const int64_t *kv_lens, float *out, int64_t B, int64_t H,
                              int64_t Hkv, int64_t D, int64_t block_size, int64_t max_blocks,
                              float scale, int64_t window) {
    const int64_t group = H / Hkv;
    if (group > MAX_GROUP || D > MAX_DIM) return -1;
    int64_t max_len = 1;
    for (int64_t b = 0; b < B; b++)
        if (kv_lens[b] > max_len) max_len = kv_lens[b];

#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * group * max_len);
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t kh = 0; kh < Hkv; kh++) {
            for (int64_t b = 0; b < B; b++) {
                const int64_t len = kv_lens[b];
                const int64_t start = (window > 0 && len > window) ? len - window : 0;
                const float *qh = q + (b * H + kh * group) * D;
                float *oh = out + (b * H + kh * group) * D;
                const int64_t *table =
                    block_tables + (table_of_row ? table_of_row[b] : b) * max_blocks;
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
