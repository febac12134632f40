/* tidemind CPU kernels: shared types and the layouts every kernel file agrees on.
 *
 * qlinear.c, layer_ops.c, attention.c and decoder_layer.c are compiled once per instruction set
 * (build.py passes -DTM_ISA=avx512_vnni, avx2 or scalar with the matching -m flags); TM_FN(name) gives each copy its own symbol, name_<isa>,
 * and Python picks one set at start-up. common.c is compiled once (feature probe, repacking,
 * embedding rows, scratch memory).
 *
 * Quantized weights (a linear layer of N outputs and K inputs), as GGUF stores them once decoded:
 *     w[n][k] = d[n][k / G] * q[n][k] + m[n][k / G]      q integer, d and m float, G = 16 or 32
 * repacked at load time into tiles of 16 output rows (N padded to a multiple of 16 with zero rows):
 *
 *   4-bit (0 <= q <= 15, G = 32): qs uint8 [N/16][K/32][4][16][4]
 *       tile t, block b, chunk c (0..3), lane r (row 16t + r), byte j (0..3):
 *           low nibble  = q[16t + r][32b + 4c + j]
 *           high nibble = q[16t + r][32b + 16 + 4c + j]
 *       256 bytes per tile and block: one 64-byte load feeds 16 rows x 4 inputs twice.
 *   8-bit (-128 <= q <= 127, G = 16 or 32): qs int8 [N/16][K/4][16][4]
 *       tile t, quad c, lane r, byte j: q[16t + r][4c + j]
 *   scales: [N/16][K/G][2][16], d of the tile's 16 rows then m, as float32 or IEEE half
 *
 * Activations are quantized per row in blocks of 32 inputs (blocks never straddle a group):
 *     xq[k] = rint(x[k] * 127 / amax)   amax = max |x| over the block (a zero block: all zeros)
 *     dx[k / 32] = amax / 127            sx[k / 16] = dx * sum of xq over the 16 inputs
 * so that sum_k x[k] w[n][k] ~= sum_groups (d dx sum(q xq) + m sx).
 */
#ifndef TM_CPU_H
#define TM_CPU_H

#include <stddef.h>
#include <stdint.h>

#define TM_CAT2(a, b) a##_##b
#define TM_CAT(a, b) TM_CAT2(a, b)
#define TM_FN(name) TM_CAT(name, TM_ISA)

#define TM_TILE 16  /* output rows per weight tile */
#define TM_ABLOCK 32  /* inputs per activation block */

typedef struct {
    int64_t n;          /* outputs */
    int64_t k;          /* inputs, a multiple of 32 */
    int64_t group;      /* inputs per scale: 32, or 16 (8-bit only) */
    int64_t bits;       /* 4 or 8 */
    int64_t scale_f16;  /* 1: scales are IEEE half, 0: float32 */
    const uint8_t *qs;  /* repacked integers, see above */
    const void *scales; /* [N/16][K/G][2][16] */
} tm_qweight;

/* A row-quantized activation: xq [m][k], dx [m][k/32], sx [m][k/16]. */
typedef struct {
    const int8_t *xq;
    const float *dx;
    const float *sx;
    int64_t k;
} tm_act;

/* ------------------------------------------------------------------ one decoder layer in one call
 * (decoder_layer.c). Python builds a tm_layer per layer once, after loading, and a tm_step per step;
 * the call runs the same per-ISA kernels the per-op path calls, in the same order. */
#define TM_MAX_SEGMENTS 4

/* A quantized linear layer as runs of output columns, each its own packed weight (merged q | k | v
 * or gate | up shards of different formats): columns [start[i], start[i] + w[i]->n) come from w[i]. */
typedef struct {
    int64_t count;
    int64_t start[TM_MAX_SEGMENTS];
    const tm_qweight *w[TM_MAX_SEGMENTS];
    const float *bias;  /* [n], or NULL */
} tm_linear;

typedef struct {
    tm_linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm;  /* [hidden] */
    float eps, norm_offset, scale;        /* rms_norm eps and weight offset; attention scale */
    int64_t hidden, heads, kv_heads, head_dim, inter;
    int64_t window;  /* sliding window (0: none) */
    int64_t act;     /* 0: silu, 1: gelu (tanh) */
} tm_layer;

typedef struct {
    int64_t ntokens;
    const void *positions; /* [ntokens] */
    int64_t pos64;         /* positions are int64 (else int32) */
    const float *cos_sin;  /* [max_pos][head_dim] */
    int64_t ldcs;
    /* the step's attention arrays (attention/cpu_backend.py CPUMetadata.args) */
    const int32_t *slots, *seq_lens, *query_start, *block_tables;
    int64_t bt_stride, nseqs, block_size;
    int64_t nthreads;
} tm_step;

/* The per-ISA kernels the layer call strings together (qlinear.c, layer_ops.c, attention.c). */
void TM_FN(tm_qlinear)(const tm_qweight *w, const float *x, int64_t ldx, int64_t m, float *y, int64_t ldy,
                       const float *bias, int nthreads);
void TM_FN(tm_rms_norm)(const float *x, int64_t ldx, float *out, int64_t ldo, const float *w, int64_t m, int64_t k,
                        float eps, float offset, int nthreads);
void TM_FN(tm_add_rms_norm)(float *x, int64_t ldx, float *res, int64_t ldr, const float *w, int64_t m, int64_t k,
                            float eps, float offset, int nthreads);
void TM_FN(tm_rope)(float *q, int64_t ldq, float *k, int64_t ldk, const void *positions, int64_t pos64,
                    const float *cos_sin, int64_t ldcs, int64_t t, int64_t h, int64_t kvh, int64_t d, int nthreads);
void TM_FN(tm_silu_mul)(const float *gu, int64_t ldg, float *out, int64_t ldo, int64_t m, int64_t inter,
                        int nthreads);
void TM_FN(tm_gelu_tanh_mul)(const float *gu, int64_t ldg, float *out, int64_t ldo, int64_t m, int64_t inter,
                             int nthreads);
void TM_FN(tm_argmax_rows)(const float *x, int64_t ldx, int64_t m, int64_t n, int64_t *out, int nthreads);
void TM_FN(tm_paged_attention)(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v,
                               int64_t ldv, float *k_cache, float *v_cache, const int32_t *slots,
                               const int32_t *seq_lens, const int32_t *query_start, const int32_t *block_tables,
                               int64_t bt_stride, int64_t nseqs, int64_t ntokens, int64_t h, int64_t kvh, int64_t d,
                               int64_t block_size, float scale, int64_t window, float *out, int64_t ldo,
                               int nthreads);

/* fn(ctx, i) for i in [0, ntasks) over the calling thread and up to nthreads - 1 pool workers
 * (pool.c: tasks are claimed one by one; a late worker never holds the call up). */
void tm_parallel(int64_t ntasks, void (*fn)(void *, int64_t), void *ctx, int nthreads);

/* Scratch memory of the calling thread, grown on demand and kept (one engine thread calls).
 * Slots: 0-2 qlinear's quantized activations, 3 and 8 attention, 4-7 decoder_layer's intermediates. */
void *tm_scratch(size_t bytes, int slot);

/* IEEE half -> float, exact (subnormals, infinities and NaNs included). */
static inline float tm_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* a subnormal half is a normal float */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static inline int64_t tm_tiles(int64_t n) { return (n + TM_TILE - 1) / TM_TILE; }

#endif
