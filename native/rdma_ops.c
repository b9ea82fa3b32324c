/* The rdma transport's side of the engine's contract: the channel operations and the table the
 * engine calls through (comms_native.h), and the set-up functions transports/rdma.py calls (their
 * declarations are in rdma.h's CDEF block). The protocol they drive is in rdma.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "rdma.h"

#if CM_HAVE_FABRIC
static rd_ctx *ctx_rdma(cm_ctx *ctx) {
    for (int i = 0; i < ctx->ntp; i++)
        if (ctx->tp[i].ops == &cm_rdma_ops) return ctx->tp[i].priv;
    return NULL;
}

/* ---- channel operations ----------------------------------------------------------------------------- */
/* A peer that closed is an error for whoever still expects traffic on its channel, once the grace
 * for messages still on the way has passed (a clean close drains its sends first: cm_ctx_free). */
static int check_closed(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    if (rc->peer_closed && (c->recvq || c->sendq || c->rx_active || rc->inq) &&
        cm_now_ns() - rc->closed_at >= RD_CLOSE_GRACE_NS)
        return cm_fail(ctx, CM_E_PEER_CLOSED, c->peer, 0, c->recvq ? c->recvq : c->sendq);
    return CM_OK;
}

static int rdma_progress_send(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    rd_ctx *t = rc->t;
    int moved = 0;
    if (rc->peer_closed) return check_closed(ctx, c);
    while (c->sendq) {
        cm_op *op = c->sendq;
        rd_msg m;
        /* a gated send goes out whole, once its gate has delivered every byte (writes are posted
         * from the buffer itself, so a partial one would need the rest's registration anyway) */
        if (cm_send_limit(op) < op->nbytes) break;
        if (op->nbytes + sizeof m <= t->eager_bytes) {
            memset(&m, 0, sizeof m);
            m.type = RD_EAGER;
            m.hdr = op->exec->sig;
            m.hdr.nbytes = op->nbytes;
            m.hdr.src = ctx->rank;
            int r = rd_send_msg(ctx, c, &m, op->ptr, op->nbytes);
            if (r == CM_EAGAIN) break;
            if (r < 0) return r;
            c->tp->tx_bytes += op->nbytes;
            cm_op_done(ctx, c, op, 1);
            moved = 1;
            continue;
        }
        if (!op->started) {
            memset(&m, 0, sizeof m);
            m.type = RD_RTS;
            m.hdr = op->exec->sig;
            m.hdr.nbytes = op->nbytes;
            m.hdr.src = ctx->rank;
            if ((t->mr_mode & FI_MR_LOCAL) && !(rc->tx_mr = rd_mr_acquire(t, op->ptr, op->nbytes)))
                return cm_fail(ctx, CM_E_SYS, c->peer, 0, op);
            int r = rd_send_msg(ctx, c, &m, NULL, 0);
            if (r == CM_EAGAIN) { rd_mr_release(t, rc->tx_mr); rc->tx_mr = NULL; break; }
            if (r < 0) return r;
            op->started = 1;
            rc->tx_op = op;
            rc->written = 0;
            moved = 1;
        }
        int r = rd_post_writes(ctx, c);
        if (r < 0) return r;
        moved |= r;
        break;                                   /* the head waits for its writes */
    }
    return moved;
}

