/* The context: one per communicator, holding a channel per peer, the transports those channels
 * belong to, the waker, the counters and the flight recorder. Built by the Python bootstrap
 * (cm_ctx_new, then each transport attaches its channels: cm_ctx_transport, cm_ctx_attach), kicked
 * by other threads to wake a waiting engine (cm_ctx_kick), aborted on failure or by the
 * application (cm_ctx_abort, which tells every peer and fails every plan in flight), and freed once
 * no plan runs.
 */
#define _GNU_SOURCE
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "comms_native.h"

cm_ctx *cm_ctx_new(int rank, int size, int spin_polls, int yields, int64_t spin_max_ns, int64_t spin_min_ns) {
    if (size < 1 || rank < 0 || rank >= size) return NULL;
    cm_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->chans = calloc((size_t)size, sizeof(cm_chan));
    ctx->pollfds_cap = size + CM_MAX_TRANSPORTS + 1;      /* a channel per peer, the transports, the bell */
    ctx->pollfds = calloc((size_t)ctx->pollfds_cap, sizeof(struct pollfd));
    if (!ctx->chans || !ctx->pollfds) { free(ctx->chans); free(ctx->pollfds); free(ctx); return NULL; }
    ctx->rank = rank;
    ctx->size = size;
    ctx->spin_polls = spin_polls;
    ctx->yields = yields;
    ctx->spin_max_ns = spin_max_ns > 0 ? spin_max_ns : 0;
    ctx->spin_min_ns = spin_min_ns < ctx->spin_max_ns ? spin_min_ns : ctx->spin_max_ns;
    ctx->spin_ns = ctx->spin_max_ns;
    for (int p = 0; p < size; p++) ctx->chans[p].peer = p;
    ctx->waker = &ctx->own_waker;
    cm_ctx_set_unexp_limits(ctx, (uint64_t)CM_UNEXP_MSG_MIB << 20, (uint64_t)CM_UNEXP_PEER_MIB << 20);
    cm_bell_open(ctx);
    return ctx;
}

cm_transport *cm_ctx_transport(cm_ctx *ctx, const cm_transport_ops *ops) {
    for (int i = 0; i < ctx->ntp; i++)
        if (ctx->tp[i].ops == ops) return &ctx->tp[i];
    if (ctx->ntp == CM_MAX_TRANSPORTS) return NULL;
    cm_transport *t = &ctx->tp[ctx->ntp++];
    memset(t, 0, sizeof *t);
    t->ops = ops;
    return t;
}

void cm_ctx_drop_transport(cm_ctx *ctx, cm_transport *t) {
    for (int p = 0; p < ctx->size; p++)
        if (ctx->chans[p].tp == t) return;            /* in use: it stays */
    if (ctx->ntp && t == &ctx->tp[ctx->ntp - 1]) ctx->ntp--;
}

int cm_ctx_attach(cm_ctx *ctx, int peer, cm_transport *t, void *priv) {
    if (!t || peer < 0 || peer >= ctx->size || peer == ctx->rank || ctx->chans[peer].ops) return CM_E_INVALID;
    cm_chan *c = &ctx->chans[peer];
    c->ops = t->ops;
    c->tp = t;
    c->priv = priv;
    if (!t->ops->poll_fd) ctx->waker_chans++;
    return CM_OK;
}

static void free_unexp(cm_chan *c) {
    while (c->unexp) { cm_unexp *u = c->unexp; c->unexp = u->next; free(u->data); free(u); }
    c->unexp_tail = NULL;
}

#define FLUSH_NS 2000000000LL          /* the longest a closing context waits for its sends to leave */

static int busy(cm_ctx *ctx) {
    for (int i = 0; i < ctx->ntp; i++)
        if (ctx->tp[i].ops->busy && ctx->tp[i].ops->busy(ctx, &ctx->tp[i])) return 1;
    return 0;
}

