/* Internal header of the comms C core: constants, shared-memory layout, engine structures.
 *
 * The C core owns no Python objects. Every function returns 0 (CM_OK), CM_EAGAIN (1) for "not
 * done yet", or a negative CM_E_* code; comms/errors.py maps the codes to exceptions in one place.
 * The codes Python uses (return codes, dtypes, ops, plan steps, buffers, message kinds) are
 * declared once, in _cdefs.h, and Python reads them from there through cffi (comms.runtime.native).
 */
#ifndef COMMS_NATIVE_H
#define COMMS_NATIVE_H

#include <stdint.h>
#include <stddef.h>
#include <stdatomic.h>

#include "_cdefs.h"

#define CM_MAGIC 0x436f6d6dU     /* "Comm" */
#define CM_COUNT_ANY UINT64_MAX   /* sig.count that is not compared (uneven all_to_all) */
#define CM_MAX_BUFS 4
#define CM_ANY_SOURCE (-1)            /* cm_step.peer of a p2p receive from any rank */
#define CM_REDOP_MASK 0x0f           /* sig.redop: kernel op in the low bits, API-only flags (AVG) above */

size_t cm_dtype_size(int dtype);

/* ---- waking a sleeping context ----------------------------------------------------------------
 * A waiting context that has nothing to do sleeps: on a futex word when every channel it waits on
 * is woken through it, or in poll() over the file descriptors its transports name (sockets,
 * completion-queue fds) plus its bell, a datagram socket that the others ring (wait.c). The waker
 * lives where those who wake the context can reach it: in the context itself, or in its shared
 * segment when a transport puts it there for peers on other processes (shm.c). */
typedef struct {
    _Atomic uint32_t word;       /* futex word: bumped when there is news for the owner */
    char pad0[60];
    _Atomic uint32_t waiting;    /* CM_WAIT_FUTEX while the owner sleeps on word, CM_WAIT_POLL in poll() */
    char pad1[60];
    /* the owner's bell: an abstract AF_UNIX address; bell_broken is set by a waker that could not
     * reach it (another network namespace), and the owner then naps at most 1 ms at a time */
    uint32_t bell_len;
    _Atomic uint32_t bell_broken;
    char bell[108];
} cm_waker;

enum { CM_WAIT_NONE = 0, CM_WAIT_FUTEX = 1, CM_WAIT_POLL = 2 };

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
    int64_t t_ready;             /* a transport's own use (tcp: latency emulation) */
    char *ptr;
    uint64_t nbytes;
    uint64_t done;
    const struct cm_op *gate;    /* a gated SEND: the receive of its bytes (cm_send_limit) */
} cm_op;

/* How many of a send's bytes may go out now: all of them, or, for a gated send, those its gate
 * (the receive of the same bytes) has delivered into the buffer. A transport sends no further,
 * and a gated send at the head of its channel holds the channel's later sends behind it. */
static inline uint64_t cm_send_limit(const cm_op *op) {
    return op->gate ? op->gate->done : op->nbytes;
}

/* Whether step `gate` can gate the send `s`: a receive from a named peer of the very same bytes
 * (plan_check.c refuses a plan where it cannot; the engine, an unchecked one) */
static inline int cm_gate_matches(const cm_step *gate, const cm_step *s) {
    return (gate->kind == CM_STEP_RECV || gate->kind == CM_STEP_RECV_REDUCE) && gate->peer >= 0 &&
           gate->buf == s->buf && gate->off == s->off && gate->nbytes == s->nbytes;
}

typedef struct cm_unexp {        /* a p2p message that arrived before its receive was posted */
    struct cm_unexp *next;
    uint64_t tag;
    uint64_t nbytes, got;
    int complete;
    cm_op *waiter;               /* a receive posted while the message was still arriving */
    char *data;
} cm_unexp;

typedef struct cm_chan cm_chan;
typedef struct cm_transport cm_transport;

/* ---- the transport contract -------------------------------------------------------------------
 * A transport is one C file that fills one table of operations and attaches channels to a
 * context (cm_ctx_transport, then cm_ctx_attach with its private pointer). The engine calls
 * through the table and never asks which transport a channel belongs to. Progress functions
 * return 1 when something moved, 0 when nothing did, < 0 when the context failed (cm_fail);
 * they complete operations with cm_op_done and hand arriving messages to cm_match / cm_deliver /
 * cm_message_done (match.c). A NULL entry is an operation the transport does not need. */