static int rdma_progress_recv(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    int moved = 0;
    c->rx_parked = 0;
    if (rc->peer_closed) { int r = check_closed(ctx, c); if (r < 0) return r; }
    if (rc->rndv && !rc->direct ? rc->granted < rc->total : rc->rndv && !rc->granted) {
        int r = rd_grant(ctx, c);                   /* a grant that found no send buffer earlier */
        if (r < 0) return r;
    }
    while (!c->rx_active && rc->inq) {
        rd_req *r = rc->inq;
        rd_msg *m = (rd_msg *)r->buf;
        c->rx_hdr = m->hdr;
        int e = cm_match(ctx, c);
        if (e < 0) return e;
        if (e == CM_EAGAIN) { c->rx_parked = 1; break; }   /* its collective receive is not posted yet */
        rc->inq = r->next;
        if (!rc->inq) rc->inq_tail = NULL;
        moved = 1;
        if (m->type == RD_EAGER) {
            e = cm_deliver(ctx, c, r->buf + sizeof *m, m->hdr.nbytes);
            rd_repost(rc->t, r);
            if (e < 0) return e;
            c->tp->rx_bytes += m->hdr.nbytes;
            if ((e = cm_message_done(ctx, c)) < 0) return e;
        } else {
            rd_repost(rc->t, r);
            e = rd_start_rndv(ctx, c);
            if (e < 0) return e;
        }
    }
    return moved;
}

static int rdma_poll_fd(cm_ctx *ctx, cm_chan *c, short *events, int64_t *nap_ns) {
    (void)ctx;
    rd_chan *rc = c->priv;
    if (rc->t->cq_fd < 0 && *nap_ns > RD_NOFD_NAP_NS) *nap_ns = RD_NOFD_NAP_NS;
    if (rc->peer_closed || rc->fd < 0) return -1;
    *events = POLLIN;                            /* EOF: the peer's process is gone */
    return rc->fd;
}

static int rdma_alive(cm_ctx *ctx, cm_chan *c) {
    rd_peer_gone(c->priv);
    return check_closed(ctx, c);
}

static void rdma_abort(cm_ctx *ctx, cm_chan *c) {
    (void)ctx;
    rd_chan *rc = c->priv;
    if (rc->fd >= 0) shutdown(rc->fd, SHUT_RDWR);
}

static void rdma_free(cm_ctx *ctx, cm_chan *c) {
    (void)ctx;
    rd_chan *rc = c->priv;
    if (!rc) return;
    if (rc->fd >= 0) close(rc->fd);
    if (rc->stage_mr.mr) fi_close(&rc->stage_mr.mr->fid);
    free(rc->stage);
    free(rc);
    c->priv = NULL;
}

static int rdma_ctx_poll_fd(cm_ctx *ctx, cm_transport *tp, short *events) {
    (void)ctx;
    rd_ctx *t = tp->priv;
    *events = POLLIN;
    return t->cq_fd;
}

static int rdma_ctx_ready(cm_ctx *ctx, cm_transport *tp) {
    (void)ctx;
    rd_ctx *t = tp->priv;
    if (t->repost) return 1;
    if (t->cq_fd < 0) return 0;
    struct fid *f = &t->cq->fid;
    return fi_trywait(t->fabric, &f, 1) != FI_SUCCESS;   /* completions the fd would not announce */
}

static void rdma_fail(cm_ctx *ctx, cm_transport *tp) { (void)ctx; rd_mr_revoke(tp->priv); }

static int rdma_busy(cm_ctx *ctx, cm_transport *tp) { (void)ctx; return ((rd_ctx *)tp->priv)->tx_used > 0; }

static void rdma_release(cm_ctx *ctx, cm_transport *tp) {
    (void)ctx;
    rd_ctx *t = tp->priv;
    if (!t) return;
    rd_mr_clear(t);
    if (t->txmr && t->txmr->mr) fi_close(&t->txmr->mr->fid);
    if (t->rxmr && t->rxmr->mr) fi_close(&t->rxmr->mr->fid);
    rd_close(t);
    free(t->txmr); free(t->rxmr); free(t->txmem); free(t->rxmem); free(t->txreq); free(t->rxreq); free(t->addr);
    free(t);
    tp->priv = NULL;
}

