/* The small ops of a decoder layer (RMS norms, rotary embedding, gated activations) and attention
 * over the paged KV cache, in float32. Plain C that the compiler vectorizes for each instruction
 * set this file is compiled for (TM_ISA); every row is computed the same way whatever the other
 * rows of the call, so a token's result never depends on the batch it is in.
 *
 * Threads: an op splits its rows over nthreads only when the call holds enough work (PAR_MIN
 * floats), since waking the threads costs microseconds that a single decode row does not.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tm_cpu.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PAR_MIN (1 << 18)
#define ATTN_PAR_MIN (1 << 16)  /* query-key pairs x head_dim x heads; attention runs on the pool (pool.c) */
#define KEY_CHUNK 32   /* keys per online-softmax step */
#define MAX_HEAD_DIM 1024

/* exp(x) for x <= 88.7: 2^n e^r, n = rint(x / ln 2), |r| <= ln(2) / 2, a degree-6 polynomial for e^r
 * (relative error about 2e-7). Branch-free, so loops over it vectorize. Results below e^-87.3
 * (softmax weights that small) come out as e^-87.3 rather than 0. */
static inline float tm_expf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    const float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* ------------------------------------------------------------------ norms */

static inline float inv_rms(const float *x, int64_t k, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < k; j++) ss += x[j] * x[j];
    return 1.0f / sqrtf(ss / (float)k + eps);
}

/* out = x / rms(x) * (w + offset), row by row. */
void TM_FN(tm_rms_norm)(const float *x, int64_t ldx, float *out, int64_t ldo, const float *w, int64_t m, int64_t k,
                        float eps, float offset, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * k >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * ldx;
        float *o = out + i * ldo;
        const float r = inv_rms(xr, k, eps);
#pragma omp simd
        for (int64_t j = 0; j < k; j++) o[j] = (xr[j] * r) * (w[j] + offset);
    }
}

/* The pre-norm residual step in place: res = x + res, then x = res / rms(res) * (w + offset). */
void TM_FN(tm_add_rms_norm)(float *x, int64_t ldx, float *res, int64_t ldr, const float *w, int64_t m, int64_t k,
                            float eps, float offset, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * k >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        float *xr = x + i * ldx, *rr = res + i * ldr;
#pragma omp simd
        for (int64_t j = 0; j < k; j++) rr[j] = xr[j] + rr[j];
        const float r = inv_rms(rr, k, eps);
#pragma omp simd
        for (int64_t j = 0; j < k; j++) xr[j] = (rr[j] * r) * (w[j] + offset);
    }
}

/* ------------------------------------------------------------------ rotary embedding */

/* Rotate-half rotary embedding in place. q [t][h * d] (row stride ldq), k [t][kvh * d] (ldk);
 * cos_sin [max_pos][d] (row stride ldcs): row p holds cos of the d/2 angles, then their sin.
 *     out[j] = x[j] cos[j] - x[j + d/2] sin[j],   out[j + d/2] = x[j + d/2] cos[j] + x[j] sin[j]  */
static inline void rotate(float *x, int64_t d, const float *cs) {
    const int64_t half = d / 2;
    const float *c = cs, *s = cs + half;
#pragma omp simd
    for (int64_t j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * c[j] + (-b) * s[j];
        x[j + half] = b * c[j] + a * s[j];
    }
}

void TM_FN(tm_rope)(float *q, int64_t ldq, float *k, int64_t ldk, const void *positions, int64_t pos64,
                    const float *cos_sin, int64_t ldcs, int64_t t, int64_t h, int64_t kvh, int64_t d, int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && t * (h + kvh) * d >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < t; i++) {
        const int64_t p = pos64 ? ((const int64_t *)positions)[i] : ((const int32_t *)positions)[i];
        const float *cs = cos_sin + p * ldcs;
        for (int64_t hh = 0; hh < h; hh++) rotate(q + i * ldq + hh * d, d, cs);
        for (int64_t hh = 0; hh < kvh; hh++) rotate(k + i * ldk + hh * d, d, cs);
    }
}

/* ------------------------------------------------------------------ gated activations */

/* out [m][inter] = act(gate) * up, gate_up [m][2 * inter] = [gate | up] (row stride ldg). */
void TM_FN(tm_silu_mul)(const float *gu, int64_t ldg, float *out, int64_t ldo, int64_t m, int64_t inter,
                        int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * inter >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const float *g = gu + i * ldg, *u = g + inter;
        float *o = out + i * ldo;
#pragma omp simd
        for (int64_t j = 0; j < inter; j++) o[j] = g[j] / (1.0f + tm_expf(-g[j])) * u[j];
    }
}

