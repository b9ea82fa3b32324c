/* Matching and delivery: which posted receive an arriving message belongs to.
 *
 * Collective messages match the oldest posted collective receive of their channel and must agree
 * with it on (seq, collective, dtype, op, root, count, bytes); a disagreement fails the context
 * with CM_E_MISMATCH. P2P messages match the oldest receive with their tag from that source, then
 * any-source receives; one that arrives before its receive is kept on the channel's unexpected
 * queue until one is posted (cm_unexp_to_op hands it over).
 *
 * Nothing from the wire is trusted: a header that is not comms' (magic, sender, kind) fails the
 * context with CM_E_INVALID naming the peer; a message's size must equal its receive's
 * (CM_E_TRUNCATE), and the plan's bounds (plan_check.c) keep that receive inside its buffer; the
 * payload a transport delivers may not run past the size its header declared, nor end before it
 * (CM_E_INVALID), and what is reduced on arrival comes in whole elements. An early message is
 * bounded before anything is allocated for it: at most unexp_msg_max bytes, and at most
 * unexp_peer_max bytes queued from its sender (CM_E_LIMIT, with the sizes in the status).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include "comms_native.h"

static void unlink_recv(cm_chan *c, cm_op *op) {
    cm_op **pp = &c->recvq, *prev = NULL;
    while (*pp && *pp != op) { prev = *pp; pp = &(*pp)->next; }
    if (!*pp) return;
    *pp = op->next;
    if (c->recvq_tail == op) c->recvq_tail = prev;
    op->next = NULL;
}

/* what an early message costs beyond its payload (its entry): counted against the peer's limit, so
 * that a flood of empty messages is bounded too */
#define UNEXP_COST ((uint64_t)sizeof(cm_unexp))

void cm_ctx_set_unexp_limits(cm_ctx *ctx, uint64_t msg_bytes, uint64_t peer_bytes) {
    ctx->unexp_msg_max = msg_bytes;
    ctx->unexp_peer_max = peer_bytes;
}

/* May the p2p message in c->rx_hdr, which no receive wants yet, be queued? CM_OK, or the context
 * fails with CM_E_LIMIT: status.remote is the header, done_bytes what is queued from the peer
 * already, want_bytes the limit it passed. */
static int unexp_admit(cm_ctx *ctx, cm_chan *c) {
    uint64_t n = c->rx_hdr.nbytes, limit = 0, used = c->unexp_bytes + UNEXP_COST;
    if (n > ctx->unexp_msg_max) limit = ctx->unexp_msg_max;
    else if (used > ctx->unexp_peer_max || n > ctx->unexp_peer_max - used) limit = ctx->unexp_peer_max;
    else return CM_OK;
    if (ctx->failed) return ctx->status.code;
    ctx->status.remote = c->rx_hdr;
    int r = cm_fail(ctx, CM_E_LIMIT, c->peer, 0, NULL);
    ctx->status.done_bytes = c->unexp_bytes;
    ctx->status.want_bytes = limit;
    return r;
}

/* The payload arriving on c broke its header's promise (more bytes, fewer, or part of an element
 * where it is reduced): a malformed message from c's peer. */
static int malformed(cm_ctx *ctx, cm_chan *c, const cm_op *op) {
    if (!ctx->failed) ctx->status.remote = c->rx_hdr;
    return cm_fail(ctx, CM_E_INVALID, c->peer, 0, op);
}

static int same_coll(const cm_hdr *h, const cm_hdr *s) {
    return h->seq == s->seq && h->coll == s->coll && h->dtype == s->dtype && h->redop == s->redop &&
           h->root == s->root && (h->count == s->count || h->count == CM_COUNT_ANY || s->count == CM_COUNT_ANY);
}

/* A collective message that no posted receive wants. It may belong to a later collective, or to
 * the running one at a step not reached yet (CM_EAGAIN: it waits). One that carries the running
 * collective's number with another signature, or an older number, can never be received: its
 * sender called a different collective. Found here, while the ranks that disagree wait on third
 * ranks, it fails the context with CM_E_MISMATCH at once instead of at the deadline. */