const cm_transport_ops cm_rdma_ops = {
    .name = "rdma",
    .spin_ns = CM_SPIN_ADAPTIVE,          /* completions are polled; spin briefly, then the CQ's fd */
    .send_at_post = 1,
    .progress_send = rdma_progress_send,
    .progress_recv = rdma_progress_recv,
    .poll_fd = rdma_poll_fd,
    .alive = rdma_alive,
    .abort = rdma_abort,
    .free = rdma_free,
    .progress = rd_progress,
    .ctx_poll_fd = rdma_ctx_poll_fd,
    .ctx_ready = rdma_ctx_ready,
    .fail = rdma_fail,
    .busy = rdma_busy,
    .release = rdma_release,
};
#endif /* CM_HAVE_FABRIC */

/* ---- set-up (transports/rdma.py) ---------------------------------------------------------------------- */
#if CM_HAVE_FABRIC
static int buffers(rd_ctx *t) {
    size_t n = t->eager_bytes;
    if (posix_memalign((void **)&t->txmem, 4096, n * RD_NTX) || posix_memalign((void **)&t->rxmem, 4096, n * RD_NRX))
        return CM_E_NOMEM;
    t->txreq = calloc(RD_NTX, sizeof(rd_req));
    t->rxreq = calloc(RD_NRX, sizeof(rd_req));
    t->txmr = calloc(1, sizeof(rd_mr));
    t->rxmr = calloc(1, sizeof(rd_mr));
    if (!t->txreq || !t->rxreq || !t->txmr || !t->rxmr) return CM_E_NOMEM;
    t->txmr->base = (uintptr_t)t->txmem; t->txmr->len = n * RD_NTX;
    t->rxmr->base = (uintptr_t)t->rxmem; t->rxmr->len = n * RD_NRX;
    int r = rd_mr_reg(t, t->txmr, FI_SEND | FI_WRITE);
    if (r || (r = rd_mr_reg(t, t->rxmr, FI_RECV))) {
        snprintf(t->info.error, sizeof t->info.error, "registering the message buffers failed: %s", rd_strerror(r));
        return CM_E_SYS;
    }
    t->cache.regs = 0;                           /* count the cache's registrations only */
    for (int i = RD_NTX - 1; i >= 0; i--) {
        rd_req *q = &t->txreq[i];
        q->kind = RQ_TX;
        q->buf = t->txmem + (size_t)i * n;
        q->next = t->txfree;
        t->txfree = q;
    }
    for (int i = 0; i < RD_NRX; i++) {
        rd_req *q = &t->rxreq[i];
        q->kind = RQ_RX;
        q->buf = t->rxmem + (size_t)i * n;
        rd_repost(t, q);
    }
    return CM_OK;
}
#endif

int cm_rdma_library(const char *path) {
#if CM_HAVE_FABRIC
    return rd_library(path);
#else
    (void)path;
    return CM_OK;
#endif
}

int cm_rdma_probe(const char *node, const char *domain, cm_rdma_info *out) {
#if CM_HAVE_FABRIC
    return rd_probe(node, domain, out);
#else
    memset(out, 0, sizeof *out);
    snprintf(out->error, sizeof out->error, "comms was built without libfabric's headers: install libfabric-dev and "
             "reinstall comms");
    return CM_E_SYS;
#endif
}

