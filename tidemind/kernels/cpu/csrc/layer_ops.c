/* The small ops of a decoder layer (RMS norms, rotary embedding, gated activations), in float32
 * (attention is attention.c). Plain C that the compiler vectorizes for each instruction
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
#include "tm_math.h"

#define PAR_MIN (1 << 18)

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

/* ------------------------------------------------------------------ greedy choice */

/* out[i] = the index of row i's largest value, the first one on ties, as torch.argmax answers
 * (a NaN counts as the largest: the first NaN's index). x [m][n] (row stride ldx). Rows are tasks
 * of the pool (pool.c) when the call holds PAR_MIN values or more. */
typedef struct {
    const float *x;
    int64_t ldx, n;
    int64_t *out;
} argmax_job;

static void argmax_task(void *arg, int64_t i) {
    const argmax_job *jb = (const argmax_job *)arg;
    const float *x = jb->x + i * jb->ldx;
    const int64_t n = jb->n;
    float best = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
    for (int64_t j = 0; j < n; j++) {
        best = x[j] > best ? x[j] : best;
        nan |= x[j] != x[j];
    }
    int64_t found = 0;
    for (int64_t j = 0; j < n; j++) {
        if (nan ? x[j] != x[j] : x[j] == best) {
            found = j;
            break;
        }
    }
    jb->out[i] = found;
}

void TM_FN(tm_argmax_rows)(const float *x, int64_t ldx, int64_t m, int64_t n, int64_t *out, int nthreads) {
    argmax_job job = {x, ldx, n, out};
    tm_parallel(m, argmax_task, &job, m * n >= PAR_MIN ? nthreads : 1);
}
