/* Attention over the paged KV cache, in float32, for every query row of a step (prefill chunks and
 * decodes alike). Compiled once per instruction set (TM_ISA).
 *
 * The arithmetic of a query row depends on its position only, never on the step it is in, so a
 * token's result is the same in a prefill, a chunk after cached tokens, a decode or a recompute
 * after preemption:
 *   keys [lo, pos] are cut into segments of SEGMENT keys aligned to absolute positions; a segment
 *   is a softmax partial (its max, its sum of weights, its unnormalized weighted sum of values)
 *   computed in chunks of KEY_CHUNK keys with an online softmax; the partials are merged in
 *   segment order (merge_partial), then normalized.
 * How that work is spread over the threads may change with the step (it changes no result):
 *   many rows: a task per (row, group of query heads), its segments one after the other;
 *   few rows (a batch-1 decode has only kvh tasks, 3 for two threads leaves one idle a third of
 *   the time): a task per (row, group, segment) writes its partial to memory, and the caller
 *   merges each row's partials in the same order.
 * merge_partial and attend_segment are never inlined, so both ways run the same instructions.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tm_cpu.h"
#include "tm_math.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define ATTN_PAR_MIN (1 << 16)  /* query-key pairs x head_dim x heads; attention runs on the pool (pool.c) */
#define KEY_CHUNK 32            /* keys per online-softmax step */
#define SEGMENT (2 * KEY_CHUNK) /* keys per softmax partial: the unit of work a few rows are split into */
#define SPLIT_BELOW 4           /* split rows into segments when they give fewer tasks than 4 a thread */
#define MAX_HEAD_DIM 1024
#define GROUP_MAX 8             /* query heads attended together over one key / value head's rows */
#define NO_KEY (-INFINITY)      /* the max of a partial over no key */

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

/* The two inner loops, with SIMD where the ISA has it:
 *   dots(q, rows, n, d, scale, s)       s[j] = scale sum_e q[e] rows[j][e], j < n: a register of
 *                                       lanes per key, summed for VLANES keys at once by a
 *                                       transposing tree (one horizontal sum per key costs more
 *                                       than the key's products at head_dim 64)
 *   add_rows(acc, p, rows, n, d)        acc[e] += p[j] rows[j][e] for j = 0..n-1 in order, the
 *                                       row's slice kept in registers over the keys */
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
#define VLANES 16
typedef __m512 vfloat;
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vfmadd _mm512_fmadd_ps
#define vmul _mm512_mul_ps
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* sum over lanes of q * row for d inputs (d % 16 under a mask) */
static inline vfloat lane_products(const float *q, const float *row, int64_t d) {
    vfloat s = vzero();
    int64_t e = 0;
    for (; e + 16 <= d; e += 16) s = vfmadd(vload(q + e), vload(row + e), s);
    if (e < d) {
        const __mmask16 m = tail_mask(d - e);
        s = vfmadd(_mm512_maskz_loadu_ps(m, q + e), _mm512_maskz_loadu_ps(m, row + e), s);
    }
    return s;
}

/* [sum of v[0], ..., sum of v[15]]: pairs of registers interleaved and added, halving the
 * registers and doubling the keys each one holds, four times. */
static inline vfloat lane_sums(const vfloat *v) {
    vfloat t[8], w[4];
    for (int i = 0; i < 8; i++)  /* 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* 128-bit lane L: the four keys 4i..4i+3 summed over L */
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const vfloat x = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const vfloat y = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}
#else
#define VLANES 8
typedef __m256 vfloat;
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vfmadd _mm256_fmadd_ps
#define vmul _mm256_mul_ps
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps

static inline vfloat lane_products(const float *q, const float *row, int64_t d) {
    vfloat s = vzero();
    int64_t e = 0;
    for (; e + 8 <= d; e += 8) s = vfmadd(vload(q + e), vload(row + e), s);
    if (e < d) {  /* the last d % 8 inputs summed into lane 0 */
        float rest = 0.0f;
        for (; e < d; e++) rest += q[e] * row[e];
        s = _mm256_add_ps(s, _mm256_setr_ps(rest, 0, 0, 0, 0, 0, 0, 0));
    }
    return s;
}

