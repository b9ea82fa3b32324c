/* Shared-memory transport: segments in /dev/shm and single-producer/single-consumer slot rings;
 * waiting ranks sleep instead of spinning (they may outnumber cores) and are woken through the
 * context's waker, which lives in their segment (wait.c).
 *
 * Ring protocol (one ring per ordered pair of local ranks, living in the receiver's segment):
 * the sender waits until head - tail < nslots, fills slot head % nslots (a FIRST slot carries the
 * message header), then publishes it with a release store of head + 1. The receiver acquires
 * head, consumes the slot straight into the destination (a copy, or a reduction for RECV_REDUCE),
 * then releases tail + 1. Either side wakes the other after publishing, but only when the other
 * has announced that it sleeps (cm_wake: Dekker-style, both sides fence before checking).
 *
 * The cm_shm_* segment functions return CM_* codes only, like the rest of the core: CM_OK,
 * CM_E_INVALID (a bad name, or a segment that is not comms' or too small), CM_E_NOMEM (no room in
 * /dev/shm or memory), or CM_E_SYS (any other failed system call). The errno behind a failure goes to
 * *sys_errno (when not NULL; 0 on success), never into the return code, where a -errno would read as
 * some CM_E_* code (-ENOENT as CM_E_PEER_CLOSED, -EPERM as CM_E_TIMEOUT).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "shm.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434               /* the same on every architecture (Linux 5.3) */
#endif

/* CDEF-BEGIN: what transports/shm.py calls (native/build_cffi.py hands these lines to cffi) */
int cm_shm_create(const char *name, size_t bytes, void **out, int *sys_errno);
int cm_shm_attach(const char *name, size_t bytes, void **out, int *sys_errno);
int cm_shm_unlink(const char *name, int *sys_errno);
int cm_shm_unmap(void *addr, size_t bytes, int *sys_errno);
size_t cm_shm_segment_bytes(int nlocal, int nslots, size_t slot_bytes, size_t board_bytes);
void cm_shm_init_segment(void *seg, int nlocal, int nslots, size_t slot_bytes, size_t board_bytes);
int cm_ctx_set_shm(cm_ctx *ctx, void *my_seg, int local_index, int nlocal, int nslots, size_t slot_bytes,
                   size_t board_bytes);
int cm_ctx_add_shm_peer(cm_ctx *ctx, int peer, void *peer_seg, int peer_local_index, int peer_pid);
/* CDEF-END */

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static size_t chan_bytes(int nslots, size_t slot_bytes) {
    return sizeof(cm_chan_ctrl) + (size_t)nslots * (CM_SLOT_HDR_BYTES + slot_bytes);
}

static size_t board_off(int nlocal, int nslots, size_t slot_bytes) {
    return round_up(CM_SEG_HDR_BYTES + (size_t)nlocal * chan_bytes(nslots, slot_bytes), 64);
}

size_t cm_shm_segment_bytes(int nlocal, int nslots, size_t slot_bytes, size_t board_bytes) {
    return round_up(board_off(nlocal, nslots, slot_bytes) + cm_board_area_bytes(board_bytes), 4096);
}

static int shm_path(const char *name, char *buf, size_t n) {
    if (!name || !*name || strchr(name, '/')) return -1;
    return snprintf(buf, n, "/%s", name) >= (int)n ? -1 : 0;
}

static int shm_done(int *sys_errno) {
    if (sys_errno) *sys_errno = 0;
    return CM_OK;
}

static int shm_invalid(int err, int *sys_errno) {    /* not a failed system call: errno says why */
    if (sys_errno) *sys_errno = err;
    return CM_E_INVALID;
}

int cm_shm_create(const char *name, size_t bytes, void **out, int *sys_errno) {
    char path[256];
    if (shm_path(name, path, sizeof path) < 0) return shm_invalid(EINVAL, sys_errno);
    int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return cm_sys_fail(errno, sys_errno);
    /* reserve the pages now: a /dev/shm that is too small fails here, not with SIGBUS later */
    int rc = posix_fallocate(fd, 0, (off_t)bytes);
    if (rc != 0) {
        close(fd);
        shm_unlink(path);
        return cm_sys_fail(rc, sys_errno);      /* ENOSPC etc.: CM_E_NOMEM; Python names the size needed */
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) { shm_unlink(path); return cm_sys_fail(err, sys_errno); }
    *out = p;
    return shm_done(sys_errno);
}

