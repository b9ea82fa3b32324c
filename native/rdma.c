/* RDMA transport over libfabric: one FI_EP_RDM endpoint per context, an AV table, one CQ.
 *
 * Small messages are sends: an rd_msg header (rdma.h) and the payload, copied into a registered
 * send buffer, land in one of the receive buffers the context keeps posted; the send completes
 * once copied. A larger message is a rendezvous driven by the receiver:
 *   sender  -> RTS (the message header)
 *   receiver: matches it to the posted receive (cm_match: the mismatch checks), then grants where
 *             to write -> CTS (address, key, offset, length, piece size, a 32-bit token)
 *   sender  -> fi_writedata of each piece, the token as remote CQ data; the send completes when
 *             its writes complete locally
 *   receiver: each piece's CQ data says it landed (never the initiator's completion).
 * A plain receive is granted once, in place (its registration comes from the cache, rdma_mr.c).
 * A receive that reduces is granted a few staging slots at a time; each slot is reduced into the
 * destination in offset order as its write lands, then granted again, so transfer and reduction
 * overlap.
 *
 * Ordering: every message of a channel carries a sequence number and is handled in that order
 * (providers may complete receives out of order: tcp;ofi_rxm does above its eager limit). CTS
 * messages serve the local sender at once; EAGER and RTS messages queue for matching in order.
 *
 * Liveness: libfabric reports nothing when a peer dies (posted receives stay posted, sends to it may
 * even succeed: see docs/rdma.md), so every channel also holds a TCP connection to its peer that
 * carries no data: the kernel closes it when the peer's process dies, a wait polls it and wakes at
 * once, and abort shuts it down. An orderly close is an error only for someone who still expects
 * traffic from that peer, as on the tcp transport.
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

int rd_fail(cm_ctx *ctx, int peer, int err, const cm_op *op) {
    err = err < 0 ? -err : err;
    if (err == ECONNRESET || err == ENOTCONN || err == EPIPE || err == ECANCELED || err == ECONNREFUSED)
        return cm_fail(ctx, CM_E_PEER_CLOSED, peer, err, op);
    return cm_fail(ctx, CM_E_SYS, peer, err, op);
}

/* ---- posting -------------------------------------------------------------------------------------- */
void rd_repost(rd_ctx *t, rd_req *r) {
    r->next = NULL;
    ssize_t rc = fi_recv(t->ep, r->buf, t->eager_bytes, t->rxmr->desc, FI_ADDR_UNSPEC, &r->fictx);
    if (rc) { r->next = t->repost; t->repost = r; }    /* EAGAIN: again at the next pass */
}

/* Send one message of type `type` to c's peer: header fields from `m`, then `len` payload bytes.
 * CM_EAGAIN when no send buffer or queue slot is free now. */
int rd_send_msg(cm_ctx *ctx, cm_chan *c, rd_msg *m, const void *payload, size_t len) {
    rd_chan *rc = c->priv;
    rd_ctx *t = rc->t;
    if (!t->txfree || t->tx_used >= t->tx_max) return CM_EAGAIN;
    rd_req *r = t->txfree;
    m->magic = RD_MAGIC;
    m->src = ctx->rank;
    m->seq = rc->tx_seq;
    memcpy(r->buf, m, sizeof *m);
    if (len) memcpy(r->buf + sizeof *m, payload, len);
    ssize_t e = fi_send(t->ep, r->buf, sizeof *m + len, t->txmr->desc, t->addr[c->peer], &r->fictx);
    if (e == -FI_EAGAIN) return CM_EAGAIN;
    if (e) return rd_fail(ctx, c->peer, (int)e, NULL);
    t->txfree = r->next;
    r->peer = c->peer;
    t->tx_used++;
    rc->tx_seq++;
    return CM_OK;
}

/* ---- receive side: grants, landed writes ------------------------------------------------------------ */
static uint32_t token(cm_chan *c, int slot) {
    rd_chan *rc = c->priv;
    return ((uint32_t)c->peer << 12) | ((uint32_t)slot << 8) | rc->gen;
}

static int send_cts(cm_ctx *ctx, cm_chan *c, int slot, uint64_t off, uint64_t len, uint64_t piece, const rd_mr *mr,
                    const char *where) {
    rd_msg m;
    memset(&m, 0, sizeof m);
    m.type = RD_CTS;
    m.slot = (uint16_t)slot;
    m.off = off;
    m.len = len;
    m.piece = piece;
    m.raddr = rd_mr_raddr(((rd_chan *)c->priv)->t, mr, where);
    m.rkey = mr->key;
    m.token = token(c, slot);
    return rd_send_msg(ctx, c, &m, NULL, 0);
}

