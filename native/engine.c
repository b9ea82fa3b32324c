/* The progress engine: runs plans (arrays of cm_step) over the channels of any transport.
 *
 * A plan executes in order. SEND / RECV / RECV_REDUCE steps post an operation on the peer's channel
 * and do not wait; PHASE waits until every posted operation of the plan has completed; COPY,
 * REDUCE, REDUCE_SLOTS and DIV run locally when reached. Each channel keeps a FIFO of posted sends
 * and one of posted receives. Collective messages match the oldest posted collective receive and
 * must agree with it on (seq, collective, dtype, op, root, count, bytes), otherwise every rank is
 * told through CM_E_MISMATCH here and an abort on the others. P2P messages match by tag; those that
 * arrive before their receive are kept aside (unexpected queue).
 *
 * Collectives on one context run one at a time, in start order (later ones queue); p2p plans start
 * at once. The first failure (peer gone, mismatch, timeout) fails the whole context, like a broken
 * gloo pair: every plan in flight ends with that error and the context must be rebuilt.
 *
 * Channels are driven through their transport's table of operations (comms_native.h): the engine
 * never asks which transport a channel belongs to. Waiting spins for as long as spinning pays
 * (wait.c: not at all on kernel-fed transports, an adaptive budget on the others), then yields
 * `yields` times, then sleeps (on the waker's futex word, or in poll() over the transports'
 * descriptors), waking up at least every 20 ms. Deadlines and liveness are looked at while data
 * moves too.
 * Nothing here takes the GIL; the caller serializes calls on one context.
 *
 * The context itself is in ctx.c, matching an arriving message to its receive in match.c, and the
 * flight recorder in flight.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "comms_native.h"

int64_t cm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- the active list ------------------------------------------------------------------------------ */
static void activate(cm_ctx *ctx, cm_exec *e) {
    e->next_active = ctx->active;
    ctx->active = e;
}

/* Move the collectives queued behind the running one (never started, in no other list) into the
 * active list, where failing or freeing the context finds every plan. */
void cm_unqueue_all(cm_ctx *ctx) {
    while (ctx->coll_queue) {
        cm_exec *e = ctx->coll_queue;
        ctx->coll_queue = e->next_coll;
        activate(ctx, e);
    }
    ctx->coll_queue_tail = NULL;
}

/* ---- failure ---------------------------------------------------------------------------------- */
int cm_fail(cm_ctx *ctx, int code, int peer, int sys_errno, const cm_op *op) {
    if (ctx->failed) return ctx->status.code;
    ctx->failed = 1;
    cm_status *st = &ctx->status;
    st->code = code;
    st->peer = peer;
    st->sys_errno = sys_errno;
    st->step = op ? op->step : -1;
    st->done_bytes = op ? op->done : 0;
    st->want_bytes = op ? op->nbytes : 0;
    if (op) st->local = op->exec->sig;
    for (int i = 0; i < ctx->ntp; i++)            /* revoke what peers may still reach (rdma MRs) */
        if (ctx->tp[i].ops->fail) ctx->tp[i].ops->fail(ctx, &ctx->tp[i]);
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        c->sendq = c->sendq_tail = c->recvq = c->recvq_tail = NULL;
        c->rx_op = NULL;
        c->rx_active = 0;
    }
    cm_unqueue_all(ctx);                          /* queued collectives end too */
    for (cm_exec *e = ctx->active; e; e = e->next_active)
        if (!e->done) { e->done = 1; e->code = code; cm_fr_end(ctx, e); }
    ctx->coll_active = NULL;
    ctx->anyq = ctx->anyq_tail = NULL;
    return code;
}

/* The CM_* code (comms_native.h) of a failed system call whose errno is err, which goes to *sys_errno. */
int cm_sys_fail(int err, int *sys_errno) {
    if (sys_errno) *sys_errno = err;
    return err == ENOSPC || err == ENOMEM || err == EFBIG ? CM_E_NOMEM : CM_E_SYS;
}

