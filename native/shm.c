/* Shared-memory transport: segments in /dev/shm, single-producer/single-consumer slot rings, and a
 * futex doorbell so that waiting ranks can sleep instead of spinning when they outnumber cores.
 *
 * Ring protocol (one ring per ordered pair of local ranks, living in the receiver's segment):
 * the sender waits until head - tail < nslots, fills slot head % nslots (a FIRST slot carries the
 * message header), then publishes it with a release store of head + 1. The receiver acquires
 * head, consumes the slot straight into the destination (a copy, or a reduction for RECV_REDUCE),
 * then releases tail + 1. Either side rings the other's doorbell after publishing, but only when
 * the other has announced that it sleeps (Dekker-style: both sides fence before checking).
 *
 * The cm_shm_* segment functions return 0 or -errno (not CM_E_* codes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "comms_native.h"

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static size_t chan_bytes(int nslots, size_t slot_bytes) {
    return sizeof(cm_chan_ctrl) + (size_t)nslots * (CM_SLOT_HDR_BYTES + slot_bytes);
}

size_t cm_shm_segment_bytes(int nlocal, int nslots, size_t slot_bytes) {
    return round_up(CM_SEG_HDR_BYTES + (size_t)nlocal * chan_bytes(nslots, slot_bytes), 4096);
}

static int shm_path(const char *name, char *buf, size_t n) {
    if (!name || !*name || strchr(name, '/')) return -1;
    return snprintf(buf, n, "/%s", name) >= (int)n ? -1 : 0;
}

int cm_shm_create(const char *name, size_t bytes, void **out) {
    char path[256];
    if (shm_path(name, path, sizeof path) < 0) return CM_E_INVALID;
    int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return -errno;
    /* reserve the pages now: a /dev/shm that is too small fails here, not with SIGBUS later */
    int rc = posix_fallocate(fd, 0, (off_t)bytes);
    if (rc != 0) {
        close(fd);
        shm_unlink(path);
        return -rc;                       /* -ENOSPC etc.; Python names the size needed */
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) { shm_unlink(path); return -err; }
    *out = p;
    return CM_OK;
}

int cm_shm_attach(const char *name, size_t bytes, void **out) {
    char path[256];
    if (shm_path(name, path, sizeof path) < 0) return CM_E_INVALID;
    int fd = shm_open(path, O_RDWR, 0600);
    if (fd < 0) return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0 || (size_t)st.st_size < bytes) { close(fd); return -EBADMSG; }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) return -err;
    if (((cm_seg_hdr *)p)->magic != CM_SEG_MAGIC) { munmap(p, bytes); return -EBADMSG; }
    *out = p;
    return CM_OK;
}

int cm_shm_unlink(const char *name) {
    char path[256];
    if (shm_path(name, path, sizeof path) < 0) return CM_E_INVALID;
    return shm_unlink(path) == 0 ? CM_OK : -errno;
}

int cm_shm_unmap(void *addr, size_t bytes) { return munmap(addr, bytes) == 0 ? CM_OK : -errno; }

void cm_shm_init_segment(void *seg, int nlocal, int nslots, size_t slot_bytes) {
    cm_seg_hdr *h = seg;
    memset(h, 0, sizeof *h);
    h->nlocal = (uint32_t)nlocal;
    h->nslots = (uint32_t)nslots;
    h->slot_bytes = slot_bytes;
    for (int i = 0; i < nlocal; i++) {
        cm_chan_ctrl *c = (cm_chan_ctrl *)((char *)seg + CM_SEG_HDR_BYTES + (size_t)i * chan_bytes(nslots, slot_bytes));
        atomic_store(&c->head, 0);
        atomic_store(&c->tail, 0);
    }
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = CM_SEG_MAGIC;
}

/* ---- doorbell --------------------------------------------------------------------------------- */
void cm_shm_notify(cm_seg_hdr *seg) {
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t w = atomic_load_explicit(&seg->waiting, memory_order_relaxed);
    if (w == CM_WAIT_FUTEX) {
        atomic_fetch_add(&seg->doorbell, 1);
        syscall(SYS_futex, &seg->doorbell, FUTEX_WAKE, 1, NULL, NULL, 0);
    } else if (w == CM_WAIT_POLL) {
        cm_bell_ring(seg->bell, seg->bell_len, &seg->bell_broken);   /* it sleeps in poll(): see bell.c */
    }
}

/* Whether an inbound ring has a slot, a ring this rank waits to send into has room, or an abort
 * was posted: what a sleeper re-checks after announcing that it sleeps. */