/* [sum of v[0], ..., sum of v[7]], as for AVX-512 with one 128-bit step fewer. */
static inline vfloat lane_sums(const vfloat *v) {
    vfloat t[4], w[2];
    for (int i = 0; i < 4; i++)
        t[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        w[i] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_permute2f128_ps(w[0], w[1], 0x20), _mm256_permute2f128_ps(w[0], w[1], 0x31));
}
#endif

static inline void dots(const float *q, const float *const *rows, int64_t n, int64_t d, float scale, float *s) {
    const vfloat vscale = vset1(scale);
    for (int64_t j0 = 0; j0 < n; j0 += VLANES) {
        vfloat v[VLANES];
        float part[VLANES];
        for (int j = 0; j < VLANES; j++)  /* keys past n repeat the last one; their sums are dropped */
            v[j] = lane_products(q, rows[j0 + j < n ? j0 + j : n - 1], d);
        const vfloat sums = vmul(lane_sums(v), vscale);
        if (j0 + VLANES <= n) {
            vstore(s + j0, sums);
        } else {
            vstore(part, sums);
            for (int64_t j = j0; j < n; j++) s[j] = part[j - j0];
        }
    }
}

/* add_rows over acc[e .. e + 4 VLANES): four registers of the output row kept over the n keys. */
static inline void add_rows_block(float *acc, const float *p, const float *const *rows, int64_t n, int64_t e) {
    vfloat a0 = vload(acc + e), a1 = vload(acc + e + VLANES);
    vfloat a2 = vload(acc + e + 2 * VLANES), a3 = vload(acc + e + 3 * VLANES);
    for (int64_t j = 0; j < n; j++) {
        const vfloat pj = vset1(p[j]);
        const float *r = rows[j] + e;
        a0 = vfmadd(pj, vload(r), a0);
        a1 = vfmadd(pj, vload(r + VLANES), a1);
        a2 = vfmadd(pj, vload(r + 2 * VLANES), a2);
        a3 = vfmadd(pj, vload(r + 3 * VLANES), a3);
    }
    vstore(acc + e, a0);
    vstore(acc + e + VLANES, a1);
    vstore(acc + e + 2 * VLANES, a2);
    vstore(acc + e + 3 * VLANES, a3);
}

static inline void add_rows(float *acc, const float *p, const float *const *rows, int64_t n, int64_t d) {
    int64_t e = 0;
    for (; e + 4 * VLANES <= d; e += 4 * VLANES) add_rows_block(acc, p, rows, n, e);
#if defined(__AVX512F__)
    for (; e < d; e += 16) {  /* the tail, 16 lanes at a time under a mask */
        const __mmask16 m = tail_mask(d - e);
        __m512 a0 = _mm512_maskz_loadu_ps(m, acc + e);
        for (int64_t j = 0; j < n; j++)
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, rows[j] + e), a0);
        _mm512_mask_storeu_ps(acc + e, m, a0);
    }
#else
    for (; e + 8 <= d; e += 8) {  /* the tail: 8 lanes, then one by one */
        __m256 a0 = _mm256_loadu_ps(acc + e);
        for (int64_t j = 0; j < n; j++)
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(rows[j] + e), a0);
        _mm256_storeu_ps(acc + e, a0);
    }
    for (; e < d; e++)
        for (int64_t j = 0; j < n; j++) acc[e] += p[j] * rows[j][e];
#endif
}
#else
static inline void dots(const float *q, const float *const *rows, int64_t n, int64_t d, float scale, float *s) {
    for (int64_t j = 0; j < n; j++) {
        const float *r = rows[j];
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t e = 0; e < d; e++) total += q[e] * r[e];
        s[j] = total * scale;
    }
}