/* gelu with the tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), where
 * 1 + tanh(y) = 2 - 2 / (e^{2y} + 1). */
void TM_FN(tm_gelu_tanh_mul)(const float *gu, int64_t ldg, float *out, int64_t ldo, int64_t m, int64_t inter,
                             int nthreads) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m * inter >= PAR_MIN) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const float *g = gu + i * ldg, *u = g + inter;
        float *o = out + i * ldo;
#pragma omp simd
        for (int64_t j = 0; j < inter; j++) {
            const float x = g[j];
            const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            const float one_plus_tanh = 2.0f - 2.0f / (tm_expf(2.0f * y) + 1.0f);
            o[j] = 0.5f * x * one_plus_tanh * u[j];
        }
    }
}

/* ------------------------------------------------------------------ attention over the paged KV cache */

typedef struct {
    const float *k_cache, *v_cache;  /* [num_blocks][block_size][kvh][d] each */
    const int32_t *table;            /* the sequence's block ids */
    int64_t block_shift, kvh, d;     /* block_size = 1 << block_shift */
} kv_view;

static inline const float *kv_row(const kv_view *kv, const float *cache, int64_t pos, int64_t head) {
    const int64_t block = kv->table[pos >> kv->block_shift];
    const int64_t slot = (block << kv->block_shift) + (pos & (((int64_t)1 << kv->block_shift) - 1));
    return cache + (slot * kv->kvh + head) * kv->d;
}

#define GROUP_MAX 8  /* query heads attended together over one key / value head's rows */

/* The two inner loops of attention, with SIMD where the ISA has it: a plain C loop leaves the dot
 * product's lanes to be summed one by one (in order) and the output row in memory between keys.
 *   dot(a, b, d)                        sum_e a[e] b[e] (lanes summed as a tree)
 *   add_rows(acc, p, rows, n, d)        acc[e] += p[j] rows[j][e] for j = 0..n-1 in order, the
 *                                       row's slice kept in registers over the keys */
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
#define VLANES 16
typedef __m512 vfloat;
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vadd _mm512_add_ps
#define vmul _mm512_mul_ps
#define vset1 _mm512_set1_ps
#else
#define VLANES 8
typedef __m256 vfloat;
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vadd _mm256_add_ps
#define vmul _mm256_mul_ps
#define vset1 _mm256_set1_ps
#endif

/* add_rows over acc[e .. e + 4 VLANES): four registers of the output row kept over the n keys. */
static inline void add_rows_block(float *acc, const float *p, const float *const *rows, int64_t n, int64_t e) {
    vfloat a0 = vload(acc + e), a1 = vload(acc + e + VLANES);
    vfloat a2 = vload(acc + e + 2 * VLANES), a3 = vload(acc + e + 3 * VLANES);
    for (int64_t j = 0; j < n; j++) {
        const vfloat pj = vset1(p[j]);
        const float *r = rows[j] + e;
        a0 = vadd(a0, vmul(pj, vload(r)));
        a1 = vadd(a1, vmul(pj, vload(r + VLANES)));
        a2 = vadd(a2, vmul(pj, vload(r + 2 * VLANES)));
        a3 = vadd(a3, vmul(pj, vload(r + 3 * VLANES)));
    }
    vstore(acc + e, a0);
    vstore(acc + e + VLANES, a1);
    vstore(acc + e + 2 * VLANES, a2);
    vstore(acc + e + 3 * VLANES, a3);
}
#endif

#if defined(__AVX512F__)
static inline float dot(const float *a, const float *b, int64_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t e = 0;
    for (; e + 32 <= d; e += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + e), _mm512_loadu_ps(b + e), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + e + 16), _mm512_loadu_ps(b + e + 16), s1);
    }
    for (; e < d; e += 16) {
        const __mmask16 m = d - e >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - e)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + e), _mm512_maskz_loadu_ps(m, b + e), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

