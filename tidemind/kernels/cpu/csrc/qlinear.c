/* Quantized linear layers: y[m][n] = sum_k x[m][k] w[n][k] (+ bias[n]) with w in the repacked
 * 4-bit or 8-bit layout of tm_cpu.h and x quantized per row to int8 blocks of 32 on the way in.
 *
 * Compiled once per instruction set (TM_ISA):
 *   avx512_vnni  16 rows per zmm lane set; VPDPBUSD multiplies 4 unsigned weight bytes by 4 signed
 *                activation bytes into each int32 lane (8-bit weights are flipped to unsigned by
 *                XOR 0x80, i.e. q + 128, and the 128 * sum(xq) this adds comes off through m).
 *   avx2         the same tile in two halves of 8 rows; VPMADDUBSW pairs products into int16
 *                (4-bit: up to 8 of them summed in int16, |sum| <= 8 * 2 * 15 * 127 < 2^15;
 *                8-bit: |q| * sign-adjusted xq, one pair sum <= 2 * 128 * 127 < 2^15), VPMADDWD to int32.
 *   scalar       plain C over the same layout (any CPU; the definition the others follow).
 * Per output (m, n) every variant accumulates group by group in order, acc += isum * (d * dx) then
 * acc += m * sx, whatever the number of rows: a row's result never depends on the batch around it.
 */
#include <math.h>
#include <string.h>

#include "tm_cpu.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Bytes ahead of the weight stream a tile prefetches (tiles follow each other in memory, so this
 * runs into the next tiles of the claim): on an AMD EPYC (Zen 4) one thread streamed 46 GB/s with
 * 8 KB, 36 GB/s with the hardware prefetchers alone. */
#define PF_AHEAD 8192
#define MT 4        /* activation rows per inner step */
#define MCHUNK 256  /* activation rows per pass over the weights (their int8 copy stays in cache) */
/* Multiply-adds below which a call runs on the calling thread alone (a few microseconds of work:
 * less than handing tasks to another thread costs). */
#define PAR_MIN_MACS (1 << 18)

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Prefetch `lines` cache lines PF_AHEAD bytes after p. */
static inline void prefetch_ahead(const uint8_t *p, int lines) {
    for (int i = 0; i < lines; i++) __builtin_prefetch(p + PF_AHEAD + 64 * i, 0, 3);
}

/* ------------------------------------------------------------------ activation quantization */

#if defined(__AVX512F__)
static void quantize_row(const float *x, int64_t k, int8_t *xq, float *dx, float *sx) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t b = 0; b < k / 32; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        const __m512 a = _mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1));
        const float amax = _mm512_reduce_max_ps(a);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m512i lim = _mm512_set1_epi32(127);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        q0 = _mm512_max_epi32(_mm512_min_epi32(q0, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
        q1 = _mm512_max_epi32(_mm512_min_epi32(q1, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
        _mm_storeu_si128((__m128i *)(xq + 32 * b), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
        const float d = amax / 127.0f;
        dx[b] = d;
        sx[2 * b] = d * (float)_mm512_reduce_add_epi32(q0);
        sx[2 * b + 1] = d * (float)_mm512_reduce_add_epi32(q1);
    }
}
#elif defined(__AVX2__)
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* The scalar definition below, 32 values at a time: the same products, rounded to nearest-even by
 * the conversion (rintf's mode), so the same bytes and scalars. */
static void quantize_row(const float *x, int64_t k, int8_t *xq, float *dx, float *sx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i lim = _mm256_set1_epi32(127), neg_lim = _mm256_set1_epi32(-127);
    /* packs interleave 128-bit lanes: 4-byte groups come out as 0, 2, 4, 6, 1, 3, 5, 7 of 8 */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / 32; b++) {
        __m256 v[4];
        __m256 a = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 32 * b + 8 * j);
            a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[j]));
        }
        const float amax = hmax8(a);
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i q[4];
        for (int j = 0; j < 4; j++) {
            q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
            q[j] = _mm256_max_epi32(_mm256_min_epi32(q[j], lim), neg_lim);
        }
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xq + 32 * b), _mm256_permutevar8x32_epi32(bytes, order));
        const float d = amax / 127.0f;
        dx[b] = d;
        sx[2 * b] = d * (float)hsum8_epi32(_mm256_add_epi32(q[0], q[1]));
        sx[2 * b + 1] = d * (float)hsum8_epi32(_mm256_add_epi32(q[2], q[3]));
    }
}
#else
static void quantize_row(const float *x, int64_t k, int8_t *xq, float *dx, float *sx) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t s0 = 0, s1 = 0;
        for (int j = 0; j < 32; j++) {
            float v = rintf(xb[j] * inv);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            const int32_t q = (int32_t)v;
            xq[32 * b + j] = (int8_t)q;
            if (j < 16) s0 += q; else s1 += q;
        }
        const float d = amax / 127.0f;
        dx[b] = d;
        sx[2 * b] = d * (float)s0;
        sx[2 * b + 1] = d * (float)s1;
    }
}
#endif