static inline void add_rows(float *acc, const float *p, const float *const *rows, int64_t n, int64_t d) {
    for (int64_t j = 0; j < n; j++) {
        const float pj = p[j], *r = rows[j];
#pragma omp simd
        for (int64_t e = 0; e < d; e++) acc[e] += pj * r[e];
    }
}
#endif

/* A softmax partial of nh query heads: acc [nh][d] (the unnormalized weighted sum of value rows),
 * max [nh], total [nh] (the sum of the weights, each exp(score - max)). */
typedef struct {
    float *acc, *max, *total;
} partial;

/* The partial of keys [lo, hi] (inclusive, within one segment) for q [nh][d], the heads that share
 * key / value head `head`: chunks of KEY_CHUNK keys aligned to absolute positions, each key and
 * value row read once for the nh heads. */
static __attribute__((noinline)) void attend_segment(const float *q, int nh, const kv_view *kv, int64_t head,
                                                     int64_t lo, int64_t hi, float scale, partial out) {
    const int64_t d = kv->d;
    float s[GROUP_MAX][KEY_CHUNK];
    const float *rows[KEY_CHUNK];
    for (int r = 0; r < nh; r++) {
        out.max[r] = NO_KEY;
        out.total[r] = 0.0f;
        memset(out.acc + r * d, 0, sizeof(float) * d);
    }
    for (int64_t c0 = lo - lo % KEY_CHUNK; c0 <= hi; c0 += KEY_CHUNK) {
        const int64_t j0 = c0 > lo ? c0 : lo, j1 = c0 + KEY_CHUNK - 1 < hi ? c0 + KEY_CHUNK - 1 : hi;
        const int64_t n = j1 - j0 + 1;
        for (int64_t j = 0; j < n; j++) rows[j] = kv_row(kv, kv->k_cache, j0 + j, head);
        for (int r = 0; r < nh; r++) dots(q + r * d, rows, n, d, scale, s[r]);
        for (int r = 0; r < nh; r++) {
            float chunk_max = NO_KEY;
            for (int64_t j = 0; j < n; j++) chunk_max = s[r][j] > chunk_max ? s[r][j] : chunk_max;
            const float new_max = chunk_max > out.max[r] ? chunk_max : out.max[r];
            const float alpha = out.max[r] == NO_KEY ? 0.0f : tm_expf(out.max[r] - new_max);
            float *acc = out.acc + r * d;
            out.total[r] *= alpha;
#pragma omp simd
            for (int64_t e = 0; e < d; e++) acc[e] *= alpha;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) s[r][j] = tm_expf(s[r][j] - new_max);
            out.max[r] = new_max;
        }
        for (int64_t j = 0; j < n; j++) rows[j] = kv_row(kv, kv->v_cache, j0 + j, head);
        for (int r = 0; r < nh; r++) {
            for (int64_t j = 0; j < n; j++) out.total[r] += s[r][j];
            add_rows(out.acc + r * d, s[r], rows, n, d);
        }
    }
}

/* into = into (+) from: the partial of both key ranges (into's keys come first). */
static __attribute__((noinline)) void merge_partial(partial into, partial from, int nh, int64_t d) {
    for (int r = 0; r < nh; r++) {
        const float m = from.max[r] > into.max[r] ? from.max[r] : into.max[r];
        const float a = into.max[r] == NO_KEY ? 0.0f : tm_expf(into.max[r] - m);
        const float b = from.max[r] == NO_KEY ? 0.0f : tm_expf(from.max[r] - m);
        float *acc = into.acc + r * d;
        const float *other = from.acc + r * d;
        into.total[r] = into.total[r] * a + from.total[r] * b;
        into.max[r] = m;
#pragma omp simd
        for (int64_t e = 0; e < d; e++) acc[e] = acc[e] * a + other[e] * b;
    }
}

