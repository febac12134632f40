/* tidemind CPU kernels: shared types and the layouts every kernel file agrees on.
 *
 * qlinear.c and layer_ops.c are compiled once per instruction set (build.py passes -DTM_ISA=avx512_vnni,
 * avx2 or scalar with the matching -m flags); TM_FN(name) gives each copy its own symbol, name_<isa>,
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

/* fn(ctx, i) for i in [0, ntasks) over the calling thread and up to nthreads - 1 pool workers
 * (pool.c: tasks are claimed one by one; a late worker never holds the call up). */
void tm_parallel(int64_t ntasks, void (*fn)(void *, int64_t), void *ctx, int nthreads);

/* Scratch memory of the calling thread, grown on demand and kept (one engine thread calls). */
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