void cm_ctx_free(cm_ctx *ctx) {
    if (!ctx) return;
    /* A send may complete for the caller before its bytes left (rdma copies small messages into a
     * buffer of its own): let them leave before the endpoints close, or a peer would miss them. */
    for (int64_t until = cm_now_ns() + FLUSH_NS; !ctx->failed && busy(ctx) && cm_now_ns() < until;)
        if (cm_progress(ctx) <= 0) sched_yield();
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->ops && c->ops->free) c->ops->free(ctx, c);
        free_unexp(c);
    }
    for (int i = 0; i < ctx->ntp; i++)
        if (ctx->tp[i].ops->release) ctx->tp[i].ops->release(ctx, &ctx->tp[i]);
    cm_unqueue_all(ctx);                          /* collectives that never started: freed with the rest */
    while (ctx->active) { cm_exec *e = ctx->active; ctx->active = e->next_active; free(e->steps); free(e->ops); free(e); }
    if (ctx->bell_fd >= 0) close(ctx->bell_fd);
    free(ctx->chans);
    free(ctx->pollfds);
    free(ctx->fr);
    free(ctx->sync_ops);
    free(ctx);
}

/* Another thread (the control plane) learned that this context must fail: a peer was declared
 * dead, or the communicator was revoked. Only atomics are touched here; the thread that owns the
 * context fails it at its next check (cm_check_revoked: every start, and every liveness check of a
 * wait, which the kick brings forward); CM_E_ABORTED aborts it there (cm_ctx_abort: the peers are
 * told). The first code stays. */
void cm_ctx_revoke(cm_ctx *ctx, int code, int peer) {
    int none = 0;
    if (code >= 0) return;
    atomic_store(&ctx->revoke_peer, peer);
    if (atomic_compare_exchange_strong(&ctx->revoked, &none, code)) cm_ctx_kick(ctx);
}

int cm_check_revoked(cm_ctx *ctx) {
    int code = atomic_load(&ctx->revoked);
    if (!code) return CM_OK;
    if (ctx->failed) return ctx->status.code;
    if (code == CM_E_ABORTED) { cm_ctx_abort(ctx); return ctx->status.code; }   /* an abort tells the peers */
    return cm_fail(ctx, code, atomic_load(&ctx->revoke_peer), 0, NULL);
}

void cm_ctx_kick(cm_ctx *ctx) {
    atomic_store(&ctx->kick, 1);
    cm_wake_always(ctx->waker);                /* it may sleep on the word or in poll() */
}

int cm_ctx_try_enter(cm_ctx *ctx) {
    int free_ = 0;
    return atomic_compare_exchange_strong_explicit(&ctx->owned, &free_, 1, memory_order_acquire,
                                                   memory_order_relaxed);
}

/* The holder is a fast-path call in another thread, which returns by its deadline: spin a little
 * (such calls last microseconds), then yield, then nap 50 us at a time. */
void cm_ctx_enter(cm_ctx *ctx) {
    for (unsigned i = 0; !cm_ctx_try_enter(ctx); i++) {
        if (i < 256) cpu_relax();
        else if (i < 512) sched_yield();
        else { struct timespec ts = { 0, 50000 }; nanosleep(&ts, NULL); }
    }
}

void cm_ctx_leave(cm_ctx *ctx) { atomic_store_explicit(&ctx->owned, 0, memory_order_release); }

int cm_ctx_pending(cm_ctx *ctx) {
    int n = 0;
    for (cm_exec *e = ctx->active; e; e = e->next_active) n += !e->done;
    for (cm_exec *e = ctx->coll_queue; e; e = e->next_coll) n++;
    return n;
}

void cm_ctx_counters(cm_ctx *ctx, uint64_t *out, int n) {
    for (int i = 0; i < n && i < 8; i++) out[i] = ctx->counters[i];
}

int cm_ctx_transport_bytes(cm_ctx *ctx, const char *name, uint64_t *out) {
    out[0] = out[1] = 0;
    for (int i = 0; i < ctx->ntp; i++) {
        if (strcmp(ctx->tp[i].ops->name, name)) continue;
        out[0] = ctx->tp[i].tx_bytes;
        out[1] = ctx->tp[i].rx_bytes;
        return 1;
    }
    return 0;
}

const char *cm_ctx_chan_transport(cm_ctx *ctx, int peer) {
    if (peer < 0 || peer >= ctx->size || !ctx->chans[peer].ops) return NULL;
    return ctx->chans[peer].ops->name;
}

/* Tell every peer that this context is dead (each transport its own way), then fail it. */
void cm_ctx_abort(cm_ctx *ctx) {
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->ops && c->ops->abort) c->ops->abort(ctx, c);
    }
    if (!ctx->failed) cm_fail(ctx, CM_E_ABORTED, -1, 0, NULL);
}
