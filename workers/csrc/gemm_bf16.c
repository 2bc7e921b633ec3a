/* Linears for CPU workers in bf16: y = x W^T (+ bias), then an epilogue, on AVX512-BF16.
 *
 * The fp32 kernel's plan (gemm.c) with bf16 operands: W [N, K] is repacked once at load into
 * panels of 16 output columns holding pairs of consecutive k, [ceil(N/16)][ceil(K/2)][16][2]
 * (zero past N and K), and one vdpbf16ps multiplies a broadcast pair of x by a pair of W for
 * 16 columns at once, accumulating in fp32: 32 multiply-adds an instruction, twice fp32's. A
 * tile keeps MR x 48 sums of y in registers while k runs over the whole of K; bias and the
 * epilogue are applied to the fp32 sums, which are rounded to bf16 (to nearest even) once, when
 * stored. Against oneDNN's prepacked bf16 kernel, all linears of a Qwen3-0.6B-shaped forward
 * with cold weights: see workers/cpu_gemm.py.
 *
 *   zomni_gemm_pack_bf16  W [N, K] -> panels
 *   zomni_gemm_bf16       x [M, K] (row stride ldx), panels, bias [N] or NULL -> y [M, N] (row
 *                         stride ldy), then epilogue: 0 none, 1 SiLU, 2 y *= other,
 *                         3 y += other (other [M, N], row stride ldo); all bf16
 * Both return -1 without AVX512-BF16 (nothing written), 0 otherwise; zomni_gemm_bf16_available
 * says which ahead of time.
 *
 * Built by workers/native.py; the threads are torch's own OpenMP team.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define NR 16          /* columns per panel */
#define AHEAD 2048     /* prefetch distance in bf16 elements: 4 KB down the panel, into L2 */
#define ROW_BLOCK 64   /* rows per work item */

enum { EPI_NONE, EPI_SILU, EPI_MUL, EPI_ADD };

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#pragma omp declare simd notinbranch
extern float expf(float);

int zomni_gemm_bf16_available(void) { return 1; }

int zomni_gemm_pack_bf16(const uint16_t *restrict w, int64_t N, int64_t K,
                         uint16_t *restrict out) {
    const int64_t panels = (N + NR - 1) / NR, pairs = (K + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t kp = 0; kp < pairs; kp++)
            for (int64_t j = 0; j < NR; j++)
                for (int64_t e = 0; e < 2; e++) {
                    const int64_t n = p * NR + j, k = 2 * kp + e;
                    out[((p * pairs + kp) * NR + j) * 2 + e] = n < N && k < K ? w[n * K + k] : 0;
                }
    return 0;
}

typedef struct {
    const uint16_t *x, *panels, *bias, *other;
    uint16_t *y;
    int64_t ldx, ldy, ldo, N, K;
    int epilogue;
} Gemm;

static inline float widen(uint16_t h) {
    const union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* x[2kp], x[2kp + 1] as one 32-bit lane; `last` is the second past an odd K, 0 */
static inline __attribute__((always_inline)) int32_t pair(const uint16_t *x, int64_t kp,
                                                          const int last) {
    if (last) return x[2 * kp];
    int32_t v;
    memcpy(&v, x + 2 * kp, 4);
    return v;
}

/* Bias, epilogue and rounding of an MR x cols block of fp32 sums `t` (row stride 48) into y. */
static void finish(const Gemm *g, const float *t, int64_t m0, int64_t rows, int64_t c0,
                   int64_t cols) {
    for (int64_t m = 0; m < rows; m++) {
        float v[3 * NR];
        const uint16_t *o = g->other ? g->other + (m0 + m) * g->ldo + c0 : 0;
        const uint16_t *b = g->bias ? g->bias + c0 : 0;
#pragma omp simd
        for (int64_t j = 0; j < cols; j++) v[j] = t[m * 3 * NR + j] + (b ? widen(b[j]) : 0.0f);
        switch (g->epilogue) {
        case EPI_SILU:
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) v[j] = v[j] / (1.0f + expf(-v[j]));
            break;
        case EPI_MUL:
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) v[j] *= widen(o[j]);
            break;
        case EPI_ADD:
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) v[j] += widen(o[j]);
            break;
        }
        uint16_t *y = g->y + (m0 + m) * g->ldy + c0;
        for (int64_t j = 0; j < cols; j += NR) {
            const __mmask16 lanes = cols - j >= NR ? 0xFFFF : (__mmask16)((1u << (cols - j)) - 1);
            const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, v + j));
            _mm256_mask_storeu_epi16(y + j, lanes, (__m256i)h);
        }
    }
}