/* ---- plans ------------------------------------------------------------------------------------ */
/* A receive from any source takes the oldest complete early message with its tag, on any channel
 * (lowest rank first), or waits in ctx->anyq; cm_match offers it every p2p message with its tag
 * that no receive from that specific source wants. */
static void post_any(cm_ctx *ctx, cm_exec *e, cm_op *op) {
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        for (cm_unexp *u = c->unexp; u; u = u->next) {
            if (u->tag != e->sig.tag || u->waiter || !u->complete) continue;
            op->peer = p;
            if (u->nbytes != op->nbytes) {
                ctx->status.remote.tag = u->tag;
                ctx->status.remote.nbytes = u->nbytes;
                cm_fail(ctx, CM_E_TRUNCATE, p, 0, op);
                return;
            }
            cm_unexp_to_op(ctx, c, u, op);
            return;
        }
    }
    if (ctx->anyq_tail) ctx->anyq_tail->next = op; else ctx->anyq = op;
    ctx->anyq_tail = op;
}

static cm_op *new_op(cm_ctx *ctx, cm_exec *e, const cm_step *s) {
    cm_op *op = &e->ops[e->nops++];
    memset(op, 0, sizeof *op);
    op->exec = e;
    op->kind = s->kind;
    op->peer = s->peer;
    op->step = (int)(s - e->steps);
    op->ptr = e->bufs[s->buf] + s->off;
    op->nbytes = s->nbytes;
    if (ctx->trace) op->t_post = cm_now_ns();
    e->pending++;
    return op;
}

/* the transport that runs BOARD steps (coll_post), or NULL */
static cm_transport *coll_transport(cm_ctx *ctx) {
    for (int i = 0; i < ctx->ntp; i++)
        if (ctx->tp[i].ops->coll_post) return &ctx->tp[i];
    return NULL;
}

/* The op of a gated send's gate (step aux - 1): a receive of the same bytes posted earlier in the
 * same batch (cm_plan_check refuses any other plan; one that was not checked fails here). */
static const cm_op *gate_of(const cm_exec *e, const cm_op *op, const cm_step *s) {
    uint64_t g = s->aux - 1;
    for (const cm_op *o = op - 1; o >= e->ops; o--) {
        if ((uint64_t)o->step != g) continue;
        return cm_gate_matches(&e->steps[g], s) ? o : NULL;
    }
    return NULL;
}

static void post(cm_ctx *ctx, cm_exec *e, const cm_step *s) {
    cm_op *op = new_op(ctx, e, s);
    if (s->peer == CM_ANY_SOURCE) { post_any(ctx, e, op); return; }
    cm_chan *c = &ctx->chans[s->peer];
    if (s->kind == CM_STEP_SEND) {
        if (s->aux && !(op->gate = gate_of(e, op, s))) { cm_fail(ctx, CM_E_INVALID, s->peer, 0, op); return; }
        if (c->sendq_tail) c->sendq_tail->next = op; else c->sendq = op;
        c->sendq_tail = op;
        return;
    }
    if (!e->is_coll) {                         /* an earlier unexpected message may match */
        for (cm_unexp *u = c->unexp; u; u = u->next) {
            if (u->tag != e->sig.tag || u->waiter) continue;
            if (u->nbytes != op->nbytes) {
                ctx->status.remote.tag = u->tag;
                ctx->status.remote.nbytes = u->nbytes;
                cm_fail(ctx, CM_E_TRUNCATE, s->peer, 0, op);
                return;
            }
            if (u->complete) cm_unexp_to_op(ctx, c, u, op);
            else u->waiter = op;
            return;
        }
    }
    if (c->recvq_tail) c->recvq_tail->next = op; else c->recvq = op;
    c->recvq_tail = op;
}

static void start_next_coll(cm_ctx *ctx);

/* Small sends just posted that head their channel's queue go out at once where the transport asks
 * for it (send_at_post: a pass that reads a completion queue costs a system call on the software
 * providers): the call then skips that pass (a send that completes here lets the plan go on at
 * once; rdma's 8 B ping-pong about 1 us faster). Larger ones wait for the progress loop, which
 * paces bulk transfers. shm and tcp do not ask: their 8 B all_reduce measured no faster so. */