int rd_grant(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    rd_ctx *t = rc->t;
    if (rc->direct) {
        if (rc->granted) return CM_OK;
        int r = send_cts(ctx, c, RD_DIRECT, 0, rc->total, t->piece_bytes, rc->dest_mr, rc->dest);
        if (r) return r;
        rc->granted = rc->total;
        rc->pieces = (rc->total + t->piece_bytes - 1) / t->piece_bytes;
        return CM_OK;
    }
    for (int k = 0; k < RD_SLOTS && rc->granted < rc->total; k++) {
        if (rc->busy[k]) continue;
        uint64_t len = rc->total - rc->granted < RD_SLOT_BYTES ? rc->total - rc->granted : RD_SLOT_BYTES;
        int r = send_cts(ctx, c, k, rc->granted, len, RD_SLOT_BYTES, &rc->stage_mr, rc->stage + (size_t)k * RD_SLOT_BYTES);
        if (r) return r;
        rc->busy[k] = 1;
        rc->landed[k] = 0;
        rc->slot_off[k] = rc->granted;
        rc->slot_len[k] = len;
        rc->granted += len;
    }
    return CM_OK;
}

int rd_start_rndv(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    rd_ctx *t = rc->t;
    cm_op *op = c->rx_op;
    rc->rndv = 1;
    rc->gen++;
    rc->total = c->rx_hdr.nbytes;
    rc->granted = rc->pieces = rc->landed_pieces = 0;
    rc->direct = !(op && op->kind == CM_STEP_RECV_REDUCE);
    if (rc->direct) {
        rc->dest = op ? op->ptr : c->rx_unexp->data;
        if (!(rc->dest_mr = rd_mr_acquire(t, rc->dest, rc->total))) return cm_fail(ctx, CM_E_SYS, c->peer, 0, op);
    } else if (!rc->stage) {
        if (posix_memalign((void **)&rc->stage, 4096, (size_t)RD_SLOTS * RD_SLOT_BYTES)) {
            rc->stage = NULL;
            return cm_fail(ctx, CM_E_NOMEM, c->peer, 0, op);
        }
        rc->stage_mr.base = (uintptr_t)rc->stage;
        rc->stage_mr.len = (uint64_t)RD_SLOTS * RD_SLOT_BYTES;
        if (rd_mr_reg(t, &rc->stage_mr, FI_RECV | FI_REMOTE_WRITE)) return cm_fail(ctx, CM_E_SYS, c->peer, 0, op);
    }
    memset(rc->busy, 0, sizeof rc->busy);
    int r = rd_grant(ctx, c);
    return r < 0 ? r : CM_OK;
}

static int end_rndv(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    rd_mr_release(rc->t, rc->dest_mr);
    rc->dest_mr = NULL;
    rc->rndv = 0;
    c->tp->rx_bytes += rc->total;
    return cm_message_done(ctx, c);
}

/* Reduce the landed slots that come next in offset order, and grant them again. */
static int reduce_landed(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    for (int again = 1; again;) {
        again = 0;
        uint64_t next = c->rx_op->done;
        for (int k = 0; k < RD_SLOTS; k++) {
            if (!rc->busy[k] || !rc->landed[k] || rc->slot_off[k] != next) continue;
            int r = cm_deliver(ctx, c, rc->stage + (size_t)k * RD_SLOT_BYTES, rc->slot_len[k]);
            if (r < 0) return r;
            rc->busy[k] = 0;
            again = 1;
            break;
        }
    }
    if (c->rx_op->done == rc->total) return end_rndv(ctx, c);
    int r = rd_grant(ctx, c);
    return r < 0 ? r : CM_OK;
}

static int on_landed(cm_ctx *ctx, rd_ctx *t, uint32_t tok) {
    int peer = (int)(tok >> 12), slot = (int)((tok >> 8) & 15);
    cm_chan *c = peer < ctx->size ? &ctx->chans[peer] : NULL;
    rd_chan *rc = c && c->ops == &cm_rdma_ops ? c->priv : NULL;
    (void)t;
    if (!rc || !rc->rndv || (tok & 255) != rc->gen || (rc->direct != (slot == RD_DIRECT)) ||
        (!rc->direct && (slot >= RD_SLOTS || !rc->busy[slot])))
        return cm_fail(ctx, CM_E_INVALID, rc ? peer : -1, 0, NULL);
    if (rc->direct) {
        if (++rc->landed_pieces < rc->pieces) return CM_OK;
        if (c->rx_op) c->rx_op->done = rc->total; else c->rx_unexp->got = rc->total;
        return end_rndv(ctx, c);
    }
    rc->landed[slot] = 1;
    return reduce_landed(ctx, c);
}