int cm_rdma_open(cm_ctx *ctx, const char *node, const char *domain, const char *shm_name, int mr_local,
                 int wait_fd, size_t eager_bytes, cm_rdma_info *out, void *addr, size_t *addrlen) {
#if CM_HAVE_FABRIC
    memset(out, 0, sizeof *out);
    cm_transport *tp = cm_ctx_transport(ctx, &cm_rdma_ops);
    if (!tp || tp->priv) { snprintf(out->error, sizeof out->error, "rdma is open already"); return CM_E_INVALID; }
    rd_ctx *t = calloc(1, sizeof *t);
    if (!t) return CM_E_NOMEM;
    int r = rd_open(t, node, domain, shm_name, wait_fd);
    if (r == CM_OK) {
        t->mr_mode = t->info.mr_mode | (mr_local ? FI_MR_LOCAL : 0);
        if (eager_bytes < 1024) eager_bytes = 1024;
        if (eager_bytes > t->info.max_msg_size) eager_bytes = t->info.max_msg_size;
        t->eager_bytes = (eager_bytes + 63) / 64 * 64;
        t->piece_bytes = RD_PIECE_BYTES < t->info.max_msg_size ? RD_PIECE_BYTES : t->info.max_msg_size;
        t->tx_max = t->info.tx_depth < RD_NTX ? (int)t->info.tx_depth : RD_NTX;
        if (t->tx_max < 8) t->tx_max = 8;
        t->addr = calloc((size_t)ctx->size, sizeof(fi_addr_t));
        r = t->addr ? buffers(t) : CM_E_NOMEM;
    }
    if (r == CM_OK && fi_getname(&t->ep->fid, addr, addrlen) != 0) {
        snprintf(t->info.error, sizeof t->info.error, "fi_getname failed");
        r = CM_E_SYS;
    }
    *out = t->info;
    tp->priv = t;
    if (r != CM_OK) {                            /* nothing is attached: undo it all */
        rdma_release(ctx, tp);
        cm_ctx_drop_transport(ctx, tp);
    }
    return r;
#else
    (void)ctx; (void)node; (void)domain; (void)shm_name; (void)mr_local; (void)wait_fd; (void)eager_bytes; (void)addr;
    (void)addrlen;
    return cm_rdma_probe(NULL, NULL, out);
#endif
}

int cm_rdma_add_peer(cm_ctx *ctx, int peer, const void *addr, size_t addrlen, int fd) {
#if CM_HAVE_FABRIC
    rd_ctx *t = ctx_rdma(ctx);
    if (!t || peer < 0 || peer >= ctx->size || peer == ctx->rank || !addr || !addrlen || addrlen > 1024 || fd < 0 ||
        ctx->size > (1 << 20))                   /* a write's 32-bit token holds the writer's rank in 20 bits */
        return CM_E_INVALID;
    if (fi_av_insert(t->av, addr, 1, &t->addr[peer], 0, NULL) != 1) return CM_E_INVALID;
    rd_chan *rc = calloc(1, sizeof *rc);
    if (!rc) return CM_E_NOMEM;
    rc->t = t;
    rc->fd = fd;
    int r = cm_ctx_attach(ctx, peer, cm_ctx_transport(ctx, &cm_rdma_ops), rc);
    if (r < 0) free(rc);
    return r;
#else
    (void)ctx; (void)peer; (void)addr; (void)addrlen; (void)fd;
    return CM_E_INVALID;
#endif
}

int cm_rdma_pin(cm_ctx *ctx, uintptr_t base, uint64_t len) {
#if CM_HAVE_FABRIC
    rd_ctx *t = ctx_rdma(ctx);
    return t ? rd_mr_pin(t, base, len) : CM_E_INVALID;
#else
    (void)ctx; (void)base; (void)len;
    return CM_E_INVALID;
#endif
}

int cm_rdma_forget(cm_ctx *ctx, uintptr_t base, uint64_t len) {
#if CM_HAVE_FABRIC
    rd_ctx *t = ctx_rdma(ctx);
    if (!t) return CM_E_INVALID;
    rd_mr_forget(t, base, len);
    return CM_OK;
#else
    (void)ctx; (void)base; (void)len;
    return CM_E_INVALID;
#endif
}

int cm_rdma_mr_stats(cm_ctx *ctx, uint64_t *out, int n) {
#if CM_HAVE_FABRIC
    rd_ctx *t = ctx_rdma(ctx);
    if (!t) return CM_E_INVALID;
    uint64_t v[5] = { t->cache.regs, t->cache.hits, t->cache.temps, t->cache.forgets, (uint64_t)t->cache.npinned };
    for (int i = 0; i < n && i < 5; i++) out[i] = v[i];
    return CM_OK;
#else
    (void)ctx; (void)out; (void)n;
    return CM_E_INVALID;
#endif
}