/* ------------------------------------------------------------------ tiles: 16 outputs x mt rows */

/* Activation scalars of row `row` for the group of G inputs starting at input `k0`. */
static inline float act_dx(const tm_act *a, int64_t row, int64_t k0) { return a->dx[row * (a->k / 32) + k0 / 32]; }
static inline float act_sx(const tm_act *a, int64_t row, int64_t k0, int64_t group) {
    const float *s = a->sx + row * (a->k / 16) + k0 / 16;
    return group == 32 ? s[0] + s[1] : s[0];
}

#if defined(__AVX512F__)
static inline void load_scales(const tm_qweight *w, int64_t idx, __m512 *d, __m512 *m) {
    if (w->scale_f16) {
        const uint16_t *p = (const uint16_t *)w->scales + idx * 32;
        *d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        *m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16)));
    } else {
        const float *p = (const float *)w->scales + idx * 32;
        *d = _mm512_loadu_ps(p);
        *m = _mm512_loadu_ps(p + 16);
    }
}

static inline __attribute__((always_inline)) void q4_tile(const tm_qweight *w, int64_t t, const tm_act *a,
                                                          int64_t m0, const int mt, float *out) {
    const int64_t nb = w->k / 32;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    const uint8_t *qs = w->qs + t * nb * 256;
    for (int64_t b = 0; b < nb; b++, qs += 256) {
        prefetch_ahead(qs, 4);
        __m512 d, mn;
        load_scales(w, t * nb + b, &d, &mn);
        __m512i lo[4], hi[4];
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512(qs + 64 * c);
            lo[c] = _mm512_and_si512(v, low);
            hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        for (int i = 0; i < mt; i++) {
            const int8_t *x = a->xq + (m0 + i) * a->k + 32 * b;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                s0 = _mm512_dpbusd_epi32(s0, lo[c], _mm512_set1_epi32(load_i32(x + 4 * c)));
                s1 = _mm512_dpbusd_epi32(s1, hi[c], _mm512_set1_epi32(load_i32(x + 16 + 4 * c)));
            }
            const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            acc[i] = _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(act_dx(a, m0 + i, 32 * b))), acc[i]);
            acc[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(act_sx(a, m0 + i, 32 * b, 32)), acc[i]);
        }
    }
    for (int i = 0; i < mt; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}

static inline __attribute__((always_inline)) void q8_tile(const tm_qweight *w, int64_t t, const tm_act *a,
                                                          int64_t m0, const int mt, const int group, float *out) {
    const int64_t ng = w->k / group;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[MT];
    for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
    const uint8_t *qs = w->qs + t * (w->k / 4) * 64;
    for (int64_t g = 0; g < ng; g++, qs += 16 * group) {
        prefetch_ahead(qs, group / 4);
        __m512 d, mn;
        load_scales(w, t * ng + g, &d, &mn);
        const __m512 mu = _mm512_fmadd_ps(d, _mm512_set1_ps(-128.0f), mn);  /* w = d (q + 128) + (m - 128 d) */
        __m512i u[8];
        for (int c = 0; c < group / 4; c++) u[c] = _mm512_xor_si512(_mm512_loadu_si512(qs + 64 * c), flip);
        for (int i = 0; i < mt; i++) {
            const int8_t *x = a->xq + (m0 + i) * a->k + group * g;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int c = 0; c < group / 4; c += 2) {
                s0 = _mm512_dpbusd_epi32(s0, u[c], _mm512_set1_epi32(load_i32(x + 4 * c)));
                s1 = _mm512_dpbusd_epi32(s1, u[c + 1], _mm512_set1_epi32(load_i32(x + 4 * c + 4)));
            }
            const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            acc[i] = _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(act_dx(a, m0 + i, group * g))), acc[i]);
            acc[i] = _mm512_fmadd_ps(mu, _mm512_set1_ps(act_sx(a, m0 + i, group * g, group)), acc[i]);
        }
    }
    for (int i = 0; i < mt; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}