static inline void add_rows(float *acc, const float *p, const float *const *rows, int64_t n, int64_t d) {
    int64_t e = 0;
    for (; e + 4 * VLANES <= d; e += 4 * VLANES) add_rows_block(acc, p, rows, n, e);
    for (; e < d; e += 16) {  /* the tail, 16 lanes at a time under a mask */
        const __mmask16 m = d - e >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - e)) - 1);
        __m512 a0 = _mm512_maskz_loadu_ps(m, acc + e);
        for (int64_t j = 0; j < n; j++)
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, rows[j] + e)));
        _mm512_mask_storeu_ps(acc + e, m, a0);
    }
}
#elif defined(__AVX2__)
static inline float dot(const float *a, const float *b, int64_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 16 <= d; e += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e + 8), _mm256_loadu_ps(b + e + 8), s1);
    }
    for (; e + 8 <= d; e += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), s0);
    const __m256 s = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float total = _mm_cvtss_f32(h);
    for (; e < d; e++) total += a[e] * b[e];
    return total;
}

static inline void add_rows(float *acc, const float *p, const float *const *rows, int64_t n, int64_t d) {
    int64_t e = 0;
    for (; e + 4 * VLANES <= d; e += 4 * VLANES) add_rows_block(acc, p, rows, n, e);
    for (; e + 8 <= d; e += 8) {  /* the tail: 8 lanes, then one by one */
        __m256 a0 = _mm256_loadu_ps(acc + e);
        for (int64_t j = 0; j < n; j++)
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(rows[j] + e)));
        _mm256_storeu_ps(acc + e, a0);
    }
    for (; e < d; e++)
        for (int64_t j = 0; j < n; j++) acc[e] += p[j] * rows[j][e];
}
#else
static inline float dot(const float *a, const float *b, int64_t d) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t e = 0; e < d; e++) total += a[e] * b[e];
    return total;
}

static inline void add_rows(float *acc, const float *p, const float *const *rows, int64_t n, int64_t d) {
    for (int64_t j = 0; j < n; j++) {
        const float pj = p[j], *r = rows[j];
#pragma omp simd
        for (int64_t e = 0; e < d; e++) acc[e] += pj * r[e];
    }
}
#endif

/* One query row of nh heads (q [nh][d], the heads sharing one key / value head) over keys [lo, hi]
 * (inclusive): online softmax in chunks of KEY_CHUNK keys aligned to absolute positions, so the
 * same query position always takes the same steps; each key and value row is read once for the
 * nh heads. out [nh][d]. */
static void attend(const float *q, int nh, const kv_view *kv, int64_t head, int64_t lo, int64_t hi, float scale,
                   float *out) {
    const int64_t d = kv->d;
    float acc[GROUP_MAX][MAX_HEAD_DIM], s[GROUP_MAX][KEY_CHUNK], run_max[GROUP_MAX], total[GROUP_MAX];
    for (int r = 0; r < nh; r++) {
        run_max[r] = -INFINITY;
        total[r] = 0.0f;
        for (int64_t e = 0; e < d; e++) acc[r][e] = 0.0f;
    }
    for (int64_t c0 = lo - lo % KEY_CHUNK; c0 <= hi; c0 += KEY_CHUNK) {
        const int64_t j0 = c0 > lo ? c0 : lo, j1 = c0 + KEY_CHUNK - 1 < hi ? c0 + KEY_CHUNK - 1 : hi;
        const int64_t n = j1 - j0 + 1;
        for (int64_t j = 0; j < n; j++) {
            const float *kr = kv_row(kv, kv->k_cache, j0 + j, head);
            for (int r = 0; r < nh; r++) s[r][j] = dot(q + r * d, kr, d) * scale;
        }
        for (int r = 0; r < nh; r++) {
            float chunk_max = -INFINITY;
            for (int64_t j = 0; j < n; j++) chunk_max = s[r][j] > chunk_max ? s[r][j] : chunk_max;
            const float new_max = chunk_max > run_max[r] ? chunk_max : run_max[r];
            const float alpha = run_max[r] == -INFINITY ? 0.0f : tm_expf(run_max[r] - new_max);
            total[r] *= alpha;
#pragma omp simd
            for (int64_t e = 0; e < d; e++) acc[r][e] *= alpha;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) s[r][j] = tm_expf(s[r][j] - new_max);
            run_max[r] = new_max;
        }
        const float *vrows[KEY_CHUNK];
        for (int64_t j = 0; j < n; j++) vrows[j] = kv_row(kv, kv->v_cache, j0 + j, head);
        for (int r = 0; r < nh; r++) {
            for (int64_t j = 0; j < n; j++) total[r] += s[r][j];
            add_rows(acc[r], s[r], vrows, n, d);
        }
    }
    for (int r = 0; r < nh; r++) {
        const float inv = 1.0f / total[r];
#pragma omp simd
        for (int64_t e = 0; e < d; e++) out[r * d + e] = acc[r][e] * inv;
    }
}

