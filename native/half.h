/* Half-precision conversions and the CPU-dispatch attribute shared by the numeric kernels
 * (reduce.c, rows.c). float32 -> float16/bfloat16 rounds to nearest even, as torch and numpy do. */
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

#endif