#elif defined(__AVX2__)
static inline void load_scales8(const tm_qweight *w, int64_t idx, int half, __m256 *d, __m256 *m) {
    if (w->scale_f16) {
        const uint16_t *p = (const uint16_t *)w->scales + idx * 32 + 8 * half;
        *d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    } else {
        const float *p = (const float *)w->scales + idx * 32 + 8 * half;
        *d = _mm256_loadu_ps(p);
        *m = _mm256_loadu_ps(p + 16);
    }
}

static inline __m256i bcast4(const int8_t *x) { return _mm256_set1_epi32(load_i32(x)); }

static inline __attribute__((always_inline)) void q4_tile(const tm_qweight *w, int64_t t, const tm_act *a,
                                                          int64_t m0, const int mt, float *out) {
    const int64_t nb = w->k / 32;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) {
        __m256 acc[MT];
        for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
        const uint8_t *qs = w->qs + t * nb * 256 + 32 * half;
        for (int64_t b = 0; b < nb; b++, qs += 256) {
            if (half == 0) prefetch_ahead(qs, 4);  /* the second half reads the tile from cache */
            __m256i s16[MT];
            for (int i = 0; i < MT; i++) s16[i] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 64 * c));
                const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int i = 0; i < mt; i++) {
                    const int8_t *x = a->xq + (m0 + i) * a->k + 32 * b;
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, bcast4(x + 4 * c)));
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi, bcast4(x + 16 + 4 * c)));
                }
            }
            __m256 d, mn;
            load_scales8(w, t * nb + b, half, &d, &mn);
            for (int i = 0; i < mt; i++) {
                const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones));
                acc[i] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, _mm256_set1_ps(act_dx(a, m0 + i, 32 * b))), acc[i]);
                acc[i] = _mm256_fmadd_ps(mn, _mm256_set1_ps(act_sx(a, m0 + i, 32 * b, 32)), acc[i]);
            }
        }
        for (int i = 0; i < mt; i++) _mm256_storeu_ps(out + 16 * i + 8 * half, acc[i]);
    }
}

static inline __attribute__((always_inline)) void q8_tile(const tm_qweight *w, int64_t t, const tm_act *a,
                                                          int64_t m0, const int mt, const int group, float *out) {
    const int64_t ng = w->k / group;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) {
        __m256 acc[MT];
        for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_ps();
        const uint8_t *qs = w->qs + t * (w->k / 4) * 64 + 32 * half;
        for (int64_t g = 0; g < ng; g++, qs += 16 * group) {
            if (half == 0) prefetch_ahead(qs, group / 4);  /* the second half reads the tile from cache */
            __m256i s32[MT];
            for (int i = 0; i < MT; i++) s32[i] = _mm256_setzero_si256();
            for (int c = 0; c < group / 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 64 * c));
                const __m256i av = _mm256_sign_epi8(v, v);  /* |q| (-128 stays 0x80 = 128 unsigned) */
                for (int i = 0; i < mt; i++) {
                    const __m256i x = bcast4(a->xq + (m0 + i) * a->k + group * g + 4 * c);
                    const __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(x, v));
                    s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(p, ones));
                }
            }
            __m256 d, mn;
            load_scales8(w, t * ng + g, half, &d, &mn);
            for (int i = 0; i < mt; i++) {
                const __m256 isum = _mm256_cvtepi32_ps(s32[i]);
                acc[i] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, _mm256_set1_ps(act_dx(a, m0 + i, group * g))), acc[i]);
                acc[i] = _mm256_fmadd_ps(mn, _mm256_set1_ps(act_sx(a, m0 + i, group * g, group)), acc[i]);
            }
        }
        for (int i = 0; i < mt; i++) _mm256_storeu_ps(out + 16 * i + 8 * half, acc[i]);
    }
}

