/*
 * simd.c — runtime-dispatched dot-product kernels.
 *
 * Invariants:
 * 1. The scalar kernels are always compiled and define the reference result.
 * 2. SIMD kernels are compiled with per-function target attributes, so the rest of the engine
 *    is built for the baseline ISA and runs on any CPU of the architecture.
 * 3. The choice is made once (pthread_once) and never changes for the life of the process;
 *    KVTIER_SIMD=scalar in the environment forces the scalar set (for tests), and
 *    KVTIER_SIMD=<name> asks for another compiled-in set by name (a one-line warning on
 *    stderr when this build or CPU lacks it; kvt_simd_kernel() tells what runs).
 * 4. The fp16-arithmetic set "neon-fp16" exists only in builds whose target has ARMv8.2-A
 *    FP16 vector arithmetic (e.g. -march=armv8.2-a+fp16) and is never chosen by default: it
 *    is less precise than the scalar reference (bound below), so it is opt-in.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

float kvt_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            man &= 0x3FF;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t kvt_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xFF, man = x & 0x7FFFFF;
    if (exp == 0xFF) return (uint16_t)(sign | 0x7C00 | (man ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7C00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e), half = man >> shift, rem = man & ((1u << shift) - 1),
                 mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
}

static float dot_f32_scalar(const float *a, const float *b, size_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static float dot_f16_f32_scalar(const uint16_t *a, const float *b, size_t n) {
    float s = 0;
    for (size_t i = 0; i < n; i++) s += kvt_half_to_float(a[i]) * b[i];
    return s;
}

static void f16_to_f32_scalar(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = kvt_half_to_float(src[i]);
}

static const kvt_kernels scalar_kernels = {"scalar", dot_f32_scalar, dot_f16_f32_scalar, f16_to_f32_scalar};

#if defined(__x86_64__) && !defined(KVT_NO_AVX2)
#include <cpuid.h>
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

AVX2 static float dot_f32_avx2(const float *a, const float *b, size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AVX2 static float dot_f16_f32_avx2(const uint16_t *a, const float *b, size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i)));
        __m256 a1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i + 8)));
        s0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 a0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a + i)));
        s0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b + i), s0);
    }
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += kvt_half_to_float(a[i]) * b[i];
    return s;
}

AVX2 static void f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = kvt_half_to_float(src[i]);
}

static const kvt_kernels avx2_kernels = {"avx2", dot_f32_avx2, dot_f16_f32_avx2, f16_to_f32_avx2};
#endif

#if defined(__aarch64__) && !defined(KVT_NO_NEON)
#include <arm_neon.h>
/* NEON is part of the aarch64 baseline, so these need no target attribute. fp16 is converted
 * to fp32 (vcvt_f32_f16) and accumulated in fp32, which every aarch64 core supports. */
static float dot_f32_neon(const float *a, const float *b, size_t n) {
    float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
static float dot_f16_f32_neon(const uint16_t *a, const float *b, size_t n) {
    float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(a + i));
        s0 = vfmaq_f32(s0, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vcvt_f32_f16(vget_high_f16(h)), vld1q_f32(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) s += kvt_half_to_float(a[i]) * b[i];
    return s;
}
static void f16_to_f32_neon(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
    for (; i < n; i++) dst[i] = kvt_half_to_float(src[i]);
}
static const kvt_kernels neon_kernels = {"neon", dot_f32_neon, dot_f16_f32_neon, f16_to_f32_neon};

#if defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
#ifdef __linux__
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10)
#endif
#endif
/* fp16 arithmetic: the query is rounded to fp16 and a[i]*q[i] is fused-multiply-added in
 * eight fp16 lanes over blocks of 32 elements (4 products per lane); each block's lanes are
 * widened to fp32 and summed in fp32. Precision, with u = 2^-11 (fp16 unit roundoff): query
 * rounding costs u*|a_i*b_i| per element and each of the <= 4 fp16 additions of a lane
 * u*|partial|, so |result - exact| <= 5u * sum|a_i*b_i| (about 2.4e-3 of the absolute mass,
 * against ~1e-7 for the fp32-accumulating kernels) plus about 2^-24*(1+|a_i|) per element for
 * values in fp16's subnormal range (|b_i| or |a_i*b_i| < 2^-14). A block whose fp16 partial
 * is not finite (a product or partial beyond 65504) is recomputed in fp32, so large values
 * cost time, not correctness. With an fp32 query the per-element work is the same as the fp32
 * kernel's (the query's conversion replaces the key's); the saving needs the query converted
 * once per search (see engine_c/README.md). */
