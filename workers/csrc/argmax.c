/* Row-wise argmax of fp32 logits, for the sampler's greedy rows.
 *
 * torch's CPU argmax reads ~2.4 G floats/s on one thread: 1 ms a decode step for 16 rows of a
 * 151936-token vocabulary, as long as the steps' attention in one layer. Here the rows are
 * shared out over the threads and scanned 16 lanes at a time.
 *
 *   zomni_argmax_f32   x [rows, cols] (row stride ld) -> out [rows]: the first index of each
 *                      row's maximum; a row holding NaN gives its first NaN, as torch does.
 *
 * Returns -1 without AVX-512 (nothing written), 0 otherwise. Built by workers/native.py.
 */
#include <math.h>
#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>

static int64_t row_argmax(const float *x, int64_t cols) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i best_at = _mm512_setzero_si512(), at = _mm512_set_epi32(
        15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (int64_t j = 0; j < cols; j += 16) {
        const __mmask16 valid = cols - j >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - j)) - 1);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, x + j);
        const __mmask16 better = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_mask_mov_ps(best, better, v);
        best_at = _mm512_mask_mov_epi32(best_at, better, at);
        at = _mm512_add_epi32(at, step);
    }
    if (nan) {
        for (int64_t j = 0; j < cols; j++)
            if (isnan(x[j])) return j;
    }
    /* lanes hold the first index of their maximum: the row's is the lowest among the best */
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    return _mm512_mask_reduce_min_epi32(tops, best_at);
}

int zomni_argmax_f32(const float *x, int64_t rows, int64_t cols, int64_t ld, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) out[r] = row_argmax(x + r * ld, cols);
    return 0;
}

#else

int zomni_argmax_f32(const float *x, int64_t rows, int64_t cols, int64_t ld, int64_t *out) {
    return -1;
}

#endif