#else
static inline void load_scales1(const tm_qweight *w, int64_t idx, int r, float *d, float *m) {
    if (w->scale_f16) {
        const uint16_t *p = (const uint16_t *)w->scales + idx * 32;
        *d = tm_half_to_float(p[r]);
        *m = tm_half_to_float(p[16 + r]);
    } else {
        const float *p = (const float *)w->scales + idx * 32;
        *d = p[r];
        *m = p[16 + r];
    }
}

static void q4_tile(const tm_qweight *w, int64_t t, const tm_act *a, int64_t m0, const int mt, float *out) {
    const int64_t nb = w->k / 32;
    float acc[MT][TM_TILE] = {{0}};
    const uint8_t *qs = w->qs + t * nb * 256;
    for (int64_t b = 0; b < nb; b++, qs += 256) {
        for (int r = 0; r < TM_TILE; r++) {
            float d, mn;
            load_scales1(w, t * nb + b, r, &d, &mn);
            for (int i = 0; i < mt; i++) {
                const int8_t *x = a->xq + (m0 + i) * a->k + 32 * b;
                int32_t s = 0;
                for (int c = 0; c < 4; c++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t byte = qs[64 * c + 4 * r + j];
                        s += (byte & 0x0F) * x[4 * c + j] + (byte >> 4) * x[16 + 4 * c + j];
                    }
                acc[i][r] += (float)s * (d * act_dx(a, m0 + i, 32 * b));
                acc[i][r] += mn * act_sx(a, m0 + i, 32 * b, 32);
            }
        }
    }
    memcpy(out, acc, sizeof(float) * TM_TILE * mt);
}

static void q8_tile(const tm_qweight *w, int64_t t, const tm_act *a, int64_t m0, const int mt, const int group,
                    float *out) {
    const int64_t ng = w->k / group;
    float acc[MT][TM_TILE] = {{0}};
    const int8_t *qs = (const int8_t *)w->qs + t * (w->k / 4) * 64;
    for (int64_t g = 0; g < ng; g++, qs += 16 * group) {
        for (int r = 0; r < TM_TILE; r++) {
            float d, mn;
            load_scales1(w, t * ng + g, r, &d, &mn);
            for (int i = 0; i < mt; i++) {
                const int8_t *x = a->xq + (m0 + i) * a->k + group * g;
                int32_t s = 0;
                for (int c = 0; c < group / 4; c++)
                    for (int j = 0; j < 4; j++) s += qs[64 * c + 4 * r + j] * x[4 * c + j];
                acc[i][r] += (float)s * (d * act_dx(a, m0 + i, group * g));
                acc[i][r] += mn * act_sx(a, m0 + i, group * g, group);
            }
        }
    }
    memcpy(out, acc, sizeof(float) * TM_TILE * mt);
}
#endif

/* One tile of 16 outputs for activation rows [m0, m1): results through a [MT][16] buffer, so that
 * a last tile of fewer than 16 real outputs writes only those. */
