/* The parts of the CPU kernels that do not depend on the instruction set: what the CPU offers,
 * scratch memory, repacking decoded GGUF integers into the tiles of tm_cpu.h, and reading rows of
 * a repacked table back (embedding lookups). Compiled once, for the baseline CPU. */
#include <stdlib.h>
#include <string.h>

#include "tm_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

/* Feature bits reported to Python (tidemind/kernels/cpu/library.py names them). */
enum {
    TM_AVX2 = 1 << 0, TM_FMA = 1 << 1, TM_F16C = 1 << 2, TM_AVX512F = 1 << 3, TM_AVX512BW = 1 << 4,
    TM_AVX512VL = 1 << 5, TM_AVX512VNNI = 1 << 6, TM_AVX512BF16 = 1 << 7, TM_AVXVNNI = 1 << 8,
    TM_AMX_TILE = 1 << 9, TM_AMX_INT8 = 1 << 10, TM_AMX_BF16 = 1 << 11,
};

int64_t tm_cpu_features(void) {
    int64_t f = 0;
#if defined(__x86_64__) || defined(__i386__)
    /* __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0) */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= TM_AVX2;
    if (__builtin_cpu_supports("fma")) f |= TM_FMA;
    if (__builtin_cpu_supports("avx512f")) f |= TM_AVX512F;
    if (__builtin_cpu_supports("avx512bw")) f |= TM_AVX512BW;
    if (__builtin_cpu_supports("avx512vl")) f |= TM_AVX512VL;
    if (__builtin_cpu_supports("avx512vnni")) f |= TM_AVX512VNNI;
    if (__builtin_cpu_supports("avx512bf16")) f |= TM_AVX512BF16;
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29))) f |= TM_F16C;
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4))) f |= TM_AVXVNNI;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {  /* AMX: reported only (no AMX kernels here) */
        if (d & (1u << 24)) f |= TM_AMX_TILE;
        if (d & (1u << 25)) f |= TM_AMX_INT8;
        if (d & (1u << 22)) f |= TM_AMX_BF16;
    }
#endif
    return f;
}

/* ------------------------------------------------------------------ scratch */

#define TM_SLOTS 9
static __thread void *scratch_buf[TM_SLOTS];
static __thread size_t scratch_cap[TM_SLOTS];

/* Per-thread, grow-only, 64-byte aligned; slot s stays valid until the same thread asks for a
 * larger slot s. NULL only when memory is exhausted (callers abort). */
void *tm_scratch(size_t bytes, int slot) {
    if (bytes > scratch_cap[slot]) {
        free(scratch_buf[slot]);
        size_t cap = bytes + bytes / 4 + 4096;
        scratch_buf[slot] = NULL;
        if (posix_memalign(&scratch_buf[slot], 64, cap) != 0) abort();
        scratch_cap[slot] = cap;
    }
    return scratch_buf[slot];
}

/* ------------------------------------------------------------------ repacking */

/* Round-to-nearest-even float -> half; callers only pass values a half holds exactly. */
static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {  /* subnormal half (or zero) */
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        const int shift = 14 - exp;
        uint32_t h = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* q [n][k] int8, d and m [n][k/group] float32 -> qs and scales in the tiles of tm_cpu.h (rows past
 * n are zero). bits 4: every q must lie in [0, 15] (the caller checked). */
void tm_repack(const int8_t *q, const float *d, const float *m, int64_t n, int64_t k, int64_t group, int64_t bits,
               int64_t scale_f16, uint8_t *qs, void *scales) {
    const int64_t ntiles = tm_tiles(n), ng = k / group;
    for (int64_t t = 0; t < ntiles; t++) {
        for (int r = 0; r < TM_TILE; r++) {
            const int64_t row = t * TM_TILE + r;
            const int8_t *qr = row < n ? q + row * k : NULL;
            for (int64_t kk = 0; kk < k; kk++) {
                const int8_t v = qr ? qr[kk] : 0;
                if (bits == 4) {
                    const int64_t b = kk / 32, in = kk % 32, c = (in % 16) / 4, j = in % 4;
                    uint8_t *byte = qs + (t * (k / 32) + b) * 256 + 64 * c + 4 * r + j;
                    if (in < 16) *byte = (uint8_t)((*byte & 0xF0) | (v & 0x0F));
                    else *byte = (uint8_t)((*byte & 0x0F) | ((v & 0x0F) << 4));
                } else {
                    qs[(t * (k / 4) + kk / 4) * 64 + 4 * r + kk % 4] = (uint8_t)v;
                }
            }
            for (int64_t g = 0; g < ng; g++) {
                const float dv = row < n ? d[row * ng + g] : 0.0f, mv = row < n ? m[row * ng + g] : 0.0f;
                const int64_t at = (t * ng + g) * 32 + r;
                if (scale_f16) {
                    ((uint16_t *)scales)[at] = float_to_half(dv);
                    ((uint16_t *)scales)[at + 16] = float_to_half(mv);
                } else {
                    ((float *)scales)[at] = dv;
                    ((float *)scales)[at + 16] = mv;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ rows of a repacked table */

static inline int tile_q(const tm_qweight *w, int64_t t, int r, int64_t kk) {
    if (w->bits == 4) {
        const int64_t b = kk / 32, in = kk % 32, c = (in % 16) / 4, j = in % 4;
        const uint8_t byte = w->qs[(t * (w->k / 32) + b) * 256 + 64 * c + 4 * r + j];
        return in < 16 ? (byte & 0x0F) : (byte >> 4);
    }
    return ((const int8_t *)w->qs)[(t * (w->k / 4) + kk / 4) * 64 + 4 * r + kk % 4];
}

/* out [count][k] (row stride ldo) = the weight's rows ids[i] dequantized, d * q + m in float32:
 * an embedding lookup in a quantized table. ids: int32, or int64 when ids64. */
void tm_qrows(const tm_qweight *w, const void *ids, int64_t ids64, int64_t count, float *out, int64_t ldo) {
    const int64_t ng = w->k / w->group;
    for (int64_t i = 0; i < count; i++) {
        const int64_t row = ids64 ? ((const int64_t *)ids)[i] : ((const int32_t *)ids)[i];
        const int64_t t = row / TM_TILE;
        const int r = (int)(row % TM_TILE);
        float *o = out + i * ldo;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t at = (t * ng + g) * 32 + r;
            float d, m;
            if (w->scale_f16) {
                d = tm_half_to_float(((const uint16_t *)w->scales)[at]);
                m = tm_half_to_float(((const uint16_t *)w->scales)[at + 16]);
            } else {
                d = ((const float *)w->scales)[at];
                m = ((const float *)w->scales)[at + 16];
            }
            for (int64_t kk = g * w->group; kk < (g + 1) * w->group; kk++) o[kk] = d * (float)tile_q(w, t, r, kk) + m;
        }
    }
}