#define SEND_NOW_BYTES (16u << 10)
static void send_now(cm_ctx *ctx, cm_exec *e, int first) {
    for (int i = first; i < e->nops && !ctx->failed; i++) {
        cm_op *op = &e->ops[i];
        if (op->kind != CM_STEP_SEND || op->nbytes > SEND_NOW_BYTES || op->complete) continue;
        cm_chan *c = &ctx->chans[op->peer];
        if (c->ops->send_at_post && c->sendq == op && c->ops->progress_send(ctx, c) < 0) return;
    }
}

/* Run local steps and post communication until the plan must wait or ends. Consecutive
 * communication steps are posted together; a local step or PHASE after them runs only once all
 * of them completed. */
static void advance(cm_ctx *ctx, cm_exec *e) {
    while (!e->done && e->pending == 0) {
        if (e->next == e->nsteps) {
            e->done = 1;
            e->code = CM_OK;
            cm_fr_end(ctx, e);
            ctx->progressed = 1;
            if (ctx->coll_active == e) { ctx->coll_active = NULL; start_next_coll(ctx); }
            return;
        }
        const cm_step *s = &e->steps[e->next++];
        size_t esz = cm_dtype_size(e->sig.dtype);
        int r = CM_OK;
        switch (s->kind) {
        case CM_STEP_SEND: case CM_STEP_RECV: case CM_STEP_RECV_REDUCE: {
            int first = e->nops;
            post(ctx, e, s);
            /* keep posting until a PHASE */
            while (!ctx->failed && e->next < e->nsteps && e->steps[e->next].kind <= CM_STEP_RECV_REDUCE)
                post(ctx, e, &e->steps[e->next++]);
            send_now(ctx, e, first);
            break;
        }
        case CM_STEP_COPY:
            if (s->nbytes) memmove(e->bufs[s->buf] + s->off, e->bufs[s->buf2] + s->off2, s->nbytes);
            break;
        case CM_STEP_REDUCE:
            r = cm_reduce(e->bufs[s->buf] + s->off, e->bufs[s->buf2] + s->off2, s->nbytes / esz, e->sig.dtype, e->sig.redop & CM_REDOP_MASK);
            break;
        case CM_STEP_REDUCE_SLOTS:
            r = cm_reduce_slots(e->bufs[s->buf] + s->off, e->bufs[s->buf2] + s->off2, s->aux, s->peer,
                                s->nbytes / esz, e->sig.dtype, e->sig.redop & CM_REDOP_MASK);
            break;
        case CM_STEP_DIV:
            r = cm_div(e->bufs[s->buf] + s->off, s->nbytes / esz, e->sig.dtype, (int64_t)s->aux);
            break;
        case CM_STEP_PHASE:
            break;
        case CM_STEP_BOARD: {
            cm_op *op = new_op(ctx, e, s);
            cm_transport *t = coll_transport(ctx);
            r = t ? t->ops->coll_post(ctx, t, op) : CM_E_INVALID;
            break;
        }
        default:
            r = CM_E_INVALID;
        }
        if (r < 0) { cm_fail(ctx, r, -1, 0, NULL); return; }
        if (ctx->failed) return;
    }
}

static void start_next_coll(cm_ctx *ctx) {
    while (!ctx->coll_active && ctx->coll_queue) {
        cm_exec *e = ctx->coll_queue;
        ctx->coll_queue = e->next_coll;
        if (!ctx->coll_queue) ctx->coll_queue_tail = NULL;
        ctx->coll_active = e;
        e->started = 1;
        activate(ctx, e);
        advance(ctx, e);
    }
}

