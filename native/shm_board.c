/* The board: an all_reduce of a small buffer among ranks that all share one host, through slots in
 * shared memory instead of messages (a BOARD step, the shm transport's coll_post).
 *
 * Each rank's segment ends with its board: a `done` word and two slots (header + payload, a
 * payload of up to 24 bytes inside the header's cache line), used alternately. Board ops are numbered by the context's count of collectives (cm_exec.no: the same
 * on every rank, and never reset, unlike the sequence numbers, which calibration sets back to 0).
 * For the BOARD op of collective number k:
 *
 * 1. post: the rank may overwrite slot k & 1 once every peer has read what it held (the peer's
 *    `done` has reached the number last written there; when k - 1 ran on the board too this
 *    holds without looking, since a peer posts k - 1 only after finishing k - 2). It copies its
 *    buffer into the slot, writes the signature (collective, dtype, op, count, bytes, sequence
 *    number), then publishes the slot with a release store of k, and wakes the peers that
 *    announced a sleep;
 * 2. gather: in rank order, it waits for each peer's slot k & 1 to show k, checks its signature
 *    against its own (a difference fails the context with CM_E_MISMATCH), and copies the payload
 *    into its staging area at that rank's place;
 * 3. once every rank's data is staged it publishes done = k (peers may reuse their slots), and
 *    reduces the staging area in rank order with the same kernel as the direct algorithm's
 *    REDUCE_SLOTS (float32 accumulation for half types): the same bits on every rank, and the
 *    same bits as direct's.
 *
 * A peer that is in a collective of another kind at the same number (its message parked at the
 * head of our ring, or its slot published while our plan waits on messages) fails the
 * context with CM_E_MISMATCH, seen by cm_board_progress and cm_board_check. The wait itself is
 * the engine's: spin, yield, then sleep on the context's waker, which peers wake after publishing.
 */
#define _GNU_SOURCE
#include <string.h>
#include <stdlib.h>
#include "shm.h"

#define BOARD_HDR 64

typedef struct {
    _Atomic uint64_t no;         /* the collective whose data the slot holds (its cm_exec.no; 0: none) */
    uint8_t coll, dtype, redop, pad;
    uint32_t pad2;
    uint64_t count, nbytes;
    uint64_t seq;                /* its sequence number, for the errors (cm_ctx_set_seq may reset those) */
    char small[BOARD_HDR - 40];  /* a payload of up to this many bytes (else it follows the header) */
} board_slot;                    /* followed by board_bytes of payload */

struct cm_board {
    _Atomic uint64_t done;       /* the last collective whose peers' slots this rank has read */
    char pad[BOARD_HDR - 8];
    /* two slots follow */
};

_Static_assert(sizeof(board_slot) == BOARD_HDR, "board slot header");
_Static_assert(sizeof(struct cm_board) == BOARD_HDR, "board header");

static size_t slot_stride(size_t board_bytes) { return BOARD_HDR + (board_bytes + 63) / 64 * 64; }

size_t cm_board_area_bytes(size_t board_bytes) {
    return board_bytes ? sizeof(struct cm_board) + 2 * slot_stride(board_bytes) : 0;
}

/* Where a slot's payload of nb bytes lies: a small one in the header's own cache line, so that a
 * peer reading it takes one line from the writer's cache instead of two (8 B all_reduce on 2 ranks,
 * the native call alone: 462 ns against 517, medians of 4 interleaved runs), else after the header. */
static char *payload(board_slot *s, size_t nb) { return nb <= sizeof s->small ? s->small : (char *)(s + 1); }

static board_slot *slot_of(struct cm_board *b, size_t board_bytes, uint64_t no) {
    return (board_slot *)((char *)(b + 1) + (no & 1) * slot_stride(board_bytes));
}

void cm_board_init(void *area, size_t board_bytes) {
    if (board_bytes) memset(area, 0, cm_board_area_bytes(board_bytes));
}

