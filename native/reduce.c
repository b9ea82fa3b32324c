/* Reduction kernels: dst = dst op src, element-wise, for every dtype and op comms supports.
 *
 * float16 and bfloat16 are widened to float32, combined, and rounded back (round to nearest even);
 * cm_reduce_slots accumulates all of its inputs in float32 and rounds once, in a fixed order
 * (slot 0, 1, 2, ...), so every rank that reduces the same inputs gets the same bits.
 * Integer SUM and PROD wrap around (computed in unsigned arithmetic). MIN and MAX propagate NaN.
 * Bool is stored as one byte 0/1: SUM and MAX are OR, PROD and MIN are AND.
 * comms/_reference.py holds the numpy twin of these kernels behind the same signature.
 */
#include <string.h>
#include <stdlib.h>
#include "comms_native.h"
#include "half.h"


size_t cm_dtype_size(int dtype) {
    switch (dtype) {
    case CM_F16: case CM_BF16: return 2;
    case CM_F32: case CM_I32: return 4;
    case CM_F64: case CM_I64: return 8;
    case CM_I8: case CM_U8: case CM_BOOL: return 1;
    default: return 0;
    }
}


#define F_SUM(a, b) ((a) + (b))
#define F_PROD(a, b) ((a) * (b))
#define F_MIN(a, b) ((a) != (a) ? (a) : ((b) != (b) ? (b) : ((b) < (a) ? (b) : (a))))
#define F_MAX(a, b) ((a) != (a) ? (a) : ((b) != (b) ? (b) : ((b) > (a) ? (b) : (a))))
#define I_MIN(a, b) ((b) < (a) ? (b) : (a))
#define I_MAX(a, b) ((b) > (a) ? (b) : (a))
#define B_AND(a, b) ((a) & (b))
#define B_OR(a, b) ((a) | (b))
#define B_XOR(a, b) ((a) ^ (b))

/* one kernel per (type, op); U is the unsigned type used for wrapping SUM/PROD */
#define KERNEL(name, T, EXPR)                                                                  \
    CM_CLONES static void name(void *restrict dst_, const void *restrict src_, size_t n) {      \
        T *restrict d = (T *)dst_;                                                             \
        const T *restrict s = (const T *)src_;                                                 \
        for (size_t i = 0; i < n; i++) { T a = d[i], b = s[i]; d[i] = EXPR; }                  \
    }