static int validate(cm_ctx *ctx, const cm_step *steps, int nsteps, const uintptr_t *bufs, int nbufs, const cm_hdr *sig) {
    if (nbufs < 0 || nbufs > CM_MAX_BUFS || nsteps < 0) return CM_E_INVALID;
    if (!cm_dtype_size(sig->dtype)) return CM_E_INVALID;
    for (int i = 0; i < nsteps; i++) {
        const cm_step *s = &steps[i];
        if (s->kind < CM_STEP_SEND || s->kind > CM_STEP_BOARD) return CM_E_INVALID;
        if (s->kind == CM_STEP_PHASE) continue;
        if (s->kind == CM_STEP_BOARD) {
            if (s->buf < 0 || s->buf >= nbufs || (s->nbytes && !bufs[s->buf]) || !coll_transport(ctx) ||
                sig->kind != CM_MSG_COLL)
                return CM_E_INVALID;
            continue;
        }
        if (s->buf < 0 || s->buf >= nbufs || (s->nbytes && !bufs[s->buf])) return CM_E_INVALID;
        if (s->kind <= CM_STEP_RECV_REDUCE) {
            if (s->peer == CM_ANY_SOURCE && s->kind == CM_STEP_RECV && sig->kind == CM_MSG_P2P) continue;
            if (s->peer < 0 || s->peer >= ctx->size || s->peer == ctx->rank || !ctx->chans[s->peer].ops)
                return CM_E_INVALID;
        } else if (s->kind != CM_STEP_DIV) {
            if (s->buf2 < 0 || s->buf2 >= nbufs || (s->nbytes && !bufs[s->buf2])) return CM_E_INVALID;
        }
    }
    return CM_OK;
}

/* Start a plan in ``e`` (zeroed by the caller): ``ops`` has room for its messages; ``steps`` is the
 * plan itself (a synchronous run's, which outlives it) or the exec's own copy. */
static int exec_begin(cm_ctx *ctx, cm_exec *e, cm_step *steps, cm_op *ops, int nsteps, const uintptr_t *bufs,
                      int nbufs, const cm_hdr *sig, uint64_t seq, int64_t deadline_ns, int64_t now) {
    e->steps = steps;
    e->ops = ops;
    e->nsteps = nsteps;
    for (int i = 0; i < nbufs; i++) e->bufs[i] = (char *)bufs[i];
    e->sig = *sig;
    e->sig.magic = CM_MAGIC;
    e->sig.seq = seq;
    e->is_coll = sig->kind == CM_MSG_COLL;
    e->no = e->is_coll ? ++ctx->colls : 0;
    e->deadline = deadline_ns;
    ctx->counters[CM_CNT_EXECS]++;
    cm_fr_start(ctx, e, steps, now);
    if (e->is_coll) {
        if (ctx->coll_queue_tail) ctx->coll_queue_tail->next_coll = e; else ctx->coll_queue = e;
        ctx->coll_queue_tail = e;
        start_next_coll(ctx);
    } else {
        e->started = 1;
        activate(ctx, e);
        advance(ctx, e);
    }
    return ctx->failed ? ctx->status.code : CM_OK;
}

static int grow_sync_ops(cm_ctx *ctx, int n) {
    cm_op *ops = realloc(ctx->sync_ops, sizeof(cm_op) * (size_t)(n > 0 ? n : 1));
    if (!ops) return 0;
    ctx->sync_ops = ops;
    ctx->sync_ops_cap = n;
    return 1;
}

static int count_ops(const cm_step *steps, int nsteps) {
    int ncomm = 0;
    for (int i = 0; i < nsteps; i++) ncomm += steps[i].kind <= CM_STEP_RECV_REDUCE || steps[i].kind == CM_STEP_BOARD;
    return ncomm;
}

/* Number, check and start a plan. A synchronous run (``own``) takes the context's own exec when
 * that is free: no allocation, and no copy of the steps, which outlive the run. Anything else gets
 * a fresh exec with its own copy of the steps. */