/* ---- send side: grants from CTS, writes ------------------------------------------------------------- */
static int on_cts(cm_ctx *ctx, cm_chan *c, const rd_msg *m) {
    rd_chan *rc = c->priv;
    cm_op *op = rc->tx_op;
    if (!op || rc->ngrants == RD_MAX_GRANTS || m->off + m->len > op->nbytes || m->off + m->len < m->off ||
        !m->piece || m->piece > rc->t->info.max_msg_size)
        return cm_fail(ctx, CM_E_INVALID, c->peer, 0, op);
    rd_cts *g = &rc->grants[rc->ngrants++];
    g->off = m->off; g->len = m->len; g->piece = m->piece; g->raddr = m->raddr; g->rkey = m->rkey;
    g->token = m->token; g->posted = 0;
    return CM_OK;
}

int rd_post_writes(cm_ctx *ctx, cm_chan *c) {
    rd_chan *rc = c->priv;
    rd_ctx *t = rc->t;
    cm_op *op = rc->tx_op;
    int moved = 0;
    while (rc->ngrants) {
        rd_cts *g = &rc->grants[0];
        while (g->posted < g->len) {
            if (t->tx_used >= t->tx_max || !t->txfree) return moved;
            uint64_t n = g->len - g->posted < g->piece ? g->len - g->posted : g->piece;
            rd_req *w = t->txfree;          /* a send buffer's request tracks the write (its buffer unused) */
            ssize_t e = fi_writedata(t->ep, op->ptr + g->off + g->posted, n, rc->tx_mr ? rc->tx_mr->desc : NULL,
                                     g->token, t->addr[c->peer], g->raddr + g->posted, g->rkey, &w->fictx);
            if (e == -FI_EAGAIN) return moved;
            if (e) return rd_fail(ctx, c->peer, (int)e, op);
            t->txfree = w->next;
            w->kind = RQ_WRITE;
            w->peer = c->peer;
            w->len = (uint32_t)n;
            t->tx_used++;
            g->posted += n;
            moved = 1;
        }
        memmove(rc->grants, rc->grants + 1, sizeof *g * (size_t)--rc->ngrants);
    }
    return moved;
}

static void on_written(cm_ctx *ctx, rd_ctx *t, rd_req *w) {
    cm_chan *c = &ctx->chans[w->peer];
    rd_chan *rc = c->priv;
    w->kind = RQ_TX;
    w->next = t->txfree;
    t->txfree = w;
    t->tx_used--;
    if (ctx->failed || !rc->tx_op) return;
    rc->written += w->len;
    c->tp->tx_bytes += w->len;
    if (rc->written < rc->tx_op->nbytes) return;
    cm_op *op = rc->tx_op;
    rd_mr_release(t, rc->tx_mr);
    rc->tx_mr = NULL;
    rc->tx_op = NULL;
    cm_op_done(ctx, c, op, 1);
}

/* ---- the completion queue --------------------------------------------------------------------------- */
static int on_message(cm_ctx *ctx, rd_ctx *t, rd_req *r);

static int deliver(cm_ctx *ctx, cm_chan *c, rd_req *r) {
    rd_chan *rc = c->priv;
    rd_msg *m = (rd_msg *)r->buf;
    rc->rx_seq++;
    if (m->type == RD_CTS) {
        int e = on_cts(ctx, c, m);
        rd_repost(rc->t, r);
        return e;
    }
    r->next = NULL;
    if (rc->inq_tail) rc->inq_tail->next = r; else rc->inq = r;
    rc->inq_tail = r;
    return CM_OK;
}

static int on_message(cm_ctx *ctx, rd_ctx *t, rd_req *r) {
    rd_msg *m = (rd_msg *)r->buf;
    int src = m->src;
    int ok = r->len >= sizeof *m && m->magic == RD_MAGIC && src >= 0 && src < ctx->size && src != ctx->rank &&
             ctx->chans[src].ops == &cm_rdma_ops &&
             ((m->type == RD_EAGER && m->hdr.nbytes == r->len - sizeof *m) || m->type == RD_RTS || m->type == RD_CTS);
    if (!ok) {
        rd_repost(t, r);
        return cm_fail(ctx, CM_E_INVALID, src >= 0 && src < ctx->size ? src : -1, 0, NULL);
    }
    cm_chan *c = &ctx->chans[src];
    rd_chan *rc = c->priv;
    r->seq = m->seq;
    if (m->seq != rc->rx_seq) {                  /* early: keep it until its turn */
        if ((int32_t)(m->seq - rc->rx_seq) < 0) { rd_repost(t, r); return cm_fail(ctx, CM_E_INVALID, src, 0, NULL); }
        rd_req **pp = &rc->held;
        while (*pp && (int32_t)((*pp)->seq - m->seq) < 0) pp = &(*pp)->next;
        r->next = *pp;
        *pp = r;
        return CM_OK;
    }
    int e = deliver(ctx, c, r);
    while (e == CM_OK && rc->held && rc->held->seq == rc->rx_seq) {
        rd_req *h = rc->held;
        rc->held = h->next;
        e = deliver(ctx, c, h);
    }
    return e;
}