int cm_shm_attach(const char *name, size_t bytes, void **out, int *sys_errno) {
    char path[256];
    if (shm_path(name, path, sizeof path) < 0) return shm_invalid(EINVAL, sys_errno);
    int fd = shm_open(path, O_RDWR, 0600);
    if (fd < 0) return cm_sys_fail(errno, sys_errno);
    struct stat st;
    if (fstat(fd, &st) < 0 || (size_t)st.st_size < bytes) { close(fd); return shm_invalid(EBADMSG, sys_errno); }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) return cm_sys_fail(err, sys_errno);
    if (((cm_seg_hdr *)p)->magic != CM_SEG_MAGIC) { munmap(p, bytes); return shm_invalid(EBADMSG, sys_errno); }
    *out = p;
    return shm_done(sys_errno);
}

int cm_shm_unlink(const char *name, int *sys_errno) {
    char path[256];
    if (shm_path(name, path, sizeof path) < 0) return shm_invalid(EINVAL, sys_errno);
    return shm_unlink(path) == 0 ? shm_done(sys_errno) : cm_sys_fail(errno, sys_errno);
}

int cm_shm_unmap(void *addr, size_t bytes, int *sys_errno) {
    return munmap(addr, bytes) == 0 ? shm_done(sys_errno) : cm_sys_fail(errno, sys_errno);
}

void cm_shm_init_segment(void *seg, int nlocal, int nslots, size_t slot_bytes, size_t board_bytes) {
    cm_seg_hdr *h = seg;
    memset(h, 0, sizeof *h);
    h->nlocal = (uint32_t)nlocal;
    h->nslots = (uint32_t)nslots;
    h->slot_bytes = slot_bytes;
    h->board_bytes = board_bytes;
    h->board_off = board_off(nlocal, nslots, slot_bytes);
    cm_board_init((char *)seg + h->board_off, board_bytes);
    for (int i = 0; i < nlocal; i++) {
        cm_chan_ctrl *c = (cm_chan_ctrl *)((char *)seg + CM_SEG_HDR_BYTES + (size_t)i * chan_bytes(nslots, slot_bytes));
        atomic_store(&c->head, 0);
        atomic_store(&c->tail, 0);
    }
    atomic_thread_fence(memory_order_seq_cst);
    h->magic = CM_SEG_MAGIC;
}

/* The bytes of op that may fill slots now (0 for a header-only message, or for a gated send with
 * nothing to send): a gated send fills whole slots until its gate has delivered everything, so a
 * gate that delivers in small pieces (a tcp bounce buffer) does not cost a slot per piece. */
static uint64_t sendable(const shm_ctx *t, const cm_op *op) {
    uint64_t left = cm_send_limit(op) - op->done;
    return left < t->slot_bytes && cm_send_limit(op) < op->nbytes ? 0 : left;
}

/* ---- waking and liveness ---------------------------------------------------------------------- */
static int shm_ready(cm_ctx *ctx, cm_chan *c) {
    (void)ctx;
    shm_chan *s = c->priv;
    /* a ring headed by a collective message whose receive this rank has not posted is no news:
     * only this thread posts it (or a kick wakes it), so waking for the slots behind it would
     * make the wait a busy loop that starves a peer sharing the core */
    if (!c->rx_parked && atomic_load_explicit(&s->rx->head, memory_order_acquire) != s->rx_tail) return 1;
    if (c->sendq && (sendable(s->t, c->sendq) || !c->sendq->nbytes) &&
        s->tx_head - atomic_load_explicit(&s->tx->tail, memory_order_acquire) < (uint64_t)s->t->nslots)
        return 1;
    return 0;
}

static int shm_ctx_ready(cm_ctx *ctx, cm_transport *t) {
    return atomic_load(&((shm_ctx *)t->priv)->my_seg->abort) != 0 || cm_board_ready(ctx, t);
}

static int shm_ctx_alive(cm_ctx *ctx, cm_transport *t) {
    uint64_t a = atomic_load(&((shm_ctx *)t->priv)->my_seg->abort);
    return a ? cm_fail(ctx, CM_E_PEER_ABORTED, (int)a - 1, 0, NULL) : cm_board_check(ctx, t);
}

/* Liveness of a peer's process. kill(pid, 0) only says that *some* process has that pid: a pid
 * reused after the peer died, or the peer's own zombie, passes it. A pidfd names the process
 * itself and polls readable (POLLIN) once it exited, so the peer's pidfd is opened when it is
 * connected (transports/shm.py passes a pid only for a peer in this pid namespace) and polled here;
 * kill(pid, 0) stays for kernels without pidfd_open (before 5.3: ENOSYS) or where it is refused. */