static int coll_unposted(cm_ctx *ctx, cm_chan *c) {
    const cm_hdr *h = &c->rx_hdr;
    const cm_exec *e = ctx->coll_active;
    if (!e || !e->started || h->seq > e->sig.seq || (h->seq == e->sig.seq && same_coll(h, &e->sig)))
        return CM_EAGAIN;
    ctx->status.remote = *h;
    return cm_fail(ctx, CM_E_MISMATCH, c->peer, 0, NULL);
}

/* Match the header in c->rx_hdr to a posted receive. CM_OK: c->rx_op or c->rx_unexp is set and
 * c->rx_active = 1; CM_EAGAIN: a collective message whose receive is not posted yet; < 0: error. */
int cm_match(cm_ctx *ctx, cm_chan *c) {
    cm_hdr *h = &c->rx_hdr;
    if (h->magic != CM_MAGIC || h->src != c->peer) {
        ctx->status.remote = *h;
        return cm_fail(ctx, CM_E_INVALID, c->peer, 0, NULL);
    }
    if (h->kind == CM_MSG_COLL) {
        cm_op *op = c->recvq;
        while (op && !op->exec->is_coll) op = op->next;
        if (!op) return coll_unposted(ctx, c);
        int same = same_coll(h, &op->exec->sig);
        if (!same || h->nbytes != op->nbytes) {
            ctx->status.remote = *h;
            return cm_fail(ctx, same ? CM_E_TRUNCATE : CM_E_MISMATCH, c->peer, 0, op);
        }
        unlink_recv(c, op);
        c->rx_op = op;
        c->rx_unexp = NULL;
    } else if (h->kind == CM_MSG_P2P) {
        cm_op *op = c->recvq;
        while (op && (op->exec->is_coll || op->exec->sig.tag != h->tag)) op = op->next;
        if (!op) {
            cm_op **pp = &ctx->anyq, *prev = NULL;
            while (*pp && (*pp)->exec->sig.tag != h->tag) { prev = *pp; pp = &(*pp)->next; }
            if (*pp) {
                op = *pp;
                *pp = op->next;
                if (ctx->anyq_tail == op) ctx->anyq_tail = prev;
                op->next = NULL;
                op->peer = c->peer;
                if (h->nbytes != op->nbytes) {
                    ctx->status.remote = *h;
                    return cm_fail(ctx, CM_E_TRUNCATE, c->peer, 0, op);
                }
                c->rx_op = op;
                c->rx_unexp = NULL;
                c->rx_active = 1;
                return CM_OK;
            }
        }
        if (op) {
            if (h->nbytes != op->nbytes) {
                ctx->status.remote = *h;
                return cm_fail(ctx, CM_E_TRUNCATE, c->peer, 0, op);
            }
            unlink_recv(c, op);
            c->rx_op = op;
            c->rx_unexp = NULL;
        } else {
            int r = unexp_admit(ctx, c);
            if (r < 0) return r;
            cm_unexp *u = calloc(1, sizeof *u);
            if (!u || !(u->data = malloc(h->nbytes ? h->nbytes : 1))) { free(u); return cm_fail(ctx, CM_E_NOMEM, c->peer, 0, NULL); }
            u->tag = h->tag;
            u->nbytes = h->nbytes;
            c->unexp_bytes += h->nbytes + UNEXP_COST;
            if (c->unexp_tail) c->unexp_tail->next = u; else c->unexp = u;
            c->unexp_tail = u;
            c->rx_op = NULL;
            c->rx_unexp = u;
        }
    } else {
        ctx->status.remote = *h;
        return cm_fail(ctx, CM_E_INVALID, c->peer, 0, NULL);
    }
    c->rx_active = 1;
    return CM_OK;
}

/* Copy (or reduce) `len` payload bytes of the message arriving on c into its destination, after
 * the bytes delivered so far; more than its header declared fails the context. */