#define KVT_F16_BLOCK 32
static float dot_f16_f32_neon_fp16(const uint16_t *a, const float *b, size_t n) {
    float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0);
    size_t i = 0;
    while (i + 8 <= n) {
        size_t end = i + KVT_F16_BLOCK <= n ? i + KVT_F16_BLOCK : i + (n - i) / 8 * 8;
        float16x8_t p = vdupq_n_f16(0);
        for (size_t j = i; j < end; j += 8) {
            float16x8_t q = vcombine_f16(vcvt_f16_f32(vld1q_f32(b + j)), vcvt_f16_f32(vld1q_f32(b + j + 4)));
            p = vfmaq_f16(p, vreinterpretq_f16_u16(vld1q_u16(a + j)), q);
        }
        float32x4_t lo = vcvt_f32_f16(vget_low_f16(p)), hi = vcvt_high_f32_f16(p);
        if (!(vmaxvq_f32(vmaxq_f32(vabsq_f32(lo), vabsq_f32(hi))) <= 65504.0f)) {
            lo = hi = vdupq_n_f32(0); /* overflow (or NaN input): this block in fp32 */
            for (size_t j = i; j < end; j += 8) {
                float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(a + j));
                lo = vfmaq_f32(lo, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(b + j));
                hi = vfmaq_f32(hi, vcvt_high_f32_f16(h), vld1q_f32(b + j + 4));
            }
        }
        s0 = vaddq_f32(s0, lo);
        s1 = vaddq_f32(s1, hi);
        i = end;
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; i++) s += kvt_half_to_float(a[i]) * b[i];
    return s;
}
static const kvt_kernels neon_fp16_kernels = {"neon-fp16", dot_f32_neon, dot_f16_f32_neon_fp16, f16_to_f32_neon};

static int cpu_has_fp16_arith(void) {
#ifdef __linux__
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDHP) != 0;
#else
    return 1; /* the build targets it; no portable run-time probe here */
#endif
}
#endif /* __ARM_FEATURE_FP16_VECTOR_ARITHMETIC */
#endif

#if defined(__x86_64__) && !defined(KVT_NO_AVX2)
/* F16C (CPUID.1:ECX bit 29). gcc's __builtin_cpu_supports knows it, clang's does not: the
 * bit is read directly there (the AVX2 check beside it covers the OS's saving of ymm). */
static int cpu_has_f16c(void) {
#ifdef __clang__
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
#else
    return __builtin_cpu_supports("f16c");
#endif
}
#endif

static const kvt_kernels *chosen = &scalar_kernels;
static pthread_once_t choose_once = PTHREAD_ONCE_INIT;

/* The kernel set called `name` if this build has it and this CPU runs it, else NULL. Lets
 * the tests compare every available set against the scalar reference. */
const kvt_kernels *kvt_simd_named(const char *name) {
    if (strcmp(name, "scalar") == 0) return &scalar_kernels;
#if defined(__x86_64__) && !defined(KVT_NO_AVX2)
    __builtin_cpu_init();
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c())
        return &avx2_kernels;
#endif
#if defined(__aarch64__) && !defined(KVT_NO_NEON)
    if (strcmp(name, "neon") == 0) return &neon_kernels;
#if defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
    if (strcmp(name, "neon-fp16") == 0 && cpu_has_fp16_arith()) return &neon_fp16_kernels;
#endif
#endif
    return NULL;
}

static void choose(void) {
#if defined(__x86_64__) && !defined(KVT_NO_AVX2)
    const char *best = "avx2";
#elif defined(__aarch64__) && !defined(KVT_NO_NEON)
    const char *best = "neon";
#else
    const char *best = "scalar";
#endif
    const kvt_kernels *k = kvt_simd_named(best);
    if (k) chosen = k;
    const char *force = getenv("KVTIER_SIMD");
    if (force && *force) {
        const kvt_kernels *f = kvt_simd_named(force);
        if (f)
            chosen = f;
        else
            (void)fprintf(stderr, "kvtier: KVTIER_SIMD=%s is not available in this build or CPU; using %s\n", force,
                          chosen->name);
    }
}

const kvt_kernels *kvt_simd(void) {
    pthread_once(&choose_once, choose);
    return chosen;
}

const char *kvt_simd_kernel(void) { return kvt_simd()->name; }