static void run_tile(const tm_qweight *w, int64_t t, const tm_act *a, int64_t m0, int64_t m1, float *y,
                     int64_t ldy, const float *bias) {
    float buf[MT * TM_TILE];
    const int64_t n0 = t * TM_TILE, width = w->n - n0 < TM_TILE ? w->n - n0 : TM_TILE;
    for (int64_t m = m0; m < m1; m += MT) {
        const int mt = m1 - m < MT ? (int)(m1 - m) : MT;
        if (w->bits == 4) {
            switch (mt) {
                case 4: q4_tile(w, t, a, m, 4, buf); break;
                case 3: q4_tile(w, t, a, m, 3, buf); break;
                case 2: q4_tile(w, t, a, m, 2, buf); break;
                default: q4_tile(w, t, a, m, 1, buf); break;
            }
        } else if (w->group == 32) {
            switch (mt) {
                case 4: q8_tile(w, t, a, m, 4, 32, buf); break;
                case 3: q8_tile(w, t, a, m, 3, 32, buf); break;
                case 2: q8_tile(w, t, a, m, 2, 32, buf); break;
                default: q8_tile(w, t, a, m, 1, 32, buf); break;
            }
        } else {
            switch (mt) {
                case 4: q8_tile(w, t, a, m, 4, 16, buf); break;
                case 3: q8_tile(w, t, a, m, 3, 16, buf); break;
                case 2: q8_tile(w, t, a, m, 2, 16, buf); break;
                default: q8_tile(w, t, a, m, 1, 16, buf); break;
            }
        }
        for (int i = 0; i < mt; i++) {
            float *row = y + (m + i) * ldy + n0;
            const float *src = buf + TM_TILE * i;
            if (bias != NULL) {
                for (int64_t r = 0; r < width; r++) row[r] = src[r] + bias[n0 + r];
            } else {
                memcpy(row, src, sizeof(float) * width);
            }
        }
    }
}

typedef struct {
    const tm_qweight *w;
    const tm_act *a;
    int64_t m, claim, ngroups;  /* ngroups: claims of `claim` tiles per pass of MCHUNK rows */
    float *y;
    int64_t ldy;
    const float *bias;
} qlinear_job;

/* Task i: tiles [claim g, claim (g + 1)) for the rows of pass i / ngroups. */
static void qlinear_task(void *arg, int64_t i) {
    const qlinear_job *j = (const qlinear_job *)arg;
    const int64_t m0 = (i / j->ngroups) * MCHUNK, m1 = m0 + MCHUNK < j->m ? m0 + MCHUNK : j->m;
    const int64_t t0 = (i % j->ngroups) * j->claim, ntiles = tm_tiles(j->w->n);
    const int64_t t1 = t0 + j->claim < ntiles ? t0 + j->claim : ntiles;
    for (int64_t t = t0; t < t1; t++) run_tile(j->w, t, j->a, m0, m1, j->y, j->ldy, j->bias);
}

/* y [m][n] (row stride ldy) = x [m][k] (row stride ldx) times the weight, plus bias (or NULL). */
void TM_FN(tm_qlinear)(const tm_qweight *w, const float *x, int64_t ldx, int64_t m, float *y, int64_t ldy,
                       const float *bias, int nthreads) {
    const int64_t k = w->k, ntiles = tm_tiles(w->n);
    int8_t *xq = (int8_t *)tm_scratch((size_t)(m * k), 0);
    float *dx = (float *)tm_scratch(sizeof(float) * (size_t)(m * (k / 32)), 1);
    float *sx = (float *)tm_scratch(sizeof(float) * (size_t)(m * (k / 16)), 2);
    const tm_act a = {xq, dx, sx, k};
    for (int64_t i = 0; i < m; i++) quantize_row(x + i * ldx, k, xq + i * k, dx + i * (k / 32), sx + i * (k / 16));
    if ((double)ntiles * TM_TILE * (double)k * (double)m < (double)PAR_MIN_MACS) nthreads = 1;
    /* claims of a few tiles each, so that a thread other work on the machine delays takes fewer */
    int64_t claim = nthreads > 1 ? ntiles / (8 * nthreads) : ntiles;
    if (claim < 1) claim = 1;
    const int64_t ngroups = (ntiles + claim - 1) / claim, passes = (m + MCHUNK - 1) / MCHUNK;
    qlinear_job job = {w, &a, m, claim, ngroups, y, ldy, bias};
    tm_parallel(passes * ngroups, qlinear_task, &job, nthreads);
}

/* The activation quantization alone (tests compare it with the torch definition). */
void TM_FN(tm_quantize_rows)(const float *x, int64_t ldx, int64_t m, int64_t k, int8_t *xq, float *dx, float *sx) {
    for (int64_t i = 0; i < m; i++) quantize_row(x + i * ldx, k, xq + i * k, dx + i * (k / 32), sx + i * (k / 16));
}
