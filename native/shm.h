/* The shared-memory transport's layout and state, shared by shm.c (the rings) and shm_board.c
 * (the board: small all_reduce through shared slots). */
#ifndef COMMS_SHM_H
#define COMMS_SHM_H

#include "comms_native.h"

#define CM_SEG_MAGIC 0x636f6d6d73656732ULL
#define CM_SEG_HDR_BYTES 4096
#define CM_SLOT_HDR_BYTES 64
#define CM_SLOT_FIRST 1u
#define CM_SLOT_LAST 2u

/* Each rank creates one segment holding its *inbound* rings, one per local peer (indexed by the
 * sender's local index), after a header with the abort word and the waker its peers wake it by. */
typedef struct {
    uint64_t magic;
    uint32_t nlocal, nslots;
    uint64_t slot_bytes;
    uint64_t board_bytes;        /* payload bytes of each board slot (0: no board) */
    uint64_t board_off;          /* where the board lies in the segment */
    char pad0[24];
    _Atomic uint64_t abort;      /* (aborting rank + 1), set by any rank that aborts */
    char pad1[56];
    cm_waker waker;              /* the owner's (cm_waker_share): local peers wake it here */
} cm_seg_hdr;

typedef struct {
    _Atomic uint64_t head;       /* slots produced (written by the sender) */
    char pad0[56];
    _Atomic uint64_t tail;       /* slots consumed (written by the receiver) */
    char pad1[56];
} cm_chan_ctrl;

typedef struct {
    uint32_t len;
    uint32_t flags;
    cm_hdr hdr;                  /* valid in the FIRST slot of a message */
} cm_slot_hdr;

typedef struct {                 /* the context's shm state (cm_transport.priv) */
    cm_seg_hdr *my_seg;
    int local_index, nlocal, nslots;
    size_t slot_bytes, chan_bytes;
    /* the board (shm_board.c): its payload bytes per slot (0: none), this rank's board, and the
     * BOARD op in progress with its state */
    size_t board_bytes;
    struct cm_board *board;
    cm_op *board_op;
    int board_posted, board_next;
    uint64_t board_written[2];   /* the seq last written into each of this rank's two slots */
    uint64_t board_last;         /* the last collective this rank ran on the board */
    char *board_stage;           /* nlocal x board_bytes: every rank's data, in rank order */
} shm_ctx;

typedef struct {                 /* one channel (cm_chan.priv) */
    shm_ctx *t;
    cm_chan_ctrl *tx, *rx;
    char *tx_slots, *rx_slots;
    uint64_t tx_head, rx_tail;
    cm_seg_hdr *peer_seg;
    /* the peer's liveness (shm.c: shm_alive): a pidfd of its process, opened at connect time
     * (-1: none; then kill(peer_pid, 0), where pidfd_open is missing), or gone: it had exited
     * before the connect */
    int peer_pid;
    int pidfd;
    int peer_gone;
} shm_chan;

_Static_assert(sizeof(cm_seg_hdr) <= CM_SEG_HDR_BYTES, "segment header too large");
_Static_assert(sizeof(cm_slot_hdr) <= CM_SLOT_HDR_BYTES, "slot header too large");


/* shm_board.c */
size_t cm_board_area_bytes(size_t board_bytes);
void cm_board_init(void *area, size_t board_bytes);
struct cm_board *cm_board_of(cm_seg_hdr *seg);
int cm_board_post(cm_ctx *ctx, cm_transport *t, cm_op *op);
int cm_board_progress(cm_ctx *ctx, cm_transport *t);
int cm_board_ready(cm_ctx *ctx, cm_transport *t);
int cm_board_check(cm_ctx *ctx, cm_transport *t);
#endif