static int exec_start(cm_ctx *ctx, const cm_step *steps, int nsteps, const uintptr_t *bufs, int nbufs,
                      const cm_hdr *sig, int64_t deadline_ns, int64_t now, int own, cm_exec **out) {
    *out = NULL;
    uint64_t seq = sig->kind == CM_MSG_COLL ? ++ctx->seq : 0;   /* numbered even when it fails to start */
    if (ctx->failed) return ctx->status.code;
    if (atomic_load(&ctx->revoked)) return cm_check_revoked(ctx);
    int r = validate(ctx, steps, nsteps, bufs, nbufs, sig);
    if (r < 0) return r;
    int ncomm = count_ops(steps, nsteps);
    if (own && !ctx->sync_busy && (ncomm <= ctx->sync_ops_cap || grow_sync_ops(ctx, ncomm))) {
        cm_exec *e = *out = &ctx->sync_exec;
        memset(e, 0, sizeof *e);
        ctx->sync_busy = 1;
        return exec_begin(ctx, e, (cm_step *)steps, ctx->sync_ops, nsteps, bufs, nbufs, sig, seq, deadline_ns, now);
    }
    cm_exec *e = calloc(1, sizeof *e);
    cm_step *copy = NULL;
    cm_op *ops = NULL;
    if (!e || !(copy = malloc(sizeof(cm_step) * (size_t)(nsteps > 0 ? nsteps : 1))) ||
        !(ops = malloc(sizeof(cm_op) * (size_t)(ncomm > 0 ? ncomm : 1)))) {
        free(copy);
        free(e);
        return CM_E_NOMEM;
    }
    memcpy(copy, steps, sizeof(cm_step) * (size_t)nsteps);
    *out = e;
    return exec_begin(ctx, e, copy, ops, nsteps, bufs, nbufs, sig, seq, deadline_ns, now);
}

int cm_exec_start(cm_ctx *ctx, const cm_step *steps, int nsteps, const uintptr_t *bufs, int nbufs,
                  const cm_hdr *sig, int64_t deadline_ns, cm_exec **out) {
    return exec_start(ctx, steps, nsteps, bufs, nbufs, sig, deadline_ns, cm_now_ns(), 0, out);
}

/* One pass over every transport and channel; returns 1 if anything moved, < 0 on failure. Queued
 * sends go out first (a send need not wait for a completion queue to be read), then each
 * transport's context-wide progress (completion queues), then every channel's arrivals. */
static int progress(cm_ctx *ctx) {
    ctx->progressed = 0;
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->sendq) {
            int r = c->ops->progress_send(ctx, c);
            if (r < 0) return r;
        }
    }
    for (int i = 0; i < ctx->ntp; i++) {
        cm_transport *t = &ctx->tp[i];
        if (t->ops->progress) {
            int r = t->ops->progress(ctx, t);
            if (r < 0) return r;
        }
    }
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (!c->ops) continue;
        int r = c->ops->progress_recv(ctx, c);    /* always: notices arrivals, EOF and early p2p messages */
        if (r < 0) return r;
    }
    if (ctx->progressed) {
        for (cm_exec *e = ctx->active; e; e = e->next_active)
            if (!e->done && e->started && e->pending == 0) advance(ctx, e);
        if (ctx->failed) return ctx->status.code;
    }
    return ctx->progressed;
}

int cm_progress(cm_ctx *ctx) { return progress(ctx); }

static int first_pending_peer(cm_exec *e, cm_op **which) {
    for (int pass = 0; pass < 2; pass++) {    /* receives first: they name who we wait for */
        for (int i = 0; i < e->nops; i++) {
            cm_op *op = &e->ops[i];
            if (!op->complete && (op->kind == CM_STEP_SEND) == pass) { *which = op; return op->peer; }
        }
    }
    *which = NULL;
    return -1;
}

static int check_liveness(cm_ctx *ctx) {
    if (atomic_load(&ctx->revoked)) return cm_check_revoked(ctx);
    for (int i = 0; i < ctx->ntp; i++) {
        cm_transport *t = &ctx->tp[i];
        int r = t->ops->ctx_alive ? t->ops->ctx_alive(ctx, t) : CM_OK;
        if (r < 0) return r;
    }
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        int r = c->ops && c->ops->alive ? c->ops->alive(ctx, c) : CM_OK;
        if (r < 0) return r;
    }
    return CM_OK;
}

/* A wait's status: the failure's, or only code 0 (CM_OK) after a success, which is all callers read
 * of one. */