typedef struct cm_transport_ops {
    const char *name;
    int send_at_post;                                          /* small sends go out when posted */
    /* how long a wait on this transport's channels may poll before it sleeps: 0, not at all (the
     * data comes through the kernel, and a sleep in poll() costs nothing the bytes did not);
     * CM_SPIN_ADAPTIVE, the context's budget, which learns whether spinning pays (wait.c) */
    int64_t spin_ns;
    /* per channel */
    int (*progress_send)(cm_ctx *ctx, cm_chan *c);            /* while c->sendq is not empty */
    int (*progress_recv)(cm_ctx *ctx, cm_chan *c);            /* every pass (notices arrivals, EOF) */
    /* the fd a sleeping wait polls for this channel (-1: none now), and the longest nap it allows;
     * NULL: the channel is woken through the context's waker (its peer bumps it) */
    int (*poll_fd)(cm_ctx *ctx, cm_chan *c, short *events, int64_t *nap_ns);
    int (*ready)(cm_ctx *ctx, cm_chan *c);       /* 1: progress would move something now (checked
                                                  * after a sleep was announced) */
    int (*alive)(cm_ctx *ctx, cm_chan *c);       /* CM_OK, or cm_fail's code for a dead peer */
    void (*abort)(cm_ctx *ctx, cm_chan *c);      /* tell the peer this context is dead; never blocks */
    void (*free)(cm_ctx *ctx, cm_chan *c);       /* release c->priv */
    /* per context: the state its channels share (a segment, an endpoint and completion queue) */
    int (*progress)(cm_ctx *ctx, cm_transport *t);            /* once a pass, before the channels */
    int (*ctx_poll_fd)(cm_ctx *ctx, cm_transport *t, short *events);
    int (*ctx_ready)(cm_ctx *ctx, cm_transport *t);
    int (*ctx_alive)(cm_ctx *ctx, cm_transport *t);
    void (*fail)(cm_ctx *ctx, cm_transport *t);     /* the context failed: revoke what peers may still touch */
    int (*busy)(cm_ctx *ctx, cm_transport *t);      /* 1: sends in flight that closing would drop */
    void (*release)(cm_ctx *ctx, cm_transport *t);  /* after every channel was freed */
    /* a BOARD step: an in-place all_reduce of op->nbytes at op->ptr among every rank of the
     * context, which the transport runs by itself (shm: through shared slots, shm_board.c). It
     * completes the op with cm_op_complete from its progress hook, keeps op->peer on the rank it
     * waits for, and returns CM_E_INVALID where it cannot serve the context or the size */
    int (*coll_post)(cm_ctx *ctx, cm_transport *t, cm_op *op);
} cm_transport_ops;

#define CM_MAX_TRANSPORTS 4
#define CM_SPIN_ADAPTIVE (-1)

struct cm_transport {            /* a transport in use by a context */
    const cm_transport_ops *ops;
    void *priv;
    uint64_t tx_bytes, rx_bytes; /* payload bytes its channels carried (comm.stats()) */
};

struct cm_chan {
    const cm_transport_ops *ops; /* NULL: no channel to this peer */
    cm_transport *tp;
    void *priv;
    int peer;
    cm_op *sendq, *sendq_tail;
    cm_op *recvq, *recvq_tail;
    cm_unexp *unexp, *unexp_tail;
    uint64_t unexp_bytes;        /* bytes the messages on unexp hold, entries included (bounded: match.c) */
    /* the incoming message in progress (match.c) */
    int rx_active;
    int rx_parked;               /* a collective's message is waiting for its receive to be posted */
    cm_hdr rx_hdr;
    cm_op *rx_op;
    cm_unexp *rx_unexp;
};

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
    uint64_t no;                 /* a collective's place in ctx->colls (the same on every rank) */
    int64_t t_start, t_end;      /* the clock when it started and when it ended (0: running) */
};

struct cm_ctx {
    int rank, size;
    uint64_t seq;                /* collectives started on the context (the last one's number) */
    uint64_t colls;              /* the same count, never reset (cm_ctx_set_seq): the board's clock */
    /* waiting (wait.c): a fixed spin in polls (COMMS_SPIN; 0: adaptive), yields before sleeping,
     * and the adaptive budget: its bounds, its value, and until when the CPU is known contended */
    int spin_polls, yields;
    int64_t spin_max_ns, spin_min_ns, spin_ns, contended_until;
    cm_chan *chans;
    cm_transport tp[CM_MAX_TRANSPORTS];
    int ntp;
    int waker_chans;             /* channels woken through the waker (no poll_fd) */
    int trace;                   /* record per-message times for timelines */
    _Atomic int kick;            /* another thread wants the context: end a sliced wait early */
    _Atomic int owned;           /* a thread holds the context (cm_ctx_enter, cm_call_run) */
    _Atomic int revoked;         /* set by another thread (cm_ctx_revoke): the code to fail with, 0: none */
    _Atomic int revoke_peer;     /* the peer that code names (-1: none) */
    cm_waker *waker;             /* &own_waker, or where a transport moved it (shm: its segment) */
    cm_waker own_waker;
    int bell_fd;                 /* this context's bell (-1: none), see wait.c */
    /* what a sleeping wait polls (struct pollfd[]): room for every channel, every transport and
     * the bell, sized when the context is made, so no peer is ever left out (wait.c) */
    void *pollfds;
    int pollfds_cap;
    /* execs */
    cm_exec *active;             /* plans running: p2p ones, and the collective started (queued ones are in coll_queue only) */
    cm_exec sync_exec;           /* the one synchronous runs use while free (no allocation) */
    int sync_busy;
    cm_op *sync_ops;
    int sync_ops_cap;
    cm_exec *coll_active, *coll_queue, *coll_queue_tail;
    int64_t queue_checked;       /* when overdue() last looked at the queued collectives' deadlines */
    cm_op *anyq, *anyq_tail;     /* posted receives from any source */
    int progressed;
    uint64_t unexp_msg_max, unexp_peer_max;   /* cm_ctx_set_unexp_limits */
    /* the first error, after which the context is unusable */
    int failed;
    cm_status status;
    uint64_t counters[8];
    /* flight recorder: a ring of the last fr_cap plans (flight.c) */
    struct cm_fr_slot *fr;
    uint32_t fr_cap;
    _Atomic uint64_t fr_next;
};

