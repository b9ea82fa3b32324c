/* The flight recorder: a ring of the last plans a context ran (comms.flight reads it, also from a
 * SIGUSR1 handler's request), and the busy-time and failure counters kept at the end of each plan.
 *
 * cm_fr_start stamps a plan's start and takes the next slot; cm_fr_end stamps its end and outcome,
 * unless newer plans overwrote the slot. A reader (cm_ctx_flight) may run on another thread while
 * the engine writes: the slot index is published with release order, so a reader sees whole
 * entries up to it (an entry still in flight has state 1).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include "comms_native.h"

/* ---- flight recorder --------------------------------------------------------------------------- */
static volatile sig_atomic_t sigusr1_seen = 0;
static void on_sigusr1(int sig) { (void)sig; sigusr1_seen = 1; }

void cm_sigusr1_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigusr1;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
}

int cm_sigusr1_take(void) {
    if (!sigusr1_seen) return 0;
    sigusr1_seen = 0;
    return 1;
}

int cm_ctx_flight_capacity(cm_ctx *ctx, int entries) {
    if (entries < 0) return CM_E_INVALID;
    cm_fr_entry *fr = entries ? calloc((size_t)entries, sizeof *fr) : NULL;
    if (entries && !fr) return CM_E_NOMEM;
    free(ctx->fr);
    ctx->fr = fr;
    ctx->fr_cap = (uint32_t)entries;
    atomic_store(&ctx->fr_next, 0);
    return CM_OK;
}

void cm_fr_start(cm_ctx *ctx, cm_exec *e, const cm_step *plan) {
    e->t_start = cm_now_ns();
    if (!ctx->fr_cap) return;
    uint64_t id = atomic_load_explicit(&ctx->fr_next, memory_order_relaxed);
    cm_fr_entry *f = &ctx->fr[id % ctx->fr_cap];
    f->id = id;
    f->seq = e->sig.seq;
    f->count = e->sig.count;
    f->tag = e->sig.tag;
    f->plan = (uint64_t)(uintptr_t)plan;
    f->t_start_ns = e->t_start;
    f->t_end_ns = 0;
    f->kind = e->sig.kind;
    f->coll = e->sig.coll;
    f->dtype = e->sig.dtype;
    f->redop = e->sig.redop;
    f->root = e->sig.root;
    f->state = 1;
    f->code = 0;
    f->peer = -1;
    e->fr_id = id;
    atomic_store_explicit(&ctx->fr_next, id + 1, memory_order_release);
}

void cm_fr_end(cm_ctx *ctx, cm_exec *e) {
    int64_t now = cm_now_ns();
    ctx->counters[CM_CNT_BUSY_NS] += (uint64_t)(now - e->t_start);
    if (e->code) ctx->counters[CM_CNT_FAILED]++;
    if (!ctx->fr_cap) return;
    cm_fr_entry *f = &ctx->fr[e->fr_id % ctx->fr_cap];
    if (f->id != e->fr_id) return;                 /* overwritten by newer plans */
    f->t_end_ns = now;
    f->code = e->code;
    f->state = e->code ? 3 : 2;
    if (e->code) f->peer = ctx->status.peer;
}

int cm_ctx_flight(cm_ctx *ctx, cm_fr_entry *out, int max) {
    if (!ctx->fr_cap || max <= 0) return 0;
    uint64_t end = atomic_load_explicit(&ctx->fr_next, memory_order_acquire);
    uint64_t n = end < ctx->fr_cap ? end : ctx->fr_cap;
    if (n > (uint64_t)max) n = (uint64_t)max;
    for (uint64_t i = 0; i < n; i++) out[i] = ctx->fr[(end - n + i) % ctx->fr_cap];
    return (int)n;
}