static void open_pidfd(shm_chan *s) {
    s->pidfd = -1;
    if (s->peer_pid <= 0) return;
    int fd = (int)syscall(SYS_pidfd_open, (pid_t)s->peer_pid, 0);
    if (fd >= 0) {
        s->pidfd = fd;                             /* close-on-exec; closed by shm_free */
    } else if (errno == ESRCH) {
        s->peer_gone = 1;                          /* it exited before we connected */
    }
}

static int shm_alive(cm_ctx *ctx, cm_chan *c) {
    shm_chan *s = c->priv;
    int dead = s->peer_gone;
    if (!dead && s->pidfd >= 0) {
        struct pollfd p = { .fd = s->pidfd, .events = POLLIN, .revents = 0 };
        dead = poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR));
    } else if (!dead && s->peer_pid > 0) {
        dead = kill(s->peer_pid, 0) < 0 && errno == ESRCH;
    }
    if (dead) {
        s->peer_gone = 1;
        return cm_fail(ctx, CM_E_PEER_DEAD, c->peer, 0, NULL);
    }
    return CM_OK;
}

static void shm_abort(cm_ctx *ctx, cm_chan *c) {
    shm_chan *s = c->priv;
    uint64_t zero = 0;
    atomic_compare_exchange_strong(&s->peer_seg->abort, &zero, (uint64_t)ctx->rank + 1);
    cm_wake_always(&s->peer_seg->waker);
}

/* ---- ring progress ---------------------------------------------------------------------------- */
static inline cm_slot_hdr *slot_at(char *slots, uint64_t i, int nslots, size_t slot_bytes) {
    return (cm_slot_hdr *)(slots + (size_t)(i % (uint64_t)nslots) * (CM_SLOT_HDR_BYTES + slot_bytes));
}

static int shm_progress_send(cm_ctx *ctx, cm_chan *c) {
    shm_chan *sc = c->priv;
    const shm_ctx *t = sc->t;
    int moved = 0;
    while (c->sendq) {
        cm_op *op = c->sendq;
        uint64_t tail = atomic_load_explicit(&sc->tx->tail, memory_order_acquire);
        if (sc->tx_head - tail >= (uint64_t)t->nslots) break;
        uint64_t left = sendable(t, op);
        if (!left && op->nbytes) break;          /* a gated send waits for its bytes to arrive */
        cm_slot_hdr *s = slot_at(sc->tx_slots, sc->tx_head, t->nslots, t->slot_bytes);
        uint32_t len = (uint32_t)(left < t->slot_bytes ? left : t->slot_bytes);
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
        sc->tx_head++;
        atomic_store_explicit(&sc->tx->head, sc->tx_head, memory_order_release);
        c->tp->tx_bytes += len;
        cm_wake(&sc->peer_seg->waker);
        moved = 1;
        if (flags & CM_SLOT_LAST) cm_op_done(ctx, c, op, 1);
    }
    return moved;
}

static int shm_progress_recv(cm_ctx *ctx, cm_chan *c) {
    shm_chan *sc = c->priv;
    const shm_ctx *t = sc->t;
    int moved = 0;
    c->rx_parked = 0;
    for (;;) {
        uint64_t head = atomic_load_explicit(&sc->rx->head, memory_order_acquire);
        if (head == sc->rx_tail) break;
        /* a sender never runs more than the ring ahead: a head beyond that would replay old slots */
        if (head - sc->rx_tail > (uint64_t)t->nslots) return cm_fail(ctx, CM_E_INVALID, c->peer, 0, c->rx_op);
        cm_slot_hdr *s = slot_at(sc->rx_slots, sc->rx_tail, t->nslots, t->slot_bytes);
        /* the peer's process can write the slot while we read it: its length and flags are read
         * once, checked, and only those copies used (the header is copied by c->rx_hdr = s->hdr) */
        uint32_t len = *(volatile uint32_t *)&s->len, flags = *(volatile uint32_t *)&s->flags;
        /* a slot that starts a message must come between messages, and only such a slot may */
        if ((flags & CM_SLOT_FIRST) ? c->rx_active : !c->rx_active)
            return cm_fail(ctx, CM_E_INVALID, c->peer, 0, c->rx_op);
        if (!c->rx_active) {
            c->rx_hdr = s->hdr;
            int r = cm_match(ctx, c);
            if (r < 0) return r;
            if (r == CM_EAGAIN) { c->rx_parked = 1; break; }   /* no receive posted yet: leave it in the ring */
        }
        if (len > t->slot_bytes) return cm_fail(ctx, CM_E_INVALID, c->peer, 0, c->rx_op);
        int r = cm_deliver(ctx, c, (const char *)s + CM_SLOT_HDR_BYTES, len);
        if (r < 0) return r;
        uint32_t last = flags & CM_SLOT_LAST;
        sc->rx_tail++;
        atomic_store_explicit(&sc->rx->tail, sc->rx_tail, memory_order_release);
        c->tp->rx_bytes += len;
        cm_wake(&sc->peer_seg->waker);
        moved = 1;
        if (last && (r = cm_message_done(ctx, c)) < 0) return r;
    }
    return moved;
}