static void normalize(partial p, int nh, int64_t d, float *out) {
    for (int r = 0; r < nh; r++) {
        const float inv = 1.0f / p.total[r];
#pragma omp simd
        for (int64_t e = 0; e < d; e++) out[r * d + e] = p.acc[r * d + e] * inv;
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
    int64_t parts;          /* head groups a row's heads are attended in: kvh x ceil(group / GROUP_MAX) */
    int64_t max_segments;   /* split work: task slots per (row, part) */
    float *partials;        /* split work: [rows x parts][max_segments] partials of PARTIAL_FLOATS(d) */
} attention_job;

#define PARTIAL_FLOATS(d) (GROUP_MAX * ((d) + 2))

/* What (row, part) attends: part p of a row is GROUP_MAX query heads (fewer at a group's end) of
 * one key / value head. */
typedef struct {
    int nh;
    int64_t kv_head, first_head, lo, pos;  /* pos < 0: no key to attend (not a row the runner makes) */
    kv_view kv;
    const float *q;
    float *out;
} row_part;

static row_part row_part_of(const attention_job *jb, int64_t pair) {
    const int64_t per_kv = (jb->group + GROUP_MAX - 1) / GROUP_MAX;
    const int64_t i = pair / jb->parts, kv_head = (pair % jb->parts) / per_kv, part = pair % per_kv;
    const int64_t j = jb->seq_of[i];
    row_part rp;
    rp.kv_head = kv_head;
    rp.first_head = kv_head * jb->group + part * GROUP_MAX;
    rp.nh = (int)(jb->group - part * GROUP_MAX < GROUP_MAX ? jb->group - part * GROUP_MAX : GROUP_MAX);
    rp.pos = jb->seq_lens[j] - (jb->query_start[j + 1] - i);
    rp.lo = jb->window > 0 && rp.pos - jb->window + 1 > 0 ? rp.pos - jb->window + 1 : 0;
    rp.kv = (kv_view){jb->k_cache, jb->v_cache, jb->block_tables + j * jb->bt_stride, jb->block_shift, jb->kvh,
                      jb->d};
    rp.q = jb->q + i * jb->ldq + rp.first_head * jb->d;
    rp.out = jb->out + i * jb->ldo + rp.first_head * jb->d;
    return rp;
}

/* Keys of segment k of the row part (k counted from the segment holding lo): [*from, *to]. */
static inline void segment_keys(const row_part *rp, int64_t k, int64_t *from, int64_t *to) {
    const int64_t start = (rp->lo / SEGMENT + k) * SEGMENT;
    *from = start > rp->lo ? start : rp->lo;
    *to = start + SEGMENT - 1 < rp->pos ? start + SEGMENT - 1 : rp->pos;
}

static inline int64_t segments_of(const row_part *rp) {
    return rp->pos < 0 ? 0 : rp->pos / SEGMENT - rp->lo / SEGMENT + 1;
}

static inline partial partial_at(float *base, int64_t d) {
    return (partial){base, base + GROUP_MAX * d, base + GROUP_MAX * d + GROUP_MAX};
}

/* Task `pair` = row x parts + part: the row part's segments in order, merged as they come. */
static void row_part_task(void *arg, int64_t pair) {
    const attention_job *jb = (const attention_job *)arg;
    const row_part rp = row_part_of(jb, pair);
    const int64_t d = jb->d, count = segments_of(&rp);
    if (count == 0) {
        memset(rp.out, 0, sizeof(float) * d * rp.nh);
        return;
    }
    float running_buf[PARTIAL_FLOATS(MAX_HEAD_DIM)], segment_buf[PARTIAL_FLOATS(MAX_HEAD_DIM)];
    const partial running = partial_at(running_buf, d), segment = partial_at(segment_buf, d);
    for (int64_t k = 0; k < count; k++) {
        int64_t from, to;
        segment_keys(&rp, k, &from, &to);
        attend_segment(rp.q, rp.nh, &rp.kv, rp.kv_head, from, to, jb->scale, k ? segment : running);
        if (k) merge_partial(running, segment, rp.nh, d);
    }
    normalize(running, rp.nh, d, rp.out);
}

/* Task `item` = pair x max_segments + k: segment k of the row part into its partial slot. */
static void segment_task(void *arg, int64_t item) {
    const attention_job *jb = (const attention_job *)arg;
    const int64_t pair = item / jb->max_segments, k = item % jb->max_segments;
    const row_part rp = row_part_of(jb, pair);
    if (k >= segments_of(&rp)) return;
    int64_t from, to;
    segment_keys(&rp, k, &from, &to);
    const partial out = partial_at(jb->partials + item * PARTIAL_FLOATS(jb->d), jb->d);
    attend_segment(rp.q, rp.nh, &rp.kv, rp.kv_head, from, to, jb->scale, out);
}

/* After the segment tasks: each row part's partials merged in order, as row_part_task does. */
static void merge_segments(const attention_job *jb, int64_t pairs) {
    const int64_t d = jb->d;
    for (int64_t pair = 0; pair < pairs; pair++) {
        const row_part rp = row_part_of(jb, pair);
        const int64_t count = segments_of(&rp);
        if (count == 0) {
            memset(rp.out, 0, sizeof(float) * d * rp.nh);
            continue;
        }
        float *first = jb->partials + pair * jb->max_segments * PARTIAL_FLOATS(d);
        const partial running = partial_at(first, d);
        for (int64_t k = 1; k < count; k++)
            merge_partial(running, partial_at(first + k * PARTIAL_FLOATS(d), d), rp.nh, d);
        normalize(running, rp.nh, d, rp.out);
    }
}

/* Write the step's new keys and values into their cache slots (slot < 0: padding, skipped), then
 * attend every query row over its sequence's cached keys.
 *   q [t][h * d] (ldq), k and v [t][kvh * d] (ldk, ldv); cache [num_blocks][block_size][kvh][d]
 *   slots [t]; seq_lens [s]: tokens of each sequence after the step; query_start [s + 1]: its rows;
 *   block_tables [s][bt_stride]; block_size a power of two; window > 0: keys at positions > p - window
 *   only; out [t][h * d] (ldo). d <= MAX_HEAD_DIM.
 * Query row i of sequence j sits at position seq_lens[j] - (query_start[j + 1] - i).
 * Scratch: the calling thread's slots 3 (row -> sequence) and 8 (split work's partials). */
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
    int64_t work = 0, longest = 0;
    for (int64_t j = 0; j < nseqs; j++) {
        for (int64_t i = query_start[j]; i < query_start[j + 1]; i++) seq_of[i] = (int32_t)j;
        work += (int64_t)(query_start[j + 1] - query_start[j]) * seq_lens[j];
        longest = seq_lens[j] > longest ? seq_lens[j] : longest;
    }
    int64_t shift = 0;
    while (((int64_t)1 << shift) < block_size) shift++;
    const int64_t group = h / kvh, parts = kvh * ((group + GROUP_MAX - 1) / GROUP_MAX), pairs = ntokens * parts;
    attention_job job = {q, ldq, k_cache, v_cache, seq_lens, query_start, block_tables, bt_stride, seq_of, h,
                         group, kvh, d, shift, scale, window, out, ldo, parts, 0, NULL};
    const int threads = work * h * d >= ATTN_PAR_MIN ? nthreads : 1;
    if (threads == 1 || pairs >= SPLIT_BELOW * threads) {
        tm_parallel(pairs, row_part_task, &job, threads);
        return;
    }
    /* a window bounds a row's keys too, but a few rows' longest span is a fine bound of the slots */
    job.max_segments = longest / SEGMENT + 1;
    job.partials = (float *)tm_scratch(sizeof(float) * (size_t)(pairs * job.max_segments * PARTIAL_FLOATS(d)), 8);
    tm_parallel(pairs * job.max_segments, segment_task, &job, threads);
    merge_segments(&job, pairs);
}