static void fill_status(cm_ctx *ctx, cm_exec *e, cm_status *st) {
    if (!st) return;
    if (!ctx->failed && e && e->done && e->code == CM_OK) { st->code = CM_OK; return; }
    if (ctx->failed) *st = ctx->status;
    else memset(st, 0, sizeof *st);
    if (e) st->local = e->sig;
    st->local.magic = CM_MAGIC;
}

#define CONTENDED_YIELDS 32              /* yields before sleeping while the CPU is contended */

/* How long this wait may spin before it yields and sleeps: 0 when every operation it still waits
 * for is on a transport that says spinning never pays (tcp), else the context's adaptive budget.
 * COMMS_SPIN (spin_polls) overrides the adaptive budget with a fixed count of polls. */
static int64_t wait_spin_ns(cm_ctx *ctx, cm_exec *e, int64_t now) {
    int64_t spin = 0;
    for (int i = 0; i < e->nops; i++) {
        cm_op *op = &e->ops[i];
        if (op->complete) continue;
        const cm_transport_ops *ops = op->peer >= 0 && op->peer < ctx->size ? ctx->chans[op->peer].ops : NULL;
        if (!ops || ops->spin_ns == CM_SPIN_ADAPTIVE) return cm_spin_budget(ctx, now);   /* any source too */
        if (ops->spin_ns > spin) spin = ops->spin_ns;
    }
    return spin;
}

/* Deadlines (of every plan in flight, not only the one waited for) and liveness, looked at while
 * data moves as well as while idle: traffic with one peer, or a wait on another plan, must not
 * postpone a timeout with another. The running plans are looked at on every call, the collectives
 * queued behind the running one every 20 ms (thousands of them may wait there: asynchronous calls
 * nobody waited for yet). Returns 1 when the context failed. */
static int overdue(cm_ctx *ctx, cm_exec *e, int64_t now, int64_t *last_check) {
    cm_exec *late = now >= e->deadline && !e->done ? e : NULL;
    for (cm_exec *a = ctx->active; a && !late; a = a->next_active)
        if (!a->done && now >= a->deadline) late = a;
    if (!late && ctx->coll_queue && now - ctx->queue_checked > 20000000LL) {   /* the context's clock: */
        ctx->queue_checked = now;                     /* sliced waits (the progress thread) are short */
        for (cm_exec *q = ctx->coll_queue; q && !late; q = q->next_coll)
            if (now >= q->deadline) late = q;
    }
    if (late) {                                   /* a queued one waits on the peer the running one does */
        cm_op *op;
        int peer = first_pending_peer(late->started || !ctx->coll_active ? late : ctx->coll_active, &op);
        cm_fail(ctx, CM_E_TIMEOUT, peer, 0, late->started ? op : NULL);
        return 1;
    }
    if (now - *last_check > 20000000LL) {            /* every 20 ms */
        *last_check = now;
        if (check_liveness(ctx) < 0) return 1;
    }
    return 0;
}

