/*
 * simd.h — dot products and conversions, the engine's innermost loops. The kernel set is
 * chosen once at run time (AVX2+FMA+F16C on x86-64 when the CPU has it, NEON on aarch64,
 * scalar otherwise); every kernel gives the same result as the scalar one up to float
 * rounding.
 */
#ifndef KVT_SIMD_H
#define KVT_SIMD_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvt_kernels {
    const char *name;
    float (*dot_f32)(const float *a, const float *b, size_t n);
    float (*dot_f16_f32)(const uint16_t *a, const float *b, size_t n);
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);
} kvt_kernels;

/* The kernels for this CPU (resolved on first use; thread-safe). */
const kvt_kernels *kvt_simd(void);
/* A kernel set by name ("scalar", "avx2", "neon", "neon-fp16") if this build and CPU have it,
 * else NULL. */
const kvt_kernels *kvt_simd_named(const char *name);

/* Scalar IEEE half <-> float conversions (round to nearest even). */
float kvt_half_to_float(uint16_t h);
uint16_t kvt_float_to_half(float f);

/* Dot product of a key stored in `dtype` (enum kvt_dtype) with a float32 vector. */
static inline float kvt_dot_key(const kvt_kernels *k, int dtype, const void *key, const float *q, size_t n) {
    return dtype ? k->dot_f16_f32((const uint16_t *)key, q, n) : k->dot_f32((const float *)key, q, n);
}

#endif
