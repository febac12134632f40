/* A whole Llama-style decoder layer in one call, for the CPU stored-precision path: what
 * models/llama.py LlamaDecoderLayer.forward does through ~10 Python calls a layer, here strung
 * together in C with no Python in between. It calls the same per-ISA kernels in the same order on
 * the same data (qlinear.c, layer_ops.c), so its results are those of the per-op path, bit for bit:
 *
 *     first layer:  res = x;       x = rms_norm(res)            else: res += x; x = rms_norm(res)
 *     qkv = x @ Wqkv (+ b);  rope(q, k);  write k, v to the paged cache;  a = attention(q)
 *     x = a @ Wo (+ b);  res += x;  x = rms_norm(res)
 *     x = act(x @ Wgate) * (x @ Wup) @ Wdown (+ b)
 *
 * x and res [t][hidden] (contiguous rows) are updated in place; the intermediates live in the
 * calling thread's scratch slots 4-7. Compiled once per instruction set (TM_ISA).
 */
#include <stdlib.h>
#include <string.h>

#include "tm_cpu.h"

/* y [t][ldy] = x [t][ldx] @ W.T (+ bias), one qlinear call per run of columns. */
static void linear(const tm_linear *l, const float *x, int64_t ldx, int64_t t, float *y, int64_t ldy, int nthreads) {
    for (int64_t i = 0; i < l->count; i++) {
        const int64_t start = l->start[i];
        TM_FN(tm_qlinear)(l->w[i], x, ldx, t, y + start, ldy, l->bias != NULL ? l->bias + start : NULL, nthreads);
    }
}

static float *scratch_floats(int64_t count, int slot) {
    float *p = (float *)tm_scratch(sizeof(float) * (size_t)(count > 0 ? count : 1), slot);
    if (p == NULL) abort();
    return p;
}

/* One decoder layer over the step's t tokens. kv_cache: the layer's [2][blocks][block_size][kvh][d]
 * float32 cache, its values kv_stride floats after its keys. first: res is not yet the residual
 * stream (the first layer), so it takes x before the input norm. */
void TM_FN(tm_decoder_layer)(const tm_layer *L, const tm_step *s, float *x, float *res, int64_t first,
                             float *kv_cache, int64_t kv_stride) {
    const int64_t t = s->ntokens, hidden = L->hidden, d = L->head_dim, inter = L->inter;
    const int64_t qd = L->heads * d, kvd = L->kv_heads * d, nqkv = qd + 2 * kvd;
    const int nthreads = (int)s->nthreads;
    if (t <= 0) return;

    if (first) {
        memcpy(res, x, sizeof(float) * (size_t)(t * hidden));
        TM_FN(tm_rms_norm)(res, hidden, x, hidden, L->input_norm, t, hidden, L->eps, L->norm_offset, nthreads);
    } else {
        TM_FN(tm_add_rms_norm)(x, hidden, res, hidden, L->input_norm, t, hidden, L->eps, L->norm_offset, nthreads);
    }

    /* attention block: q | k | v in one buffer, rotated in place, then over the paged cache */
    float *qkv = scratch_floats(t * nqkv, 4);
    linear(&L->qkv, x, hidden, t, qkv, nqkv, nthreads);
    float *q = qkv, *k = qkv + qd, *v = qkv + qd + kvd;
    TM_FN(tm_rope)(q, nqkv, k, nqkv, s->positions, s->pos64, s->cos_sin, s->ldcs, t, L->heads, L->kv_heads, d,
                   nthreads);
    float *attn = scratch_floats(t * qd, 5);
    TM_FN(tm_paged_attention)(q, nqkv, k, nqkv, v, nqkv, kv_cache, kv_cache + kv_stride, s->slots, s->seq_lens,
                              s->query_start, s->block_tables, s->bt_stride, s->nseqs, t, L->heads, L->kv_heads, d,
                              s->block_size, L->scale, L->window, attn, qd, nthreads);
    linear(&L->o, attn, qd, t, x, hidden, nthreads);  /* the normed input is no longer needed */
    TM_FN(tm_add_rms_norm)(x, hidden, res, hidden, L->post_norm, t, hidden, L->eps, L->norm_offset, nthreads);

    /* gated MLP */
    float *gate_up = scratch_floats(t * 2 * inter, 6);
    linear(&L->gate_up, x, hidden, t, gate_up, 2 * inter, nthreads);
    float *act = scratch_floats(t * inter, 7);
    if (L->act == 1) TM_FN(tm_gelu_tanh_mul)(gate_up, 2 * inter, act, inter, t, inter, nthreads);
    else TM_FN(tm_silu_mul)(gate_up, 2 * inter, act, inter, t, inter, nthreads);
    linear(&L->down, act, inter, t, x, hidden, nthreads);
}
