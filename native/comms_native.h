/* Internal header of the comms C core: constants, shared-memory layout, engine structures.
 *
 * The C core owns no Python objects. Every function returns 0 (CM_OK), CM_EAGAIN (1) for "not
 * done yet", or a negative CM_E_* code; comms/errors.py maps the codes to exceptions in one place.
 */
#ifndef COMMS_NATIVE_H
#define COMMS_NATIVE_H

#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>

#include "_cdefs.h"

/* return codes (mirrored in comms/errors.py) */
enum {
    CM_OK = 0, CM_EAGAIN = 1,
    CM_E_TIMEOUT = -1, CM_E_PEER_CLOSED = -2, CM_E_PEER_DEAD = -3, CM_E_PEER_ABORTED = -4,
    CM_E_MISMATCH = -5, CM_E_TRUNCATE = -6, CM_E_SYS = -7, CM_E_INVALID = -8, CM_E_NOMEM = -9,
    CM_E_ABORTED = -10,
};

/* dtypes and reduction ops (mirrored in comms/dtypes.py) */
enum { CM_F16 = 0, CM_BF16, CM_F32, CM_F64, CM_I8, CM_U8, CM_I32, CM_I64, CM_BOOL, CM_NDTYPES };
enum { CM_SUM = 0, CM_PROD, CM_MIN, CM_MAX, CM_BAND, CM_BOR, CM_BXOR, CM_NOPS };

/* plan steps (mirrored in algorithms/plan.py) */
enum {
    CM_STEP_SEND = 1, CM_STEP_RECV = 2, CM_STEP_RECV_REDUCE = 3, CM_STEP_COPY = 4,
    CM_STEP_REDUCE = 5, CM_STEP_REDUCE_SLOTS = 6, CM_STEP_DIV = 7, CM_STEP_PHASE = 8,
};

enum { CM_MSG_COLL = 1, CM_MSG_P2P = 2 };
#define CM_MAGIC 0x436f6d6dU     /* "Comm" */
#define CM_COUNT_ANY UINT64_MAX   /* sig.count that is not compared (uneven all_to_all) */
#define CM_MAX_BUFS 4
#define CM_ANY_SOURCE (-1)            /* cm_step.peer of a p2p receive from any rank */
#define CM_REDOP_MASK 0x0f           /* sig.redop: kernel op in the low bits, API-only flags (AVG) above */

size_t cm_dtype_size(int dtype);

/* ---- shared-memory layout -------------------------------------------------------------------
 * Each rank creates one segment holding its *inbound* channels, one per local peer (indexed by
 * the sender's local index), plus a header with the abort word and the doorbell it sleeps on. */
#define CM_SEG_MAGIC 0x636f6d6d73656731ULL
#define CM_SEG_HDR_BYTES 4096
#define CM_SLOT_HDR_BYTES 64
#define CM_SLOT_FIRST 1u
#define CM_SLOT_LAST 2u

typedef struct {
    uint64_t magic;
    uint32_t nlocal, nslots;
    uint64_t slot_bytes;
    char pad0[40];
    _Atomic uint64_t abort;      /* (aborting rank + 1), set by any rank that aborts */
    char pad1[56];
    _Atomic uint32_t doorbell;   /* futex word: bumped when there is news for this rank */
    char pad2[60];
    _Atomic uint32_t waiting;    /* CM_WAIT_FUTEX while it sleeps on the doorbell, CM_WAIT_POLL in poll() */
    char pad3[60];
    /* a rank with tcp peers too sleeps in poll(): its peers wake it with a datagram to this abstract
     * AF_UNIX address (cm_bell); bell_broken is set by a peer that could not reach it (another
     * network namespace), and the sleeper then wakes up every millisecond instead */
    uint32_t bell_len;
    _Atomic uint32_t bell_broken;
    char bell[108];
} cm_seg_hdr;

enum { CM_WAIT_NONE = 0, CM_WAIT_FUTEX = 1, CM_WAIT_POLL = 2 };

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

/* ---- engine structures ---------------------------------------------------------------------- */
typedef struct cm_op {
    struct cm_op *next;
    cm_exec *exec;
    int kind;                    /* CM_STEP_SEND / RECV / RECV_REDUCE */
    int peer;
    int step;
    int started;
    int complete;
    int64_t t_post, t_done;      /* CLOCK_MONOTONIC, when the context traces (ctx->trace) */
    int64_t t_ready;             /* tcp latency emulation: not sent before this time */
    char *ptr;
    uint64_t nbytes;
    uint64_t done;
} cm_op;

typedef struct cm_unexp {        /* a p2p message that arrived before its receive was posted */
    struct cm_unexp *next;
    uint64_t tag;
    uint64_t nbytes, got;
    int complete;
    cm_op *waiter;               /* a receive posted while the message was still arriving */
    char *data;
} cm_unexp;