int cm_shm_news(cm_ctx *ctx) {
    if (atomic_load(&ctx->my_seg->abort) != 0) return 1;
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->type != CM_CHAN_SHM) continue;
        /* a ring headed by a collective message whose receive this rank has not posted is no news:
         * only this thread posts it (or a kick wakes it), so waking for the slots behind it would
         * make the wait a busy loop that starves a peer sharing the core */
        if (!c->rx_parked && atomic_load_explicit(&c->rx->head, memory_order_acquire) != c->rx_tail) return 1;
        if (c->sendq && c->tx_head - atomic_load_explicit(&c->tx->tail, memory_order_acquire) < (uint64_t)ctx->nslots)
            return 1;
    }
    return 0;
}

/* Sleep on this rank's doorbell for at most timeout_ns, unless news arrived since the last poll.
 * The caller polls once more after this returns. */
int cm_shm_sleep(cm_ctx *ctx, int64_t timeout_ns) {
    cm_seg_hdr *me = ctx->my_seg;
    uint32_t bell = atomic_load(&me->doorbell);
    atomic_store(&me->waiting, CM_WAIT_FUTEX);
    atomic_thread_fence(memory_order_seq_cst);
    /* re-check every inbound ring and every ring we wait to send into */
    if (!cm_shm_news(ctx)) {
        struct timespec ts = { timeout_ns / 1000000000LL, timeout_ns % 1000000000LL };
        ctx->counters[CM_CNT_SLEEPS]++;
        syscall(SYS_futex, &me->doorbell, FUTEX_WAIT, bell, &ts, NULL, 0);
    }
    atomic_store(&me->waiting, CM_WAIT_NONE);
    return CM_OK;
}

/* ---- ring progress ---------------------------------------------------------------------------- */
static inline cm_slot_hdr *slot_at(char *slots, uint64_t i, int nslots, size_t slot_bytes) {
    return (cm_slot_hdr *)(slots + (size_t)(i % (uint64_t)nslots) * (CM_SLOT_HDR_BYTES + slot_bytes));
}

int cm_shm_progress_send(cm_ctx *ctx, cm_chan *c) {
    int moved = 0;
    while (c->sendq) {
        cm_op *op = c->sendq;
        uint64_t tail = atomic_load_explicit(&c->tx->tail, memory_order_acquire);
        if (c->tx_head - tail >= (uint64_t)ctx->nslots) break;
        cm_slot_hdr *s = slot_at(c->tx_slots, c->tx_head, ctx->nslots, ctx->slot_bytes);
        uint64_t left = op->nbytes - op->done;
        uint32_t len = (uint32_t)(left < ctx->slot_bytes ? left : ctx->slot_bytes);
        uint32_t flags = 0;
        if (!op->started) {
            flags |= CM_SLOT_FIRST;
            s->hdr = op->exec->sig;
            s->hdr.nbytes = op->nbytes;
            s->hdr.src = ctx->rank;
            op->started = 1;
        }
        if (len) memcpy((char *)s + CM_SLOT_HDR_BYTES, op->ptr + op->done, len);
        op->done += len;
        if (op->done == op->nbytes) flags |= CM_SLOT_LAST;
        s->len = len;
        s->flags = flags;
        c->tx_head++;
        atomic_store_explicit(&c->tx->head, c->tx_head, memory_order_release);
        ctx->counters[CM_CNT_SHM_TX] += len;
        cm_shm_notify(c->peer_seg);
        moved = 1;
        if (flags & CM_SLOT_LAST) cm_op_done(ctx, c, op, 1);
    }
    return moved;
}

int cm_shm_progress_recv(cm_ctx *ctx, cm_chan *c) {
    int moved = 0;
    c->rx_parked = 0;
    for (;;) {
        uint64_t head = atomic_load_explicit(&c->rx->head, memory_order_acquire);
        if (head == c->rx_tail) break;
        cm_slot_hdr *s = slot_at(c->rx_slots, c->rx_tail, ctx->nslots, ctx->slot_bytes);
        if (!c->rx_active) {
            if (!(s->flags & CM_SLOT_FIRST)) return cm_fail(ctx, CM_E_INVALID, c->peer, 0, NULL);
            c->rx_hdr = s->hdr;
            int r = cm_match(ctx, c);
            if (r < 0) return r;
            if (r == CM_EAGAIN) { c->rx_parked = 1; break; }   /* no receive posted yet: leave it in the ring */
        }
        int r = cm_deliver(ctx, c, (const char *)s + CM_SLOT_HDR_BYTES, s->len);
        if (r < 0) return r;
        uint32_t last = s->flags & CM_SLOT_LAST;
        c->rx_tail++;
        atomic_store_explicit(&c->rx->tail, c->rx_tail, memory_order_release);
        ctx->counters[CM_CNT_SHM_RX] += s->len;
        cm_shm_notify(c->peer_seg);
        moved = 1;
        if (last) cm_message_done(ctx, c);
    }
    return moved;
}
