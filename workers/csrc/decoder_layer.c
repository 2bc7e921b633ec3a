/* One decoder layer (workers/models/decoder.py) in one call, fp32 or bf16 on the CPU,
 * tensor-parallel size 1: the same kernels the Python path calls one at a time, in the same
 * order, into a workspace that lives across steps. Results are bit-identical to that path
 * (bf16 included: its attention runs in fp32 on a widened q, as the Python path's does).
 *
 * Between its nine kernels the Python path spends ~115 us a layer (`small` shape, 16 decode
 * rows) to ~245 us (Qwen3-0.6B shape) on module calls, checks, allocations and ctypes
 * conversions, and its fresh output tensors start cold in cache: 10% of a `small` decode step.
 *
 *   x ─ RMSNorm ─ qkv linear ─ q/k norm + RoPE, K/V into the cache ─ paged attention
 *     ─ o linear (+ x) = mid ─ RMSNorm ─ gate linear, SiLU ─ up linear (* gate) ─ down (+ mid)
 *
 * Built with gemm.c, layer_ops.c and paged_attention.c into one library by workers/native.py.
 */
#include <stddef.h>
#include <stdint.h>

int zomni_gemm_f32(const float *x, int64_t ldx, const float *panels, const float *bias,
                   float *y, int64_t ldy, const float *other, int64_t ldo, int64_t M, int64_t N,
                   int64_t K, int epilogue);
void zomni_rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t dim,
                        int64_t x_stride, float eps);
int zomni_qkv_rope_cache_f32(const float *qkv, int64_t qkv_stride, int64_t T, int64_t H,
                             int64_t Hkv, int64_t D, const float *cos, const float *ssin,
                             const float *q_norm_w, const float *k_norm_w, float eps,
                             const int64_t *rows, float *k_cache, float *v_cache, float *q_out);
int zomni_gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *panels,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, const uint16_t *other,
                    int64_t ldo, int64_t M, int64_t N, int64_t K, int epilogue);
void zomni_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows,
                         int64_t dim, int64_t x_stride, float eps);
int zomni_qkv_rope_cache_bf16(const uint16_t *qkv, int64_t qkv_stride, int64_t T, int64_t H,
                              int64_t Hkv, int64_t D, const uint16_t *cos, const uint16_t *ssin,
                              const uint16_t *q_norm_w, const uint16_t *k_norm_w, float eps,
                              const int64_t *rows, uint16_t *k_cache, uint16_t *v_cache,
                              uint16_t *q_out);
int zomni_paged_attention_bf16(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                               const int64_t *block_tables, const int64_t *table_of_row,
                               const int64_t *kv_lens, float *out, int64_t B, int64_t H,
                               int64_t Hkv, int64_t D, int64_t block_size, int64_t max_blocks,
                               float scale, int64_t window);
void zomni_bf16_to_f32(const uint16_t *x, float *out, int64_t n);
void zomni_f32_to_bf16(const float *x, uint16_t *out, int64_t n);
int zomni_paged_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                              const int64_t *block_tables, const int64_t *table_of_row,
                              const int64_t *kv_lens, float *out, int64_t B, int64_t H,
                              int64_t Hkv, int64_t D, int64_t block_size, int64_t max_blocks,
                              float scale, int64_t window);

enum { EPI_NONE, EPI_SILU, EPI_MUL, EPI_ADD };

/* Fixed for a layer once its weights are packed and its KV cache is set (layout mirrored by
 * native.DecoderLayerArgs). Linear weights are gemm.c (gemm_bf16.c) panels; biases and q/k
 * norms may be NULL. Pointers are to the layer's dtype. */
typedef struct {
    const void *input_norm, *post_norm, *q_norm, *k_norm;
    const void *qkv, *qkv_bias, *o, *o_bias, *gate, *gate_bias, *up, *up_bias, *down,
        *down_bias;
    void *k_cache, *v_cache;
    int64_t hidden, heads, kv_heads, head_dim, intermediate, window;
    float input_eps, post_eps, qk_eps, scale;
} Layer;

/* One step's inputs, shared by its layers, and the workspace (rows >= T), in the layers'
 * dtype except q32 and attn32, bf16 layers' fp32 attention input and output. */
typedef struct {
    int64_t T, block_size, max_blocks;
    const void *cos, *ssin;
    const int64_t *cache_rows, *block_tables, *token_request, *kv_lens;
    void *h, *qkv, *q, *attn, *mid, *gate, *act;
    float *q32, *attn32;
} Step;