enum { CM_CHAN_NONE = 0, CM_CHAN_SHM = 1, CM_CHAN_TCP = 2 };

typedef struct {
    int type;
    int peer;
    cm_op *sendq, *sendq_tail;
    cm_op *recvq, *recvq_tail;
    cm_unexp *unexp, *unexp_tail;
    /* incoming message in progress */
    int rx_active;
    int rx_parked;          /* shm: a collective's message heads the ring, its receive not posted yet (tcp
                             * derives the same from its held header: see tcp_fds) */
    cm_hdr rx_hdr;
    cm_op *rx_op;
    cm_unexp *rx_unexp;
    /* shm */
    cm_chan_ctrl *tx, *rx;
    char *tx_slots, *rx_slots;
    uint64_t tx_head, rx_tail;
    cm_seg_hdr *peer_seg;
    int peer_pid;
    /* tcp */
    int fd;
    int peer_closed;             /* EOF seen between messages */
    int64_t delay_ns;            /* test hook: emulated one-way latency of every message */
    cm_hdr tx_hdr;
    size_t tx_hdr_sent;
    size_t rx_hdr_got;
    char *bounce;
    size_t bounce_bytes, bounce_fill;
} cm_chan;

struct cm_exec {
    cm_exec *next_active, *next_coll;
    cm_step *steps;
    int nsteps, next, pending, done, is_coll, started;
    int code;
    int64_t deadline;
    char *bufs[CM_MAX_BUFS];
    cm_hdr sig;
    cm_op *ops;
    int nops;
    uint64_t fr_id;              /* its flight-recorder entry */
    int64_t t_start;
};

struct cm_ctx {
    int rank, size;
    int spin, yields;
    cm_chan *chans;
    /* shm */
    cm_seg_hdr *my_seg;
    int local_index, nlocal, nslots;
    size_t slot_bytes, chan_bytes;
    int has_shm, has_tcp;
    int trace;                   /* record per-message times for timelines */
    _Atomic int kick;            /* another thread wants the context: end a sliced wait early */
    int bell_fd;                 /* this context's wake-up datagram socket (-1: none), see cm_bell */
    _Atomic int polling;         /* 1 while a wait sleeps in poll() (a kick then sends to bell_fd) */
    uint32_t bell_len;
    char bell[108];              /* its abstract address (sun_path, leading NUL included) */
    /* execs */
    cm_exec *active;
    cm_exec *coll_active, *coll_queue, *coll_queue_tail;
    cm_op *anyq, *anyq_tail;     /* posted receives from any source */
    int progressed;
    /* the first error, after which the context is unusable */
    int failed;
    cm_status status;
    uint64_t counters[8];
    /* flight recorder: a ring of the last fr_cap plans */
    cm_fr_entry *fr;
    uint32_t fr_cap;
    _Atomic uint64_t fr_next;
};

enum { CM_CNT_SHM_TX = 0, CM_CNT_SHM_RX, CM_CNT_TCP_TX, CM_CNT_TCP_RX, CM_CNT_EXECS, CM_CNT_SLEEPS, CM_CNT_BUSY_NS,
       CM_CNT_FAILED };

/* engine.c */
int cm_fail(cm_ctx *ctx, int code, int peer, int sys_errno, const cm_op *op);

/* flight.c */
void cm_fr_start(cm_ctx *ctx, cm_exec *e, const cm_step *plan);
void cm_fr_end(cm_ctx *ctx, cm_exec *e);

/* match.c */
int cm_match(cm_ctx *ctx, cm_chan *c);
int cm_deliver(cm_ctx *ctx, cm_chan *c, const char *data, size_t len);
void cm_op_done(cm_ctx *ctx, cm_chan *c, cm_op *op, int from_sendq);
void cm_message_done(cm_ctx *ctx, cm_chan *c);
void cm_unexp_to_op(cm_ctx *ctx, cm_chan *c, cm_unexp *u, cm_op *op);

/* shm.c */
int cm_shm_progress_send(cm_ctx *ctx, cm_chan *c);
int cm_shm_progress_recv(cm_ctx *ctx, cm_chan *c);
void cm_shm_notify(cm_seg_hdr *seg);
int cm_bell_open(cm_ctx *ctx);
void cm_bell_ring(const char *addr, uint32_t len, _Atomic uint32_t *broken);
void cm_bell_drain(cm_ctx *ctx);
int cm_shm_sleep(cm_ctx *ctx, int64_t timeout_ns);
int cm_shm_news(cm_ctx *ctx);

/* tcp.c */
int cm_tcp_progress_send(cm_ctx *ctx, cm_chan *c);
int cm_tcp_progress_recv(cm_ctx *ctx, cm_chan *c);
int cm_tcp_sleep(cm_ctx *ctx, int64_t timeout_ns);
int cm_tcp_check_closed(cm_ctx *ctx, cm_chan *c);

#endif