static void shm_free(cm_ctx *ctx, cm_chan *c) {
    (void)ctx;
    shm_chan *s = c->priv;
    if (s && s->pidfd >= 0) close(s->pidfd);
    free(s);
    c->priv = NULL;
}
static void shm_release(cm_ctx *ctx, cm_transport *t) {
    (void)ctx;
    shm_ctx *s = t->priv;
    if (s) free(s->board_stage);
    free(s);
    t->priv = NULL;
}

static const cm_transport_ops shm_ops = {
    .name = "shm",
    .spin_ns = CM_SPIN_ADAPTIVE,          /* the peer writes the ring directly: spinning can pay */
    .progress_send = shm_progress_send,
    .progress_recv = shm_progress_recv,
    .poll_fd = NULL,                      /* woken through the context's waker, in its segment */
    .ready = shm_ready,
    .alive = shm_alive,
    .abort = shm_abort,
    .free = shm_free,
    .progress = cm_board_progress,        /* the BOARD op in progress, if any */
    .ctx_ready = shm_ctx_ready,
    .ctx_alive = shm_ctx_alive,
    .release = shm_release,
    .coll_post = cm_board_post,
};

/* ---- set-up (transports/shm.py) ------------------------------------------------------------------ */
int cm_ctx_set_shm(cm_ctx *ctx, void *my_seg, int local_index, int nlocal, int nslots, size_t slot_bytes,
                   size_t board_bytes) {
    if (!my_seg || nslots < 1 || slot_bytes < 64 || slot_bytes % 64 || local_index < 0 || local_index >= nlocal ||
        ((cm_seg_hdr *)my_seg)->board_bytes != board_bytes)
        return CM_E_INVALID;
    cm_transport *tp = cm_ctx_transport(ctx, &shm_ops);
    if (!tp || tp->priv) return CM_E_INVALID;
    shm_ctx *t = calloc(1, sizeof *t);
    if (!t) return CM_E_NOMEM;
    t->my_seg = my_seg;
    t->local_index = local_index;
    t->nlocal = nlocal;
    t->nslots = nslots;
    t->slot_bytes = slot_bytes;
    t->chan_bytes = chan_bytes(nslots, slot_bytes);
    t->board_bytes = board_bytes;
    t->board = cm_board_of(my_seg);
    tp->priv = t;
    cm_waker_share(ctx, &t->my_seg->waker);       /* local peers wake this context in its segment */
    return CM_OK;
}

int cm_ctx_add_shm_peer(cm_ctx *ctx, int peer, void *peer_seg, int peer_local_index, int peer_pid) {
    cm_transport *tp = cm_ctx_transport(ctx, &shm_ops);
    shm_ctx *t = tp ? tp->priv : NULL;
    if (!t || peer < 0 || peer >= ctx->size || peer == ctx->rank || !peer_seg ||
        peer_local_index < 0 || peer_local_index >= t->nlocal)
        return CM_E_INVALID;
    cm_seg_hdr *ps = peer_seg;
    if (ps->magic != CM_SEG_MAGIC || ps->nslots != (uint32_t)t->nslots || ps->slot_bytes != t->slot_bytes ||
        ps->board_bytes != t->board_bytes)
        return CM_E_INVALID;
    shm_chan *s = calloc(1, sizeof *s);
    if (!s) return CM_E_NOMEM;
    s->t = t;
    s->peer_seg = ps;
    s->peer_pid = peer_pid;
    open_pidfd(s);
    s->tx = (cm_chan_ctrl *)((char *)peer_seg + CM_SEG_HDR_BYTES + (size_t)t->local_index * t->chan_bytes);
    s->tx_slots = (char *)(s->tx + 1);
    s->rx = (cm_chan_ctrl *)((char *)t->my_seg + CM_SEG_HDR_BYTES + (size_t)peer_local_index * t->chan_bytes);
    s->rx_slots = (char *)(s->rx + 1);
    s->tx_head = atomic_load(&s->tx->head);
    s->rx_tail = atomic_load(&s->rx->tail);
    int r = cm_ctx_attach(ctx, peer, tp, s);
    if (r < 0) {
        if (s->pidfd >= 0) close(s->pidfd);
        free(s);
    }
    return r;
}
