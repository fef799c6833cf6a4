/* Shared by the C files lifecycle compiles on first use (serve/native_step.c, training/kernels.c; serve/native.py
   builds them with this directory on the include path and this file in each build's digest): 16-float vectors in
   GCC's vector extensions, lowered to AVX-512, AVX2 or SSE by -march=native, and an exp that vectorizes. */
#ifndef LIFECYCLE_VECTORS_H
#define LIFECYCLE_VECTORS_H

#include <math.h>
#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t i32x16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 v) { *(v16u *)p = v; }

/* exp(x): Cephes' single-precision polynomial, written so the loops calling it vectorize; x below -87.3 (a masked
   column) gives 0 */
static inline float exp_(float x) {
    float z = x < -87.3f ? -87.3f : x > 88.7f ? 88.7f : x; /* not fminf/fmaxf: those stay libm calls */
    float k = rintf(z * 1.44269504088896341f);
    float r = z - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    float e = p * r * r + r + 1.f;
    union { int32_t i; float f; } two = {.i = ((int32_t)k + 127) << 23};
    return x < -87.3f ? 0.f : e * two.f;
}

#endif