/* A wait from ``start`` (the clock now, or when a synchronous run started its plan just before). */
static int exec_wait(cm_ctx *ctx, cm_exec *e, int64_t block_ns, cm_status *st, int64_t start) {
    if (e->done) { fill_status(ctx, e, st); return e->code; }   /* it ended as it started */
    int64_t last_check = start, last_clock = start, idle_since = -1;
    /* a sliced wait (the progress thread, block_ns >= 0) never spins: it sleeps at once, so an
     * asynchronous operation in flight leaves the core to the thread that started it */
    int64_t spin_ns = block_ns >= 0 ? 0 : wait_spin_ns(ctx, e, start);
    int fixed = spin_ns > 0 && ctx->spin_polls > 0, adaptive = spin_ns > 0 && !fixed;
    int polls = 0, yields = 0, spinning = spin_ns > 0;
    unsigned passes = 0;
    for (;;) {
        if (e->done) { fill_status(ctx, e, st); return e->code; }
        int r = progress(ctx);
        if (r < 0) continue;                          /* e->done is set by cm_fail */
        passes++;
        if (r > 0) {
            if (idle_since >= 0 || (passes & 63) == 0) {
                int64_t now = e->done ? e->t_end : cm_now_ns();   /* it just ended: the clock then */
                if (idle_since >= 0 && adaptive) cm_spin_learn(ctx, now - idle_since);
                idle_since = -1;
                if (overdue(ctx, e, now, &last_check)) continue;
                if (block_ns >= 0 && !e->done && (now - start >= block_ns || atomic_exchange(&ctx->kick, 0))) {
                    fill_status(ctx, e, st);
                    return CM_EAGAIN;
                }
            }
            polls = 0; yields = 0; spinning = spin_ns > 0;
            continue;
        }
        if (idle_since < 0) idle_since = last_clock = passes == 1 ? start : cm_now_ns();   /* idle from the start */
        if (spinning) {
            ++polls;
            if (fixed) spinning = polls < ctx->spin_polls;
            else if ((polls & 63) == 0) {
                int64_t now = cm_now_ns();
                if (now - last_clock > CM_PREEMPT_GAP_NS) {     /* off the CPU while spinning */
                    cm_spin_gap(ctx, now, now - last_clock);
                    spin_ns = cm_spin_budget(ctx, now);
                }
                last_clock = now;
                spinning = now - idle_since < spin_ns;
            }
            if (spinning) { cpu_relax(); continue; }
        }
        if (block_ns >= 0 && atomic_exchange(&ctx->kick, 0)) { fill_status(ctx, e, st); return CM_EAGAIN; }
        int64_t now = cm_now_ns();
        if (overdue(ctx, e, now, &last_check)) continue;
        if (block_ns >= 0 && now - start >= block_ns) { fill_status(ctx, e, st); return CM_EAGAIN; }
        /* yield before sleeping only where a spin was worth starting (on a contended CPU that hands
         * it to whoever wants it); a wait on kernel-fed channels goes straight to poll() */
        int ylim = now < ctx->contended_until && ctx->yields > CONTENDED_YIELDS ? CONTENDED_YIELDS : ctx->yields;
        if (spin_ns > 0 && yields < ylim) { yields++; sched_yield(); continue; }
        int64_t nap = e->deadline - now;
        if (nap > 20000000LL) nap = 20000000LL;
        if (block_ns >= 0 && block_ns - (now - start) < nap) nap = block_ns - (now - start);
        if (nap < 1000) nap = 1000;
        cm_sleep(ctx, nap);
        /* what arrived during the sleep is taken first: a peer that finished this plan and then
         * aborted on a later one (a mismatch it found) must not void data already here; liveness
         * is looked at when nothing moved */
        if (progress(ctx) == 0) check_liveness(ctx);
    }
}

int cm_exec_wait(cm_ctx *ctx, cm_exec *e, int64_t block_ns, cm_status *st) {
    return exec_wait(ctx, e, block_ns, st, cm_now_ns());
}

int cm_exec_test(cm_ctx *ctx, cm_exec *e, cm_status *st) {
    if (!e->done) {
        int r;
        do { r = progress(ctx); } while (r > 0 && !e->done);
        int64_t now = cm_now_ns(), no_liveness = now;
        if (!e->done) overdue(ctx, e, now, &no_liveness);
    }
    if (!e->done) return CM_EAGAIN;
    fill_status(ctx, e, st);
    return e->code;
}

void cm_exec_free(cm_ctx *ctx, cm_exec *e) {
    if (!e) return;
    if (!e->done) return;                             /* never free a plan whose ops are queued */
    cm_exec **pp = &ctx->active;
    while (*pp && *pp != e) pp = &(*pp)->next_active;
    if (*pp) *pp = e->next_active;
    if (e == &ctx->sync_exec) { ctx->sync_busy = 0; return; }   /* the context's own: kept */
    free(e->steps);
    free(e->ops);
    free(e);
}

void cm_ctx_set_trace(cm_ctx *ctx, int on) { ctx->trace = on; }

int cm_exec_op_times(cm_exec *e, int64_t *out, int max) {
    int n = e->nops < max ? e->nops : max;
    for (int i = 0; i < n; i++) { out[2 * i] = e->ops[i].t_post; out[2 * i + 1] = e->ops[i].t_done; }
    return n;
}