enum { CM_CNT_EXECS = 0, CM_CNT_SLEEPS, CM_CNT_BUSY_NS, CM_CNT_FAILED, CM_CNT_PREEMPTED };

/* engine.c */
void cm_unqueue_all(cm_ctx *ctx);         /* queued collectives into the active list (failing, freeing) */
int cm_fail(cm_ctx *ctx, int code, int peer, int sys_errno, const cm_op *op);
int cm_check_revoked(cm_ctx *ctx);       /* the owner's side of cm_ctx_revoke: fails the context once */
int cm_progress(cm_ctx *ctx);            /* one pass over every transport and channel */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Ask for the cache line at p for writing, without waiting for it (a hint: no effect on what
 * any thread sees). x86's PREFETCHW, a no-op on CPUs without it. */
static inline void cm_prefetch_write(const void *p) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

/* engine.c: the CM_* code of a system call that failed with err (CM_E_NOMEM for no space or memory,
 * else CM_E_SYS), err stored in *sys_errno when not NULL: errno never becomes a return code */
int cm_sys_fail(int err, int *sys_errno);

/* ctx.c: a transport's instance in a context, and a channel to a peer */
cm_transport *cm_ctx_transport(cm_ctx *ctx, const cm_transport_ops *ops);
int cm_ctx_attach(cm_ctx *ctx, int peer, cm_transport *t, void *priv);
void cm_ctx_drop_transport(cm_ctx *ctx, cm_transport *t);   /* one that failed to open, before any channel */

/* flight.c */
void cm_fr_start(cm_ctx *ctx, cm_exec *e, const cm_step *plan, int64_t now);   /* now: the clock */
void cm_fr_end(cm_ctx *ctx, cm_exec *e);

/* match.c */
int cm_match(cm_ctx *ctx, cm_chan *c);
int cm_deliver(cm_ctx *ctx, cm_chan *c, const char *data, size_t len);
void cm_op_done(cm_ctx *ctx, cm_chan *c, cm_op *op, int from_sendq);
void cm_op_complete(cm_ctx *ctx, cm_op *op);     /* an op on no channel's queue (BOARD) */
int cm_message_done(cm_ctx *ctx, cm_chan *c);     /* < 0: the message broke its header's promise */
void cm_unexp_to_op(cm_ctx *ctx, cm_chan *c, cm_unexp *u, cm_op *op);
void cm_unexp_drop(cm_chan *c, cm_unexp *u);     /* unlink u from c's queue, free it, uncount its bytes */

/* wait.c */
int cm_bell_open(cm_ctx *ctx);
void cm_wake(cm_waker *w);               /* wake the owner if it announced a sleep */
void cm_wake_always(cm_waker *w);        /* bump the word and wake the owner however it sleeps */
void cm_waker_share(cm_ctx *ctx, cm_waker *where);   /* move the context's waker (shm: its segment) */
int cm_sleep(cm_ctx *ctx, int64_t timeout_ns);       /* the engine's sleep: see wait.c */
int cm_nap(cm_ctx *ctx, int64_t timeout_ns);         /* poll every fd, no announcement (tcp's bulk nap) */
int64_t cm_spin_budget(cm_ctx *ctx, int64_t now);    /* how long an adaptive wait may spin now */
void cm_spin_learn(cm_ctx *ctx, int64_t idle_ns);    /* an idle stretch of a wait ended after idle_ns */
void cm_spin_gap(cm_ctx *ctx, int64_t now, int64_t gap_ns);   /* a spinning wait found a gap in its clock */
/* a gap this long between two looks at the clock while spinning: the thread was off its CPU (64 idle
 * passes take a few us) */
#define CM_PREEMPT_GAP_NS 200000LL
/* How long a preemption counts: spin little, yield, then sleep. Contention that matters recurs (a
 * host's ranks sharing cores are preempted every scheduler tick), so each preemption renews it. At
 * 200 ms, one kernel thread's 1.5 ms on rank 0's CPU every few hundred ms (the dev VM's kdamond) kept
 * rank 0 contended most of the time: 64 MiB all_reduce on 2 bound ranks took 14.1-16.1 ms a launch
 * (p90 17-21), rank 0 sleeping 30-70 times an op; at 20 ms, 12.7-13.4 (p90 14.5-15.0) and 5 sleeps,
 * against 12.4-13.5 ms (p90 13.3-14.9) when it never sleeps (COMMS_SPIN=1000000). */
#define CM_CONTENDED_NS 20000000LL

#endif