/* tile_MR_NP: rows [m0, m0 + MR) x panels [p, p + NP), `cols` of them valid (tail panel). */
#define UNROLL _Pragma("GCC unroll 16")
#define TILE(MR, NP)                                                                           \
    static void tile_##MR##_##NP(const Gemm *g, int64_t m0, int64_t p, int64_t cols) {        \
        const int64_t K = g->K, pairs = (K + 1) / 2;                                          \
        const uint16_t *restrict x = g->x + m0 * g->ldx;                                      \
        const uint16_t *restrict w = g->panels + p * pairs * 2 * NR;                          \
        __m512 acc[MR][NP];                                                                   \
        UNROLL for (int m = 0; m < MR; m++) UNROLL for (int q = 0; q < NP; q++)               \
            acc[m][q] = _mm512_setzero_ps();                                                  \
        for (int64_t kp = 0; kp < pairs; kp++) {                                              \
            const int last = K % 2 && kp == pairs - 1;                                        \
            __m512bh wv[NP];                                                                  \
            UNROLL for (int q = 0; q < NP; q++) {                                             \
                const uint16_t *wq = w + (q * pairs + kp) * 2 * NR;                           \
                wv[q] = (__m512bh)_mm512_loadu_si512(wq);                                     \
                _mm_prefetch((const char *)(wq + AHEAD), _MM_HINT_T1);                        \
            }                                                                                 \
            UNROLL for (int m = 0; m < MR; m++) {                                             \
                const __m512bh xb = (__m512bh)_mm512_set1_epi32(                              \
                    last ? pair(x + m * g->ldx, kp, 1) : pair(x + m * g->ldx, kp, 0));        \
                UNROLL for (int q = 0; q < NP; q++)                                           \
                    acc[m][q] = _mm512_dpbf16_ps(acc[m][q], xb, wv[q]);                       \
            }                                                                                 \
        }                                                                                     \
        float t[MR * 3 * NR];                                                                 \
        UNROLL for (int m = 0; m < MR; m++) UNROLL for (int q = 0; q < NP; q++)               \
            _mm512_storeu_ps(t + m * 3 * NR + q * NR, acc[m][q]);                             \
        finish(g, t, m0, MR, p * NR, cols);                                                   \
    }
TILE(8, 3) TILE(4, 3) TILE(2, 3) TILE(1, 3)
TILE(8, 2) TILE(4, 2) TILE(2, 2) TILE(1, 2)
TILE(8, 1) TILE(4, 1) TILE(2, 1) TILE(1, 1)
#undef TILE

#define ROWS(MR)                                                                        \
    static void rows_##MR(const Gemm *g, int64_t m, int64_t p, int64_t np, int64_t cols) { \
        if (np == 3) tile_##MR##_3(g, m, p, cols);                                       \
        else if (np == 2) tile_##MR##_2(g, m, p, cols);                                  \
        else tile_##MR##_1(g, m, p, cols);                                               \
    }
ROWS(8) ROWS(4) ROWS(2) ROWS(1)
#undef ROWS

int zomni_gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *panels,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, const uint16_t *other,
                    int64_t ldo, int64_t M, int64_t N, int64_t K, int epilogue) {
    const Gemm g = {x, panels, bias, other, y, ldx, ldy, ldo, N, K, epilogue};
    const int64_t panels_n = (N + NR - 1) / NR, groups = (panels_n + 2) / 3;
    const int64_t blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < groups * blocks; item++) {
        const int64_t p = item / blocks * 3, np = panels_n - p < 3 ? panels_n - p : 3;
        const int64_t cols = N - p * NR < np * NR ? N - p * NR : np * NR;
        const int64_t end = (item % blocks + 1) * ROW_BLOCK < M ? (item % blocks + 1) * ROW_BLOCK
                                                                 : M;
        int64_t m = item % blocks * ROW_BLOCK;
        for (; m + 8 <= end; m += 8) rows_8(&g, m, p, np, cols);
        if (end - m >= 4) rows_4(&g, m, p, np, cols), m += 4;
        if (end - m >= 2) rows_2(&g, m, p, np, cols), m += 2;
        if (end - m >= 1) rows_1(&g, m, p, np, cols);
    }
    return 0;
}

#else /* no AVX512-BF16: callers keep oneDNN */

int zomni_gemm_bf16_available(void) { return 0; }

int zomni_gemm_pack_bf16(const uint16_t *w, int64_t N, int64_t K, uint16_t *out) { return -1; }

int zomni_gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *panels,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, const uint16_t *other,
                    int64_t ldo, int64_t M, int64_t N, int64_t K, int epilogue) {
    return -1;
}

#endif