int rd_peer_gone(rd_chan *rc) {
    char b;
    if (rc->peer_closed || rc->fd < 0) return rc->peer_closed;
    ssize_t r = recv(rc->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        rc->peer_closed = 1;
        rc->closed_at = cm_now_ns();
    }
    return rc->peer_closed;
}

/* The rank whose liveness connection has closed, waiting up to `ns` for one to (-1: none). */
static int gone_peer(cm_ctx *ctx, int64_t ns) {
    struct pollfd fds[256];
    for (int64_t until = cm_now_ns() + ns;;) {
        int n = 0;
        for (int p = 0; p < ctx->size; p++) {
            cm_chan *c = &ctx->chans[p];
            if (c->ops != &cm_rdma_ops) continue;
            rd_chan *rc = c->priv;
            if (rd_peer_gone(rc)) return p;
            if (rc->fd >= 0 && n < 256) { fds[n].fd = rc->fd; fds[n].events = POLLIN; fds[n++].revents = 0; }
        }
        int64_t left = until - cm_now_ns();
        if (left <= 0 || !n) return -1;
        poll(fds, (nfds_t)n, (int)(left / 1000000) + 1);
    }
}

/* An error completion. Most often a peer died; providers say so poorly (the shm provider reports
 * EIO with no context) and sometimes before the kernel has closed the dead process's sockets, so
 * a peer whose liveness connection closes within ERR_BLAME_NS is blamed first. */
#define ERR_BLAME_NS 200000000LL
static int cq_error(cm_ctx *ctx, rd_ctx *t) {
    struct fi_cq_err_entry err;
    memset(&err, 0, sizeof err);
    if (fi_cq_readerr(t->cq, &err, 0) < 0) return cm_fail(ctx, CM_E_SYS, -1, EIO, NULL);
    int dead = gone_peer(ctx, ERR_BLAME_NS);
    if (dead >= 0) return cm_fail(ctx, CM_E_PEER_CLOSED, dead, 0, NULL);
    rd_req *r = err.op_context;
    int peer = r && (r->kind == RQ_TX || r->kind == RQ_WRITE) ? r->peer : -1;
    return rd_fail(ctx, peer, err.err ? err.err : EIO, NULL);
}

int rd_progress(cm_ctx *ctx, cm_transport *tp) {
    rd_ctx *t = tp->priv;
    struct fi_cq_data_entry ev[16];
    int moved = 0;
    while (t->repost) { rd_req *r = t->repost; t->repost = r->next; rd_repost(t, r); if (t->repost == r) break; }
    for (;;) {
        ssize_t n = fi_cq_read(t->cq, ev, 16);
        if (n == -FI_EAGAIN) break;
        if (n == -FI_EAVAIL) return cq_error(ctx, t);
        if (n < 0) return cm_fail(ctx, CM_E_SYS, -1, (int)-n, NULL);
        for (ssize_t i = 0; i < n; i++) {
            rd_req *r = ev[i].op_context;
            int e = CM_OK;
            if (ev[i].flags & FI_REMOTE_CQ_DATA) {       /* a write landed (comms' sends carry no CQ data) */
                e = on_landed(ctx, t, (uint32_t)ev[i].data);
                /* its context means something only where the write took a posted receive */
                if (t->rx_cq_data && r && r->kind == RQ_RX) rd_repost(t, r);
            } else if (r && r->kind == RQ_RX) {
                r->len = (uint32_t)ev[i].len;
                e = on_message(ctx, t, r);
            } else if (r && r->kind == RQ_WRITE) {
                on_written(ctx, t, r);
            } else if (r && r->kind == RQ_TX) {
                r->next = t->txfree;
                t->txfree = r;
                t->tx_used--;
            }
            if (e < 0) return e;
        }
        moved = 1;
        if (n < 16) break;
    }
    return moved;
}

#endif /* CM_HAVE_FABRIC */