typedef struct {
    const float *q;
    int64_t ldq;
    const float *k_cache, *v_cache;
    const int32_t *seq_lens, *query_start, *block_tables;
    int64_t bt_stride;
    const int32_t *seq_of;  /* sequence of each query row */
    int64_t h, group, kvh, d, block_shift;
    float scale;
    int64_t window;
    float *out;
    int64_t ldo;
} attention_job;

/* Task `item`: query row item / parts, heads [GROUP_MAX p, GROUP_MAX (p + 1)) of its key / value
 * head's group (part p of that group), parts = kvh x (group / GROUP_MAX rounded up). */
static void attention_task(void *arg, int64_t item) {
    const attention_job *jb = (const attention_job *)arg;
    const int64_t per_kv = (jb->group + GROUP_MAX - 1) / GROUP_MAX, parts = jb->kvh * per_kv;
    const int64_t i = item / parts, kv_head = (item % parts) / per_kv, part = item % per_kv;
    const int64_t first = kv_head * jb->group + part * GROUP_MAX;  /* first query head of the task */
    const int nh = (int)(jb->group - part * GROUP_MAX < GROUP_MAX ? jb->group - part * GROUP_MAX : GROUP_MAX);
    const int64_t j = jb->seq_of[i], pos = jb->seq_lens[j] - (jb->query_start[j + 1] - i);
    float *out = jb->out + i * jb->ldo + first * jb->d;
    if (pos < 0) {  /* no key to attend (not a row the runner makes) */
        memset(out, 0, sizeof(float) * jb->d * nh);
        return;
    }
    const int64_t lo = jb->window > 0 && pos - jb->window + 1 > 0 ? pos - jb->window + 1 : 0;
    const kv_view kv = {jb->k_cache, jb->v_cache, jb->block_tables + j * jb->bt_stride, jb->block_shift, jb->kvh,
                        jb->d};
    attend(jb->q + i * jb->ldq + first * jb->d, nh, &kv, kv_head, lo, pos, jb->scale, out);
}

/* Write the step's new keys and values into their cache slots (slot < 0: padding, skipped), then
 * attend every query row over its sequence's cached keys.
 *   q [t][h * d] (ldq), k and v [t][kvh * d] (ldk, ldv); cache [num_blocks][block_size][kvh][d]
 *   slots [t]; seq_lens [s]: tokens of each sequence after the step; query_start [s + 1]: its rows;
 *   block_tables [s][bt_stride]; block_size a power of two; window > 0: keys at positions > p - window
 *   only; out [t][h * d] (ldo). d <= MAX_HEAD_DIM.
 * Query row i of sequence j sits at position seq_lens[j] - (query_start[j + 1] - i). */
void TM_FN(tm_paged_attention)(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v,
                               int64_t ldv, float *k_cache, float *v_cache, const int32_t *slots,
                               const int32_t *seq_lens, const int32_t *query_start, const int32_t *block_tables,
                               int64_t bt_stride, int64_t nseqs, int64_t ntokens, int64_t h, int64_t kvh, int64_t d,
                               int64_t block_size, float scale, int64_t window, float *out, int64_t ldo,
                               int nthreads) {
    const int64_t row = kvh * d;
    for (int64_t i = 0; i < ntokens; i++) {
        if (slots[i] < 0) continue;
        memcpy(k_cache + (int64_t)slots[i] * row, k + i * ldk, sizeof(float) * row);
        memcpy(v_cache + (int64_t)slots[i] * row, v + i * ldv, sizeof(float) * row);
    }
    int32_t *seq_of = (int32_t *)tm_scratch(sizeof(int32_t) * (size_t)(ntokens > 0 ? ntokens : 1), 3);
    int64_t work = 0;
    for (int64_t j = 0; j < nseqs; j++) {
        for (int64_t i = query_start[j]; i < query_start[j + 1]; i++) seq_of[i] = (int32_t)j;
        work += (int64_t)(query_start[j + 1] - query_start[j]) * seq_lens[j];
    }
    int64_t shift = 0;
    while (((int64_t)1 << shift) < block_size) shift++;
    attention_job job = {q, ldq, k_cache, v_cache, seq_lens, query_start, block_tables, bt_stride, seq_of, h,
                         h / kvh, kvh, d, shift, scale, window, out, ldo};
    const int64_t parts = kvh * ((h / kvh + GROUP_MAX - 1) / GROUP_MAX);
    tm_parallel(ntokens * parts, attention_task, &job, work * h * d >= ATTN_PAR_MIN ? nthreads : 1);
}