int cm_exec_peer(cm_exec *e, int i) { return i >= 0 && i < e->nops ? e->ops[i].peer : -1; }

/* A synchronous run: start (in the context's own exec when free), wait, free; ``now``: the clock
 * (read once for the deadline, the flight recorder and the wait). */
static int exec_run(cm_ctx *ctx, const cm_step *steps, int nsteps, const uintptr_t *bufs, int nbufs,
                    const cm_hdr *sig, int64_t deadline_ns, int64_t now, cm_status *st) {
    cm_exec *e;
    int r = exec_start(ctx, steps, nsteps, bufs, nbufs, sig, deadline_ns, now, 1, &e);
    if (!e) { fill_status(ctx, NULL, st); if (st) st->code = r; return r; }
    r = exec_wait(ctx, e, -1, st, now);
    cm_exec_free(ctx, e);
    return r;
}

int cm_exec_run(cm_ctx *ctx, const cm_step *steps, int nsteps, const uintptr_t *bufs, int nbufs,
                const cm_hdr *sig, int64_t deadline_ns, cm_status *st) {
    return exec_run(ctx, steps, nsteps, bufs, nbufs, sig, deadline_ns, cm_now_ns(), st);
}

/* The synchronous call of an in-place single-buffer collective from Python's fast path: buffers
 * in = out = buf, the call's scratch; the deadline is the call's timeout from now. Three spellings
 * of the buffer, so that Python passes what it has without converting it: a cffi buffer (a
 * pointer), a torch tensor's data_ptr() (an integer), or a numpy array itself (its id(), read by
 * cm_array_data in peek.c). */
static int call_run2(cm_call *c, uintptr_t in, uintptr_t out) {
    cm_ctx *ctx = c->ctx;
    if (!cm_ctx_try_enter(ctx)) return CM_EBUSY;
    uintptr_t bufs[3] = { in, out, c->scratch };
    int64_t now = cm_now_ns();
    int r = exec_run(ctx, c->steps, c->nsteps, bufs, 3, c->sig, now + c->timeout_ns, now, &c->status);
    cm_ctx_leave(ctx);
    return r;
}

static int call_run(cm_call *c, uintptr_t buf) { return call_run2(c, buf, buf); }

int cm_call_run(cm_call *c, void *buf) { return call_run(c, (uintptr_t)buf); }
int cm_call_run_addr(cm_call *c, uintptr_t buf) { return call_run(c, buf); }
int cm_call_run_array(cm_call *c, uintptr_t obj) {
    uintptr_t buf = cm_array_data(obj);
    return buf ? call_run(c, buf) : CM_ESLOW;
}

/* The synchronous call of a two-buffer collective (all_gather, reduce_scatter, all_to_all): the buffers
 * aliased as the plan was built for (c->aliased: the input starts c->in_at bytes from the output's start,
 * as in an in-place all_gather or reduce_scatter; else the two share no byte), else CM_ESLOW, nothing
 * run: Python's checks then say what is wrong, or build the plan for that aliasing. Two spellings, as
 * above: numpy arrays (C-contiguous and writable, cm_array_data) or addresses (torch's data_ptr()). */
int cm_call_run_pair_addr(cm_call *c, uintptr_t in, uintptr_t out) {
    if (c->aliased ? in != out + (uintptr_t)c->in_at
                   : in < out + c->out_bytes && out < in + c->in_bytes && c->in_bytes && c->out_bytes)
        return CM_ESLOW;
    return call_run2(c, in, out);
}

int cm_call_run_pair(cm_call *c, uintptr_t in_obj, uintptr_t out_obj) {
    uintptr_t in = cm_array_data(in_obj), out = cm_array_data(out_obj);
    return in && out ? cm_call_run_pair_addr(c, in, out) : CM_ESLOW;
}

uint64_t cm_ctx_seq(cm_ctx *ctx) { return ctx->seq; }
void cm_ctx_set_seq(cm_ctx *ctx, uint64_t seq) { ctx->seq = seq; }