int cm_deliver(cm_ctx *ctx, cm_chan *c, const char *data, size_t len) {
    if (!len) return CM_OK;
    cm_op *op = c->rx_op;
    if (!op) {
        cm_unexp *u = c->rx_unexp;
        if (!u || len > u->nbytes - u->got) return malformed(ctx, c, NULL);
        memcpy(u->data + u->got, data, len);
        u->got += len;
        return CM_OK;
    }
    if (len > op->nbytes - op->done) return malformed(ctx, c, op);
    if (op->kind == CM_STEP_RECV_REDUCE) {
        int dt = op->exec->sig.dtype;
        size_t esz = cm_dtype_size(dt);
        if (!esz || len % esz) return malformed(ctx, c, op);
        int r = cm_reduce(op->ptr + op->done, data, len / esz, dt, op->exec->sig.redop & CM_REDOP_MASK);
        if (r < 0) return cm_fail(ctx, r, c->peer, 0, op);
    } else {
        memcpy(op->ptr + op->done, data, len);
    }
    op->done += len;
    return CM_OK;
}

void cm_op_done(cm_ctx *ctx, cm_chan *c, cm_op *op, int from_sendq) {
    if (from_sendq) {
        c->sendq = op->next;
        if (!c->sendq) c->sendq_tail = NULL;
        op->next = NULL;
    }
    cm_op_complete(ctx, op);
}

void cm_op_complete(cm_ctx *ctx, cm_op *op) {
    op->complete = 1;
    if (ctx->trace) op->t_done = cm_now_ns();
    op->exec->pending--;
    ctx->progressed = 1;
}

void cm_unexp_drop(cm_chan *c, cm_unexp *u) {
    cm_unexp **pp = &c->unexp, *prev = NULL;
    while (*pp != u) { prev = *pp; pp = &(*pp)->next; }
    *pp = u->next;
    if (c->unexp_tail == u) c->unexp_tail = prev;
    c->unexp_bytes -= u->nbytes + UNEXP_COST;
    free(u->data);
    free(u);
}

/* Hand a complete early message to its receive (the caller checked that the sizes are equal). */
void cm_unexp_to_op(cm_ctx *ctx, cm_chan *c, cm_unexp *u, cm_op *op) {
    memcpy(op->ptr, u->data, u->nbytes);
    op->done = u->nbytes;
    cm_unexp_drop(c, u);
    cm_op_done(ctx, c, op, 0);
}

/* The message arriving on c has ended (its transport saw its last byte): complete its receive, or
 * keep it complete on the unexpected queue. One that ended short of its header's size fails the
 * context (CM_E_INVALID), as the receive would otherwise complete with stale bytes. */
int cm_message_done(cm_ctx *ctx, cm_chan *c) {
    if (c->rx_op ? c->rx_op->done != c->rx_op->nbytes : c->rx_unexp && c->rx_unexp->got != c->rx_unexp->nbytes)
        return malformed(ctx, c, c->rx_op);
    c->rx_active = 0;
    if (c->rx_op) {
        cm_op *op = c->rx_op;
        c->rx_op = NULL;
        cm_op_done(ctx, c, op, 0);
    } else if (c->rx_unexp) {
        cm_unexp *u = c->rx_unexp;
        c->rx_unexp = NULL;
        u->complete = 1;
        if (u->waiter) { cm_unexp_to_op(ctx, c, u, u->waiter); return ctx->failed ? ctx->status.code : CM_OK; }
        cm_op **pp = &ctx->anyq, *prev = NULL;     /* an any-source receive posted meanwhile */
        while (*pp && (*pp)->exec->sig.tag != u->tag) { prev = *pp; pp = &(*pp)->next; }
        if (*pp) {
            cm_op *op = *pp;
            *pp = op->next;
            if (ctx->anyq_tail == op) ctx->anyq_tail = prev;
            op->next = NULL;
            op->peer = c->peer;
            if (u->nbytes != op->nbytes) {
                ctx->status.remote.tag = u->tag;
                ctx->status.remote.nbytes = u->nbytes;
                return cm_fail(ctx, CM_E_TRUNCATE, c->peer, 0, op);
            }
            cm_unexp_to_op(ctx, c, u, op);
        }
    }
    return ctx->failed ? ctx->status.code : CM_OK;
}
