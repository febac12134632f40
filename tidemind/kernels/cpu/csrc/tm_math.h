/* Scalar math the per-ISA kernel files share, written so that loops over it vectorize. */
#ifndef TM_MATH_H
#define TM_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

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

#endif
