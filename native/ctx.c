/* The context: one per communicator, holding a channel per peer (shm or tcp), the doorbell, the
 * counters and the flight recorder. Built by the Python bootstrap (cm_ctx_new, then a channel per
 * peer), kicked by other threads to wake a waiting engine (cm_ctx_kick), aborted on failure or by
 * the application (cm_ctx_abort, which fails every plan in flight), and freed once no plan runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "comms_native.h"

cm_ctx *cm_ctx_new(int rank, int size, int spin, int yields) {
    if (size < 1 || rank < 0 || rank >= size) return NULL;
    cm_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->chans = calloc((size_t)size, sizeof(cm_chan));
    if (!ctx->chans) { free(ctx); return NULL; }
    ctx->rank = rank;
    ctx->size = size;
    ctx->spin = spin;
    ctx->yields = yields;
    for (int p = 0; p < size; p++) { ctx->chans[p].peer = p; ctx->chans[p].fd = -1; }
    cm_bell_open(ctx);
    return ctx;
}

static void free_unexp(cm_chan *c) {
    while (c->unexp) { cm_unexp *u = c->unexp; c->unexp = u->next; free(u->data); free(u); }
    c->unexp_tail = NULL;
}

void cm_ctx_free(cm_ctx *ctx) {
    if (!ctx) return;
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->fd >= 0) close(c->fd);
        free(c->bounce);
        free_unexp(c);
    }
    while (ctx->active) { cm_exec *e = ctx->active; ctx->active = e->next_active; free(e->steps); free(e->ops); free(e); }
    if (ctx->bell_fd >= 0) close(ctx->bell_fd);
    free(ctx->chans);
    free(ctx->fr);
    free(ctx);
}

int cm_ctx_set_shm(cm_ctx *ctx, void *my_seg, int local_index, int nlocal, int nslots, size_t slot_bytes) {
    if (!my_seg || nslots < 1 || slot_bytes < 64 || slot_bytes % 64 || local_index < 0 || local_index >= nlocal)
        return CM_E_INVALID;
    ctx->my_seg = my_seg;
    ctx->local_index = local_index;
    ctx->nlocal = nlocal;
    ctx->nslots = nslots;
    ctx->slot_bytes = slot_bytes;
    ctx->chan_bytes = sizeof(cm_chan_ctrl) + (size_t)nslots * (CM_SLOT_HDR_BYTES + slot_bytes);
    cm_seg_hdr *h = my_seg;                    /* where shm peers find this context's bell (bell.c) */
    memcpy(h->bell, ctx->bell, sizeof h->bell);
    h->bell_len = ctx->bell_fd >= 0 ? ctx->bell_len : 0;
    atomic_store(&h->bell_broken, ctx->bell_fd < 0);
    return CM_OK;
}

int cm_ctx_add_shm_peer(cm_ctx *ctx, int peer, void *peer_seg, int peer_local_index, int peer_pid) {
    if (!ctx->my_seg || peer < 0 || peer >= ctx->size || peer == ctx->rank || !peer_seg ||
        peer_local_index < 0 || peer_local_index >= ctx->nlocal)
        return CM_E_INVALID;
    cm_seg_hdr *ps = peer_seg;
    if (ps->magic != CM_SEG_MAGIC || ps->nslots != (uint32_t)ctx->nslots || ps->slot_bytes != ctx->slot_bytes)
        return CM_E_INVALID;
    cm_chan *c = &ctx->chans[peer];
    c->type = CM_CHAN_SHM;
    c->peer_seg = ps;
    c->peer_pid = peer_pid;
    c->tx = (cm_chan_ctrl *)((char *)peer_seg + CM_SEG_HDR_BYTES + (size_t)ctx->local_index * ctx->chan_bytes);
    c->tx_slots = (char *)(c->tx + 1);
    c->rx = (cm_chan_ctrl *)((char *)ctx->my_seg + CM_SEG_HDR_BYTES + (size_t)peer_local_index * ctx->chan_bytes);
    c->rx_slots = (char *)(c->rx + 1);
    c->tx_head = atomic_load(&c->tx->head);
    c->rx_tail = atomic_load(&c->rx->tail);
    ctx->has_shm = 1;
    return CM_OK;
}

int cm_ctx_add_tcp_peer(cm_ctx *ctx, int peer, int fd, size_t chunk_bytes) {
    if (peer < 0 || peer >= ctx->size || peer == ctx->rank || fd < 0 || chunk_bytes < 64) return CM_E_INVALID;
    cm_chan *c = &ctx->chans[peer];
    c->bounce = malloc(chunk_bytes);
    if (!c->bounce) return CM_E_NOMEM;
    c->bounce_bytes = chunk_bytes;
    c->type = CM_CHAN_TCP;
    c->fd = fd;
    ctx->has_tcp = 1;
    return CM_OK;
}

void cm_ctx_kick(cm_ctx *ctx) {
    atomic_store(&ctx->kick, 1);
    if (ctx->my_seg) {                         /* wake the waiter if it sleeps on its doorbell or bell */
        atomic_fetch_add(&ctx->my_seg->doorbell, 1);
        cm_shm_notify(ctx->my_seg);
    } else {                                   /* tcp only: it may sleep in poll() */
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&ctx->polling) && ctx->bell_fd >= 0) cm_bell_ring(ctx->bell, ctx->bell_len, NULL);
    }
}

int cm_ctx_set_tcp_delay(cm_ctx *ctx, int peer, int64_t delay_ns) {
    if (peer < 0 || peer >= ctx->size || ctx->chans[peer].type != CM_CHAN_TCP || delay_ns < 0) return CM_E_INVALID;
    ctx->chans[peer].delay_ns = delay_ns;
    return CM_OK;
}

int cm_ctx_pending(cm_ctx *ctx) {
    int n = 0;
    for (cm_exec *e = ctx->active; e; e = e->next_active) n += !e->done;
    return n;
}

void cm_ctx_counters(cm_ctx *ctx, uint64_t *out, int n) {
    for (int i = 0; i < n && i < 8; i++) out[i] = ctx->counters[i];
}

/* Tell every peer that this context is dead: abort word + doorbell on shm, shutdown on tcp. */
void cm_ctx_abort(cm_ctx *ctx) {
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->type == CM_CHAN_SHM) {
            uint64_t zero = 0;
            atomic_compare_exchange_strong(&c->peer_seg->abort, &zero, (uint64_t)ctx->rank + 1);
            atomic_fetch_add(&c->peer_seg->doorbell, 1);
            atomic_store(&c->peer_seg->waiting, 1);   /* force the wake below */
            cm_shm_notify(c->peer_seg);
        } else if (c->type == CM_CHAN_TCP) {
            shutdown(c->fd, SHUT_RDWR);
        }
    }
    if (!ctx->failed) cm_fail(ctx, CM_E_ABORTED, -1, 0, NULL);
}
