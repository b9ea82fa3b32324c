/* Rows of tokens for expert-parallel dispatch and combine on one host.
 *
 * cm_window_map maps a receive window of the single-copy exchange (comms/moe/windows.py): a POSIX
 * shared-memory segment of this user (mode 0600) that the owner creates and its peers map, so a
 * writer copies rows straight into a peer's memory without any ptrace permission. Creating
 * reserves the space (posix_fallocate: a full /dev/shm fails here, never with SIGBUS later);
 * every mapping is populated up front (MAP_POPULATE), so no page faults land in an exchange.
 * Naming and unlinking are the caller's (comms/moe/windows.py); cm_shm_unmap releases a mapping.
 *
 * cm_sum_rows is combine's reduction: out[t] = the sum of the rows listed for token t, widened to
 * float32, accumulated from 0 in the listed order, rounded once to the output dtype. It gives the
 * same bits as comms.moe.layout.sum_blocks (its torch reference): zeros for a token without rows.
 *
 * cm_window_map returns CM_OK, CM_E_INVALID, CM_E_NOMEM or CM_E_SYS with the errno in *sys_errno (as
 * cm_shm_create does); cm_sum_rows CM_OK or CM_E_INVALID.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "comms_native.h"
#include "half.h"

#define SUM_BLOCK 1024          /* float32 accumulator elements kept in L1 */

/* create (O_EXCL, 0600, *bytes reserved) or open (at least *bytes; *bytes becomes its size)
 * /dev/shm/<name> and map all of it shared, read-write, populated; *out gets the address */
int cm_window_map(const char *name, uint64_t *bytes, int create, void **out, int *sys_errno) {
    char path[256];
    if (sys_errno) *sys_errno = 0;
    if (!name || !*name || strchr(name, '/') || snprintf(path, sizeof path, "/%s", name) >= (int)sizeof path) {
        cm_sys_fail(EINVAL, sys_errno);
        return CM_E_INVALID;
    }
    int fd = shm_open(path, create ? O_RDWR | O_CREAT | O_EXCL : O_RDWR, 0600);
    if (fd < 0) return cm_sys_fail(errno, sys_errno);
    uint64_t size = *bytes;
    if (create) {
        int rc = posix_fallocate(fd, 0, (off_t)size);
        if (rc != 0) { close(fd); shm_unlink(path); return cm_sys_fail(rc, sys_errno); }
    } else {
        struct stat st;
        if (fstat(fd, &st) < 0 || (uint64_t)st.st_size < size || st.st_size == 0) {
            close(fd);
            cm_sys_fail(EBADMSG, sys_errno);
            return CM_E_INVALID;
        }
        size = (uint64_t)st.st_size;
    }
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) {
        if (create) shm_unlink(path);
        return cm_sys_fail(err, sys_errno);
    }
    *bytes = size;
    *out = p;
    return CM_OK;
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