/* x [T, hidden] -> out [T, hidden] (not x). Returns 0, or the first failing kernel's status. */
int zomni_decoder_layer_f32(const Layer *l, const Step *s, const float *x, float *out) {
    const int64_t T = s->T, H = l->hidden, I = l->intermediate, D = l->head_dim;
    const int64_t qkv_n = (l->heads + 2 * l->kv_heads) * D, attn_n = l->heads * D;
    int status;
    zomni_rms_norm_f32(x, l->input_norm, s->h, T, H, H, l->input_eps);
    if ((status = zomni_gemm_f32(s->h, H, l->qkv, l->qkv_bias, s->qkv, qkv_n, NULL, 0, T, qkv_n,
                                 H, EPI_NONE)))
        return status;
    if ((status = zomni_qkv_rope_cache_f32(s->qkv, qkv_n, T, l->heads, l->kv_heads, D, s->cos,
                                           s->ssin, l->q_norm, l->k_norm, l->qk_eps,
                                           s->cache_rows, l->k_cache, l->v_cache, s->q)))
        return status;
    if ((status = zomni_paged_attention_f32(s->q, l->k_cache, l->v_cache, s->block_tables,
                                            s->token_request, s->kv_lens, s->attn, T, l->heads,
                                            l->kv_heads, D, s->block_size, s->max_blocks,
                                            l->scale, l->window)))
        return status;
    if ((status = zomni_gemm_f32(s->attn, attn_n, l->o, l->o_bias, s->mid, H, x, H, T, H, attn_n,
                                 EPI_ADD)))
        return status;
    zomni_rms_norm_f32(s->mid, l->post_norm, s->h, T, H, H, l->post_eps);
    if ((status = zomni_gemm_f32(s->h, H, l->gate, l->gate_bias, s->gate, I, NULL, 0, T, I, H,
                                 EPI_SILU)))
        return status;
    if ((status = zomni_gemm_f32(s->h, H, l->up, l->up_bias, s->act, I, s->gate, I, T, I, H,
                                 EPI_MUL)))
        return status;
    return zomni_gemm_f32(s->act, I, l->down, l->down_bias, out, H, s->mid, H, T, H, I, EPI_ADD);
}

/* The same layer in bf16: q is widened for the fp32 attention, whose output is rounded back
 * (native.paged_attention's `q.float()` and `.to(q.dtype)`). */
int zomni_decoder_layer_bf16(const Layer *l, const Step *s, const uint16_t *x, uint16_t *out) {
    const int64_t T = s->T, H = l->hidden, I = l->intermediate, D = l->head_dim;
    const int64_t qkv_n = (l->heads + 2 * l->kv_heads) * D, attn_n = l->heads * D;
    int status;
    zomni_rms_norm_bf16(x, l->input_norm, s->h, T, H, H, l->input_eps);
    if ((status = zomni_gemm_bf16(s->h, H, l->qkv, l->qkv_bias, s->qkv, qkv_n, NULL, 0, T,
                                  qkv_n, H, EPI_NONE)))
        return status;
    if ((status = zomni_qkv_rope_cache_bf16(s->qkv, qkv_n, T, l->heads, l->kv_heads, D, s->cos,
                                            s->ssin, l->q_norm, l->k_norm, l->qk_eps,
                                            s->cache_rows, l->k_cache, l->v_cache, s->q)))
        return status;
    zomni_bf16_to_f32(s->q, s->q32, T * attn_n);
    if ((status = zomni_paged_attention_bf16(s->q32, l->k_cache, l->v_cache, s->block_tables,
                                             s->token_request, s->kv_lens, s->attn32, T,
                                             l->heads, l->kv_heads, D, s->block_size,
                                             s->max_blocks, l->scale, l->window)))
        return status;
    zomni_f32_to_bf16(s->attn32, s->attn, T * attn_n);
    if ((status = zomni_gemm_bf16(s->attn, attn_n, l->o, l->o_bias, s->mid, H, x, H, T, H,
                                  attn_n, EPI_ADD)))
        return status;
    zomni_rms_norm_bf16(s->mid, l->post_norm, s->h, T, H, H, l->post_eps);
    if ((status = zomni_gemm_bf16(s->h, H, l->gate, l->gate_bias, s->gate, I, NULL, 0, T, I, H,
                                  EPI_SILU)))
        return status;
    if ((status = zomni_gemm_bf16(s->h, H, l->up, l->up_bias, s->act, I, s->gate, I, T, I, H,
                                  EPI_MUL)))
        return status;
    return zomni_gemm_bf16(s->act, I, l->down, l->down_bias, out, H, s->mid, H, T, H, I, EPI_ADD);
}
