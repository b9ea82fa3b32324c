/* The flight recorder: a ring of the last plans a context ran (comms.flight reads it, also from a
 * SIGUSR1 handler's request), and the busy-time and failure counters kept at the end of each plan.
 *
 * cm_fr_start stamps a plan's start and takes the next slot; cm_fr_end stamps its end and outcome,
 * unless newer plans overwrote the slot. A reader (cm_ctx_flight) may run on another thread while
 * the engine writes (a SIGUSR1 dump while a collective hangs): the slot index is published with
 * release order, and each slot carries a version, a seqlock: the writer makes it odd before it
 * touches the entry and even again after, so a reader that finds it odd, or changed by the end of
 * its copy, knows the copy may be torn (the ring wrapped onto the slot while it read) and tries
 * again, then leaves the entry out. A reader also leaves out a slot that a newer plan took since
 * it looked at the index, so what it returns is in order, entries whole.
 *
 * Freeing the ring (cm_ctx_flight_capacity, cm_ctx_free) is not guarded here: the caller keeps
 * readers out meanwhile (comms/runtime/engine.py takes the context's handle lock for both).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include "comms_native.h"

struct cm_fr_slot {
    _Atomic uint64_t version;    /* odd while the writer changes the entry */
    cm_fr_entry e;
};

#define READ_TRIES 4             /* copies of a slot that changes under the reader, before it is left out */

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
    struct cm_fr_slot *fr = entries ? calloc((size_t)entries, sizeof *fr) : NULL;
    if (entries && !fr) return CM_E_NOMEM;
    free(ctx->fr);
    ctx->fr = fr;
    ctx->fr_cap = (uint32_t)entries;
    atomic_store(&ctx->fr_next, 0);
    return CM_OK;
}

/* The writer's side of a slot's seqlock (only the context's owner writes). */
static cm_fr_entry *write_begin(struct cm_fr_slot *slot) {
    uint64_t v = atomic_load_explicit(&slot->version, memory_order_relaxed);
    atomic_store_explicit(&slot->version, v + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);      /* odd before any byte of the entry changes */
    return &slot->e;
}

static void write_end(struct cm_fr_slot *slot) {
    uint64_t v = atomic_load_explicit(&slot->version, memory_order_relaxed);
    atomic_store_explicit(&slot->version, v + 1, memory_order_release);   /* even after every byte */
}

void cm_fr_start(cm_ctx *ctx, cm_exec *e, const cm_step *plan, int64_t now) {
    e->t_start = now;
    if (!ctx->fr_cap) return;
    uint64_t id = atomic_load_explicit(&ctx->fr_next, memory_order_relaxed);
    struct cm_fr_slot *slot = &ctx->fr[id % ctx->fr_cap];
    cm_fr_entry *f = write_begin(slot);
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
    write_end(slot);
    e->fr_id = id;
    atomic_store_explicit(&ctx->fr_next, id + 1, memory_order_release);
}

void cm_fr_end(cm_ctx *ctx, cm_exec *e) {
    int64_t now = e->t_end = cm_now_ns();
    ctx->counters[CM_CNT_BUSY_NS] += (uint64_t)(now - e->t_start);
    if (e->code) ctx->counters[CM_CNT_FAILED]++;
    if (!ctx->fr_cap) return;
    struct cm_fr_slot *slot = &ctx->fr[e->fr_id % ctx->fr_cap];
    if (slot->e.id != e->fr_id) return;            /* overwritten by newer plans (only this thread writes) */
    cm_fr_entry *f = write_begin(slot);
    f->t_end_ns = now;
    f->code = e->code;
    f->state = e->code ? 3 : 2;
    if (e->code) f->peer = ctx->status.peer;
    write_end(slot);
}

/* A whole copy of plan ``id``'s entry into *out, if its slot holds it: 0 when the slot was being
 * written at every try, or holds another plan by now. */
static int read_slot(struct cm_fr_slot *slot, uint64_t id, cm_fr_entry *out) {
    for (int t = 0; t < READ_TRIES; t++) {
        uint64_t v1 = atomic_load_explicit(&slot->version, memory_order_acquire);
        if (v1 & 1) { cpu_relax(); continue; }
        memcpy(out, (const void *)&slot->e, sizeof *out);
        atomic_thread_fence(memory_order_acquire);  /* the copy before the second look */
        uint64_t v2 = atomic_load_explicit(&slot->version, memory_order_relaxed);
        if (v1 != v2) { cpu_relax(); continue; }
        return out->id == id;                        /* a newer plan's: not the one asked for */
    }
    return 0;
}

int cm_ctx_flight(cm_ctx *ctx, cm_fr_entry *out, int max) {
    if (!ctx->fr_cap || max <= 0) return 0;
    uint64_t end = atomic_load_explicit(&ctx->fr_next, memory_order_acquire);
    uint64_t n = end < ctx->fr_cap ? end : ctx->fr_cap;
    if (n > (uint64_t)max) n = (uint64_t)max;
    int got = 0;
    for (uint64_t id = end - n; id < end; id++)
        got += read_slot(&ctx->fr[id % ctx->fr_cap], id, &out[got]);
    return got;
}
