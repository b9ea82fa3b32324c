/* The rdma transport's memory registrations and their cache.
 *
 * Every buffer an RMA write reads (with FI_MR_LOCAL) or lands in needs a registration. Registering
 * pins pages on a real NIC and costs microseconds to milliseconds, so a buffer used again should be
 * registered once. The danger of caching is a stale key: a buffer freed and its address reused by
 * a new allocation, while the NIC still maps the old pages. So only ranges that Python vouches for
 * are cached: cm_rdma_pin names a range whose owner (a numpy array, a torch storage) is alive and
 * whose death will call cm_rdma_forget first (comms/transports/rdma.py keeps that promise with
 * weakref finalizers, and forgets a range before pinning one that overlaps it). Everything else is
 * registered for one use and closed when the use ends. A forgotten range still in use is closed
 * when its last use ends.
 *
 * Keys: the provider's (FI_MR_PROV_KEY), else comms picks them, unique in the domain. Remote
 * addresses: virtual addresses with FI_MR_VIRT_ADDR, else offsets into the registration.
 * FI_MR_ENDPOINT: each registration is bound to the endpoint and enabled.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include "rdma.h"

#if CM_HAVE_FABRIC

#define ACCESS (FI_SEND | FI_RECV | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE)

int rd_mr_reg(rd_ctx *t, rd_mr *m, uint64_t access) {
    uint64_t want = (t->mr_mode & FI_MR_PROV_KEY) ? 0 : ++t->cache.next_key;
    int r = fi_mr_reg(t->domain, (void *)m->base, m->len, access, 0, want, 0, &m->mr, NULL);
    if (r) { m->mr = NULL; return r; }
    if (t->mr_mode & FI_MR_ENDPOINT) {
        r = fi_mr_bind(m->mr, &t->ep->fid, 0);
        if (!r) r = fi_mr_enable(m->mr);
        if (r) { fi_close(&m->mr->fid); m->mr = NULL; return r; }
    }
    m->desc = fi_mr_desc(m->mr);
    m->key = fi_mr_key(m->mr);
    t->cache.regs++;
    return 0;
}

static void drop(rd_ctx *t, rd_mr *m) {
    rd_mr **pp = &t->cache.list;
    while (*pp && *pp != m) pp = &(*pp)->next;
    if (*pp) *pp = m->next;
    if (m->pinned) t->cache.npinned--;
    if (m->mr) fi_close(&m->mr->fid);
    free(m);
}

uint64_t rd_mr_raddr(const rd_ctx *t, const rd_mr *m, const void *ptr) {
    uintptr_t p = (uintptr_t)ptr;
    return (t->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)p : (uint64_t)(p - m->base);
}

/* A registration covering [ptr, ptr + len): a pinned range's (registered on first use), or one
 * for this use alone. NULL when registering failed (the caller fails the context). */
rd_mr *rd_mr_acquire(rd_ctx *t, const void *ptr, uint64_t len) {
    uintptr_t p = (uintptr_t)ptr;
    if (!len) len = 1;
    for (rd_mr *m = t->cache.list; m; m = m->next) {
        if (!m->pinned || m->doomed || p < m->base || p + len > m->base + m->len) continue;
        if (!m->mr) {
            if (rd_mr_reg(t, m, ACCESS)) return NULL;
        } else {
            t->cache.hits++;
        }
        m->refs++;
        m->used = ++t->cache.clock;
        return m;
    }
    rd_mr *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->base = p;
    m->len = len;
    if (rd_mr_reg(t, m, ACCESS)) { free(m); return NULL; }
    t->cache.temps++;
    m->refs = 1;
    m->next = t->cache.list;
    t->cache.list = m;
    return m;
}

void rd_mr_release(rd_ctx *t, rd_mr *m) {
    if (!m) return;
    if (--m->refs == 0 && (!m->pinned || m->doomed)) drop(t, m);
}

void rd_mr_forget(rd_ctx *t, uintptr_t base, uint64_t len) {
    rd_mr *m = t->cache.list;
    while (m) {
        rd_mr *next = m->next;
        if (m->pinned && !m->doomed && m->base < base + len && base < m->base + m->len) {
            t->cache.forgets++;
            if (m->refs) m->doomed = 1;
            else drop(t, m);
        }
        m = next;
    }
}

int rd_mr_pin(rd_ctx *t, uintptr_t base, uint64_t len) {
    if (!len) return CM_OK;
    for (rd_mr *m = t->cache.list; m; m = m->next)
        if (m->pinned && !m->doomed && m->base == base && m->len == len) return CM_OK;
    rd_mr_forget(t, base, len);                    /* an overlapping range belongs to memory gone since */
    if (t->cache.npinned >= RD_MR_MAX) {           /* make room: the least recently used idle range */
        rd_mr *lru = NULL;
        for (rd_mr *m = t->cache.list; m; m = m->next)
            if (m->pinned && !m->refs && (!lru || m->used < lru->used)) lru = m;
        if (!lru) return CM_OK;                    /* all in use: this range is registered per use */
        drop(t, lru);
    }
    rd_mr *m = calloc(1, sizeof *m);
    if (!m) return CM_E_NOMEM;
    m->base = base;
    m->len = len;
    m->pinned = 1;
    m->used = ++t->cache.clock;
    m->next = t->cache.list;
    t->cache.list = m;
    t->cache.npinned++;
    return CM_OK;
}

/* The context failed: peers must not write into user memory any more. Close every registration
 * that a grant may have exposed (the pinned and one-use ones); they are dropped once released. */
void rd_mr_revoke(rd_ctx *t) {
    for (rd_mr *m = t->cache.list; m; m = m->next) {
        if (m->mr) { fi_close(&m->mr->fid); m->mr = NULL; }
        m->doomed = 1;
    }
}

void rd_mr_clear(rd_ctx *t) {
    while (t->cache.list) {
        rd_mr *m = t->cache.list;
        t->cache.list = m->next;
        if (m->mr) fi_close(&m->mr->fid);
        free(m);
    }
    t->cache.npinned = 0;
}

#endif /* CM_HAVE_FABRIC */