#define FLOAT_KERNELS(P, T)                                                                    \
    KERNEL(P##_sum, T, F_SUM(a, b)) KERNEL(P##_prod, T, F_PROD(a, b))                          \
    KERNEL(P##_min, T, F_MIN(a, b)) KERNEL(P##_max, T, F_MAX(a, b))

#define INT_KERNELS(P, T, U)                                                                   \
    KERNEL(P##_sum, T, (T)((U)a + (U)b)) KERNEL(P##_prod, T, (T)((U)a * (U)b))                  \
    KERNEL(P##_min, T, I_MIN(a, b)) KERNEL(P##_max, T, I_MAX(a, b))                            \
    KERNEL(P##_band, T, B_AND(a, b)) KERNEL(P##_bor, T, B_OR(a, b)) KERNEL(P##_bxor, T, B_XOR(a, b))

FLOAT_KERNELS(f32, float)
FLOAT_KERNELS(f64, double)
INT_KERNELS(i8, int8_t, uint8_t)
INT_KERNELS(u8, uint8_t, uint8_t)
INT_KERNELS(i32, int32_t, uint32_t)
INT_KERNELS(i64, int64_t, uint64_t)
KERNEL(bool_or, uint8_t, (uint8_t)((a | b) != 0))
KERNEL(bool_and, uint8_t, (uint8_t)((a & b) != 0))
KERNEL(bool_xor, uint8_t, (uint8_t)((a ^ b) != 0))

#ifdef CM_HALF_SIMD
/* 8 elements at a time: the scalar kernels' float32 ops, F_MIN/F_MAX's NaN rules included (a NaN
 * a wins, then a NaN b, then the smaller or larger), so the same values; which payload a NaN op
 * NaN keeps follows the operand order, which C leaves to the compiler in the scalar loop. */
CM_F16C static inline __m256 op8(__m256 a, __m256 b, int op) {
    if (op == CM_SUM) return _mm256_add_ps(a, b);
    if (op == CM_PROD) return _mm256_mul_ps(a, b);
    __m256 b_wins = op == CM_MIN ? _mm256_cmp_ps(b, a, _CMP_LT_OQ) : _mm256_cmp_ps(b, a, _CMP_GT_OQ);
    __m256 r = _mm256_blendv_ps(a, b, b_wins);
    r = _mm256_blendv_ps(r, b, _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    return _mm256_blendv_ps(r, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}

/* d = d op s over the first multiple of 8 of n elements; returns how many it did */
CM_F16C static size_t half_simd(uint16_t *d, const uint16_t *s, size_t n, int bf, int op) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) half8_store(d + i, op8(half8_load(d + i, bf), half8_load(s + i, bf), op), bf);
    return i;
}
#define HALF_SIMD(d, s, n, bf, op) (cm_half_simd() ? half_simd(d, s, n, bf, op) : 0)
#else
#define HALF_SIMD(d, s, n, bf, op) 0
#endif

/* half types: widen, combine in float32, round back (8 at a time where the CPU can: SUM of 16 Mi
 * random elements 4.3-4.4 ms for float16 and 8.4-9.4 ms for bfloat16, against 20.8 and 13.7 ms for
 * the loop below alone, which gcc vectorizes for bfloat16 but not for float16) */
#define HALF_KERNEL(name, TO_F, FROM_F, EXPR, BF, OP)                                          \
    CM_CLONES static void name(void *restrict dst_, const void *restrict src_, size_t n) {      \
        uint16_t *restrict d = (uint16_t *)dst_;                                               \
        const uint16_t *restrict s = (const uint16_t *)src_;                                   \
        for (size_t i = HALF_SIMD(d, s, n, BF, OP); i < n; i++) {                               \
            float a = TO_F(d[i]), b = TO_F(s[i]);                                              \
            d[i] = FROM_F(EXPR);                                                               \
        }                                                                                      \
    }

HALF_KERNEL(f16_sum, f16_to_f32, f32_to_f16, F_SUM(a, b), 0, CM_SUM)
HALF_KERNEL(f16_prod, f16_to_f32, f32_to_f16, F_PROD(a, b), 0, CM_PROD)
HALF_KERNEL(f16_min, f16_to_f32, f32_to_f16, F_MIN(a, b), 0, CM_MIN)
HALF_KERNEL(f16_max, f16_to_f32, f32_to_f16, F_MAX(a, b), 0, CM_MAX)
HALF_KERNEL(bf16_sum, bf16_to_f32, f32_to_bf16, F_SUM(a, b), 1, CM_SUM)
HALF_KERNEL(bf16_prod, bf16_to_f32, f32_to_bf16, F_PROD(a, b), 1, CM_PROD)
HALF_KERNEL(bf16_min, bf16_to_f32, f32_to_bf16, F_MIN(a, b), 1, CM_MIN)
HALF_KERNEL(bf16_max, bf16_to_f32, f32_to_bf16, F_MAX(a, b), 1, CM_MAX)

typedef void (*kernel_fn)(void *restrict, const void *restrict, size_t);

static kernel_fn kernel_for(int dtype, int op) {
#define ROW(P) { P##_sum, P##_prod, P##_min, P##_max, NULL, NULL, NULL }
#define IROW(P) { P##_sum, P##_prod, P##_min, P##_max, P##_band, P##_bor, P##_bxor }
    static const kernel_fn table[CM_NDTYPES][CM_NOPS] = {
        [CM_F16] = ROW(f16), [CM_BF16] = ROW(bf16), [CM_F32] = ROW(f32), [CM_F64] = ROW(f64),
        [CM_I8] = IROW(i8), [CM_U8] = IROW(u8), [CM_I32] = IROW(i32), [CM_I64] = IROW(i64),
        [CM_BOOL] = { bool_or, bool_and, bool_and, bool_or, bool_and, bool_or, bool_xor },
    };
#undef ROW
#undef IROW
    if (dtype < 0 || dtype >= CM_NDTYPES || op < 0 || op >= CM_NOPS) return NULL;
    return table[dtype][op];
}

int cm_reduce(void *dst, const void *src, size_t count, int dtype, int op) {
    kernel_fn k = kernel_for(dtype, op);
    if (!k) return CM_E_INVALID;
    if (count) k(dst, src, count);
    return CM_OK;
}

/* float32 accumulation of half types over many inputs, in blocks that stay in L1 */
#define HALF_SLOTS_BLOCK 512
#ifdef CM_HALF_SIMD
/* the same, 8 elements at a time held in a register through every slot; returns how many it did */
CM_F16C static size_t half_slots_simd(uint16_t *dst, const char *base, size_t stride, int nslots, size_t n,
                                      int bf, int op) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 acc = half8_load((const uint16_t *)base + i, bf);
        for (int k = 1; k < nslots; k++)
            acc = op8(acc, half8_load((const uint16_t *)(base + (size_t)k * stride) + i, bf), op);
        half8_store(dst + i, acc, bf);
    }
    return i;
}
#endif
CM_CLONES static void half_slots(uint16_t *dst, const char *base, size_t stride, int nslots, size_t n,
                                 int bf, int op) {
    float acc[HALF_SLOTS_BLOCK];
    size_t i0 = 0;
#ifdef CM_HALF_SIMD
    if (cm_half_simd()) i0 = half_slots_simd(dst, base, stride, nslots, n, bf, op);
#endif
    for (; i0 < n; i0 += HALF_SLOTS_BLOCK) {
        size_t m = n - i0 < HALF_SLOTS_BLOCK ? n - i0 : HALF_SLOTS_BLOCK;
        const uint16_t *s0 = (const uint16_t *)base + i0;
        for (size_t i = 0; i < m; i++) acc[i] = bf ? bf16_to_f32(s0[i]) : f16_to_f32(s0[i]);
        for (int k = 1; k < nslots; k++) {
            const uint16_t *s = (const uint16_t *)(base + (size_t)k * stride) + i0;
            for (size_t i = 0; i < m; i++) {
                float a = acc[i], b = bf ? bf16_to_f32(s[i]) : f16_to_f32(s[i]);
                switch (op) {
                case CM_SUM: acc[i] = F_SUM(a, b); break;
                case CM_PROD: acc[i] = F_PROD(a, b); break;
                case CM_MIN: acc[i] = F_MIN(a, b); break;
                default: acc[i] = F_MAX(a, b); break;
                }
            }
        }
        for (size_t i = 0; i < m; i++) dst[i0 + i] = bf ? f32_to_bf16(acc[i]) : f32_to_f16(acc[i]);
    }
}

int cm_reduce_slots(void *dst, const void *base, size_t stride, int nslots, size_t count, int dtype, int op) {
    kernel_fn k = kernel_for(dtype, op);
    if (!k || nslots < 1) return CM_E_INVALID;
    if (!count) return CM_OK;
    if ((dtype == CM_F16 || dtype == CM_BF16) && nslots > 1) {
        half_slots((uint16_t *)dst, (const char *)base, stride, nslots, count, dtype == CM_BF16, op);
        return CM_OK;
    }
    size_t bytes = count * cm_dtype_size(dtype);
    if (dst != base) memmove(dst, base, bytes);
    for (int s = 1; s < nslots; s++) k(dst, (const char *)base + (size_t)s * stride, count);
    return CM_OK;
}

int cm_div(void *buf, size_t count, int dtype, int64_t divisor) {
    if (divisor == 0) return CM_E_INVALID;
    switch (dtype) {
    case CM_F32: { float *p = buf; float d = (float)divisor; for (size_t i = 0; i < count; i++) p[i] /= d; break; }
    case CM_F64: { double *p = buf; double d = (double)divisor; for (size_t i = 0; i < count; i++) p[i] /= d; break; }
    case CM_F16: { uint16_t *p = buf; for (size_t i = 0; i < count; i++) p[i] = f32_to_f16(f16_to_f32(p[i]) / (float)divisor); break; }
    case CM_BF16: { uint16_t *p = buf; for (size_t i = 0; i < count; i++) p[i] = f32_to_bf16(bf16_to_f32(p[i]) / (float)divisor); break; }
    default: return CM_E_INVALID;
    }
    return CM_OK;
}
