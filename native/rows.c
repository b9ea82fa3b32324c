/* Rows of tokens for expert-parallel dispatch and combine on one host.
 *
 * cm_rows_write copies rows of this process's memory straight into another process's memory with
 * process_vm_writev (Linux cross-memory attach, CMA): one copy by the kernel, no staging buffer, no
 * shared segment. The rows are picked by index (a gather) and land contiguously at the remote
 * address; runs of consecutive indices travel as one iovec. The remote range must stay allocated
 * until the writer is done: the caller's protocol (an address exchange before, a barrier after)
 * guarantees it. cm_rows_read reads a remote range (used to probe whether CMA is permitted).
 * cm_cma_allow lets any process of this user attach (needed under Yama ptrace_scope = 1).
 *
 * cm_sum_rows is combine's reduction: out[t] = the sum of the rows listed for token t, widened to
 * float32, accumulated from 0 in the listed order, rounded once to the output dtype. It gives the
 * same bits as comms.moe.layout.sum_blocks (its torch reference): zeros for a token without rows.
 *
 * Every function returns CM_OK or a CM_E_* code (CM_E_PEER_DEAD when the other process is gone,
 * CM_E_SYS with errno set for any other system error: EPERM where attaching is not allowed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include "comms_native.h"
#include "half.h"

#define IOV_BATCH 1024          /* iovecs per process_vm_writev (the kernel's UIO_MAXIOV) */
#define SUM_BLOCK 1024          /* float32 accumulator elements kept in L1 */

int cm_cma_allow(void) {
#ifdef PR_SET_PTRACER
    if (prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0) != 0 && errno != EINVAL) return CM_E_SYS;
#endif
    return 0;
}

static int sys_error(void) { return errno == ESRCH ? CM_E_PEER_DEAD : CM_E_SYS; }

/* write every byte of lv[0..nl) to [raddr, ...) of pid, resuming after partial transfers */
static int write_all(pid_t pid, struct iovec *lv, int nl, uint64_t raddr) {
    uint64_t total = 0, done = 0;
    for (int i = 0; i < nl; i++) total += lv[i].iov_len;
    while (done < total) {
        struct iovec rv = {(void *)(uintptr_t)(raddr + done), (size_t)(total - done)};
        ssize_t n = process_vm_writev(pid, lv, (unsigned long)nl, &rv, 1, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return sys_error();
        }
        if (n == 0) { errno = EIO; return CM_E_SYS; }
        done += (uint64_t)n;
        while (n > 0 && nl > 0) {                     /* skip what went */
            if ((size_t)n >= lv->iov_len) { n -= (ssize_t)lv->iov_len; lv++; nl--; }
            else { lv->iov_base = (char *)lv->iov_base + n; lv->iov_len -= (size_t)n; n = 0; }
        }
    }
    return 0;
}

int cm_rows_write(int pid, const void *base, uint64_t row_bytes, const int64_t *idx, uint64_t n, uint64_t raddr) {
    struct iovec lv[IOV_BATCH];
    if (!n || !row_bytes) return 0;
    if (!idx) {
        lv[0].iov_base = (void *)base;
        lv[0].iov_len = (size_t)(n * row_bytes);
        return write_all(pid, lv, 1, raddr);
    }
    uint64_t i = 0, out = 0;
    while (i < n) {
        int nl = 0;
        uint64_t bytes = 0;
        while (i < n && nl < IOV_BATCH) {
            int64_t r = idx[i];
            uint64_t run = 1;
            if (r < 0) return CM_E_INVALID;
            while (i + run < n && idx[i + run] == r + (int64_t)run) run++;
            lv[nl].iov_base = (char *)base + (uint64_t)r * row_bytes;
            lv[nl].iov_len = (size_t)(run * row_bytes);
            nl++;
            bytes += run * row_bytes;
            i += run;
        }
        int rc = write_all(pid, lv, nl, raddr + out);
        if (rc) return rc;
        out += bytes;
    }
    return 0;
}

int cm_rows_read(int pid, void *dst, uint64_t raddr, uint64_t nbytes) {
    uint64_t done = 0;
    while (done < nbytes) {
        struct iovec lv = {(char *)dst + done, (size_t)(nbytes - done)};
        struct iovec rv = {(void *)(uintptr_t)(raddr + done), (size_t)(nbytes - done)};
        ssize_t n = process_vm_readv(pid, &lv, 1, &rv, 1, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return sys_error();
        }
        if (n == 0) { errno = EIO; return CM_E_SYS; }
        done += (uint64_t)n;
    }
    return 0;
}

/* one block of hidden channels [h0, h0 + m) of one token */
#define SUM_KERNEL(name, T, TO_F, FROM_F)                                                         \
    CM_CLONES static void name(T *restrict out, const uint64_t *rows, int64_t k0, int64_t k1,       \
                               uint64_t h0, uint64_t m) {                                         \
        float acc[SUM_BLOCK];                                                                     \
        for (uint64_t i = 0; i < m; i++) acc[i] = 0.0f;                                          \
        for (int64_t k = k0; k < k1; k++) {                                                       \
            const T *restrict s = (const T *)(uintptr_t)rows[k] + h0;                              \
            for (uint64_t i = 0; i < m; i++) acc[i] += TO_F(s[i]);                                \
        }                                                                                         \
        for (uint64_t i = 0; i < m; i++) out[h0 + i] = FROM_F(acc[i]);                            \
    }

#define ID(x) (x)
#define TO_F32_D(x) ((float)(x))
#define FROM_F32_D(x) ((double)(x))
SUM_KERNEL(sum_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
SUM_KERNEL(sum_f16, uint16_t, f16_to_f32, f32_to_f16)
SUM_KERNEL(sum_f32, float, ID, ID)
SUM_KERNEL(sum_f64, double, TO_F32_D, FROM_F32_D)

int cm_sum_rows(void *out, int dtype, uint64_t hidden, uint64_t ntok, const int64_t *start, const uint64_t *rows) {
    size_t es = cm_dtype_size(dtype);
    if (dtype != CM_BF16 && dtype != CM_F16 && dtype != CM_F32 && dtype != CM_F64) return CM_E_INVALID;
    for (uint64_t t = 0; t < ntok; t++) {
        char *o = (char *)out + t * hidden * es;
        int64_t k0 = start[t], k1 = start[t + 1];
        if (k1 < k0) return CM_E_INVALID;
        for (uint64_t h0 = 0; h0 < hidden; h0 += SUM_BLOCK) {
            uint64_t m = hidden - h0 < SUM_BLOCK ? hidden - h0 : SUM_BLOCK;
            switch (dtype) {
            case CM_BF16: sum_bf16((uint16_t *)o, rows, k0, k1, h0, m); break;
            case CM_F16: sum_f16((uint16_t *)o, rows, k0, k1, h0, m); break;
            case CM_F32: sum_f32((float *)o, rows, k0, k1, h0, m); break;
            default: sum_f64((double *)o, rows, k0, k1, h0, m); break;
            }
        }
    }
    return 0;
}
