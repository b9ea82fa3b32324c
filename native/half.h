/* Half-precision conversions and the CPU-dispatch attribute shared by the numeric kernels
 * (reduce.c, rows.c). float32 -> float16/bfloat16 rounds to nearest even, as torch and numpy do.
 * On x86-64 with AVX2 and F16C (cm_half_simd()), the same conversions 8 at a time, to the same bits
 * (the widening is exact; the narrowing rounds to nearest even and quiets NaNs as the scalar ones). */
#ifndef COMMS_HALF_H
#define COMMS_HALF_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CM_CLONES
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__FLT16_MAX__)
static inline float f16_to_f32(uint16_t h) { _Float16 x; memcpy(&x, &h, 2); return (float)x; }
static inline uint16_t f32_to_f16(float f) { _Float16 x = (_Float16)f; uint16_t h; memcpy(&h, &x, 2); return h; }
#else
#error "comms needs a compiler with _Float16 (gcc >= 12 or clang >= 15)"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define CM_HALF_SIMD 1
#define CM_F16C __attribute__((target("avx2,f16c")))

static inline int cm_half_simd(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

CM_F16C static inline __m256 half8_load(const uint16_t *p, int bf) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

CM_F16C static inline void half8_store(uint16_t *p, __m256 v, int bf) {
    __m128i h;
    if (bf) {                     /* f32_to_bf16, lane by lane */
        __m256i u = _mm256_castps_si256(v);
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
        r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
        r = _mm256_srli_epi32(r, 16);
        h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm_storeu_si128((__m128i *)p, h);
}
#endif

#endif