struct cm_board *cm_board_of(cm_seg_hdr *seg) {
    return seg->board_bytes ? (struct cm_board *)((char *)seg + seg->board_off) : NULL;
}

/* The board and segment of rank q (this rank's own for q == ctx->rank). */
static cm_seg_hdr *seg_of(cm_ctx *ctx, shm_ctx *t, int q) {
    return q == ctx->rank ? t->my_seg : ((shm_chan *)ctx->chans[q].priv)->peer_seg;
}

/* Wake every peer that announced a sleep: one fence, then a look at each waiting word. */
static void wake_peers(cm_ctx *ctx, shm_ctx *t) {
    atomic_thread_fence(memory_order_seq_cst);
    for (int q = 0; q < ctx->size; q++) {
        if (q == ctx->rank) continue;
        cm_waker *w = &seg_of(ctx, t, q)->waker;
        uint32_t how = atomic_load_explicit(&w->waiting, memory_order_relaxed);
        if (how != CM_WAIT_NONE) cm_wake(w);
    }
}

/* Whether every rank of the context is a local shm peer (the board needs them all). */
static int serves(cm_ctx *ctx, cm_transport *tp, shm_ctx *t) {
    if (!t->board_bytes || t->nlocal != ctx->size) return 0;
    for (int q = 0; q < ctx->size; q++)
        if (q != ctx->rank && ctx->chans[q].tp != tp) return 0;
    return 1;
}

int cm_board_post(cm_ctx *ctx, cm_transport *tp, cm_op *op) {
    shm_ctx *t = tp->priv;
    if (!t || !serves(ctx, tp, t) || op->nbytes > t->board_bytes || t->board_op)
        return cm_fail(ctx, CM_E_INVALID, -1, 0, op);
    if (!t->board_stage && !(t->board_stage = malloc((size_t)ctx->size * t->board_bytes)))
        return cm_fail(ctx, CM_E_NOMEM, -1, 0, op);
    t->board_op = op;
    t->board_posted = 0;
    t->board_next = 0;
    int r = cm_board_progress(ctx, tp);
    return r < 0 ? r : CM_OK;
}

static int mismatch(cm_ctx *ctx, const board_slot *s, int q, cm_op *op) {
    cm_hdr *h = &ctx->status.remote;
    memset(h, 0, sizeof *h);
    h->magic = CM_MAGIC;
    h->kind = CM_MSG_COLL;
    h->coll = s->coll;
    h->dtype = s->dtype;
    h->redop = s->redop;
    h->root = -1;
    h->src = q;
    h->seq = s->seq;
    h->count = s->count;
    h->nbytes = s->nbytes;
    return cm_fail(ctx, CM_E_MISMATCH, q, 0, op);
}

int cm_board_progress(cm_ctx *ctx, cm_transport *tp) {
    shm_ctx *t = tp->priv;
    cm_op *op = t->board_op;
    if (!op) return 0;
    const cm_hdr *sig = &op->exec->sig;
    uint64_t no = op->exec->no, seq = sig->seq;
    size_t nb = op->nbytes;
    if (!t->board_posted) {
        uint64_t last = t->board_written[no & 1];
        /* have the peers read what the slot holds? Surely if the previous collective ran here too:
         * every peer published it, so it had finished the one before (no look at their words) */
        for (int q = 0; q < ctx->size && t->board_last + 1 != no; q++) {
            if (q == ctx->rank) continue;
            if (atomic_load_explicit(&cm_board_of(seg_of(ctx, t, q))->done, memory_order_acquire) < last) {
                op->peer = q;
                return 0;
            }
        }
        board_slot *s = slot_of(t->board, t->board_bytes, no);
        memcpy(payload(s, nb), op->ptr, nb);
        memcpy(t->board_stage + (size_t)ctx->rank * t->board_bytes, op->ptr, nb);
        s->coll = sig->coll;
        s->dtype = sig->dtype;
        s->redop = sig->redop;
        s->count = sig->count;
        s->nbytes = nb;
        s->seq = seq;
        atomic_store_explicit(&s->no, no, memory_order_release);
        t->board_written[no & 1] = no;
        t->board_posted = 1;
        tp->tx_bytes += nb;
        wake_peers(ctx, t);
    }
    int moved = 0;
    while (t->board_next < ctx->size) {
        int q = t->board_next;
        if (q != ctx->rank) {
            cm_seg_hdr *seg = seg_of(ctx, t, q);
            board_slot *s = slot_of(cm_board_of(seg), t->board_bytes, no);
            if (atomic_load_explicit(&s->no, memory_order_acquire) != no) {
                cm_chan *c = &ctx->chans[q];
                /* the peer sent a message of a collective with this number: it runs another kind */
                if (c->rx_parked && c->rx_hdr.kind == CM_MSG_COLL && c->rx_hdr.seq == seq) {
                    ctx->status.remote = c->rx_hdr;
                    return cm_fail(ctx, CM_E_MISMATCH, q, 0, op);
                }
                op->peer = q;
                return moved;
            }
            if (s->coll != sig->coll || s->dtype != sig->dtype || s->redop != sig->redop ||
                s->count != sig->count || s->nbytes != nb)
                return mismatch(ctx, s, q, op);
            memcpy(t->board_stage + (size_t)q * t->board_bytes, payload(s, nb), nb);
            tp->rx_bytes += nb;
        }
        t->board_next++;
        moved = 1;
    }
    atomic_store_explicit(&t->board->done, no, memory_order_release);
    wake_peers(ctx, t);                               /* one may wait to reuse its slot */
    t->board_op = NULL;
    t->board_last = no;
    size_t esz = cm_dtype_size(sig->dtype);
    int r = cm_reduce_slots(op->ptr, t->board_stage, t->board_bytes, ctx->size, nb / esz, sig->dtype,
                            sig->redop & CM_REDOP_MASK);
    if (r < 0) return cm_fail(ctx, r, -1, 0, op);
    op->peer = -1;
    cm_op_complete(ctx, op);
    /* The slot the next collective writes: every peer read it two collectives ago (they published
     * this one), so take its line back for writing now, while the caller goes back to Python,
     * instead of stalling on that transfer when the next one posts. */
    cm_prefetch_write(slot_of(t->board, t->board_bytes, no + 1));
    return 1;
}

/* Whether cm_board_progress would move now (checked after a sleep was announced). */
int cm_board_ready(cm_ctx *ctx, cm_transport *tp) {
    shm_ctx *t = tp->priv;
    cm_op *op = t->board_op;
    if (!op) return 0;
    int q = op->peer;
    if (q < 0 || q >= ctx->size || q == ctx->rank) return 1;
    cm_seg_hdr *seg = seg_of(ctx, t, q);
    uint64_t no = op->exec->no;
    if (!t->board_posted)
        return atomic_load(&cm_board_of(seg)->done) >= t->board_written[no & 1];
    return atomic_load(&slot_of(cm_board_of(seg), t->board_bytes, no)->no) == no;
}

/* While a plan of messages waits (liveness checks, every 20 ms): a peer that published a board
 * slot for the collective this context runs is in another kind of collective. */
int cm_board_check(cm_ctx *ctx, cm_transport *tp) {
    shm_ctx *t = tp->priv;
    cm_exec *e = ctx->coll_active;
    if (!t || !t->board_bytes || t->board_op || !e || !serves(ctx, tp, t)) return CM_OK;
    uint64_t no = e->no;
    for (int q = 0; q < ctx->size; q++) {
        if (q == ctx->rank) continue;
        board_slot *s = slot_of(cm_board_of(seg_of(ctx, t, q)), t->board_bytes, no);
        if (atomic_load_explicit(&s->no, memory_order_acquire) == no) return mismatch(ctx, s, q, NULL);
    }
    return CM_OK;
}
