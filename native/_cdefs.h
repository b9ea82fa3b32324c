/* Declarations handed to ffi.cdef(): the C surface that Python sees, but for each transport's own
 * set-up functions, which its C file declares between CDEF markers (native/build_cffi.py).
 * Plain C only (no preprocessor); layouts must match comms_native.h. */

/* The codes shared with Python, declared here only: the C core includes this file, and Python
 * reads the values through cffi (comms.runtime.native), so nothing copies them by hand. */

/* return codes */
enum {
    CM_OK = 0, CM_EAGAIN = 1, CM_EBUSY = 2, CM_ESLOW = 3,
    CM_E_TIMEOUT = -1, CM_E_PEER_CLOSED = -2, CM_E_PEER_DEAD = -3, CM_E_PEER_ABORTED = -4,
    CM_E_MISMATCH = -5, CM_E_TRUNCATE = -6, CM_E_SYS = -7, CM_E_INVALID = -8, CM_E_NOMEM = -9,
    CM_E_ABORTED = -10, CM_E_REVOKED = -11, CM_E_LIMIT = -12
};

/* dtypes and reduction ops */
enum { CM_F16 = 0, CM_BF16 = 1, CM_F32 = 2, CM_F64 = 3, CM_I8 = 4, CM_U8 = 5, CM_I32 = 6, CM_I64 = 7, CM_BOOL = 8,
       CM_NDTYPES = 9 };
enum { CM_SUM = 0, CM_PROD = 1, CM_MIN = 2, CM_MAX = 3, CM_BAND = 4, CM_BOR = 5, CM_BXOR = 6, CM_NOPS = 7 };

/* plan steps (algorithms/plan.py documents them) and the buffers they name */
enum {
    CM_STEP_SEND = 1, CM_STEP_RECV = 2, CM_STEP_RECV_REDUCE = 3, CM_STEP_COPY = 4,
    CM_STEP_REDUCE = 5, CM_STEP_REDUCE_SLOTS = 6, CM_STEP_DIV = 7, CM_STEP_PHASE = 8,
    CM_STEP_BOARD = 9            /* a collective the transport runs by itself (coll_post) */
};
enum { CM_BUF_IN = 0, CM_BUF_OUT = 1, CM_BUF_SCRATCH = 2 };

/* message kinds */
enum { CM_MSG_COLL = 1, CM_MSG_P2P = 2 };


typedef struct {
    uint32_t magic;
    uint8_t kind;       /* CM_MSG_COLL or CM_MSG_P2P */
    uint8_t coll;       /* collective id (Python's COLL_IDS) */
    uint8_t dtype;
    uint8_t redop;
    int32_t root;
    int32_t src;        /* sender's rank */
    uint64_t seq;       /* collective sequence number on the communicator */
    uint64_t count;     /* the collective's element count as the sender sees it */
    uint64_t tag;       /* user tag of a p2p message */
    uint64_t nbytes;    /* payload bytes of this message */
} cm_hdr;

typedef struct {
    int32_t kind;       /* CM_STEP_* */
    int32_t peer;       /* comm steps: peer rank; REDUCE_SLOTS: number of slots */
    int32_t buf;        /* primary buffer id: data sent, received into, copied/reduced into */
    int32_t buf2;       /* secondary buffer id: copy/reduce source */
    uint64_t off;       /* byte offset in buf */
    uint64_t off2;      /* byte offset in buf2; REDUCE_SLOTS: stride between slots */
    uint64_t nbytes;
    uint64_t aux;       /* REDUCE_SLOTS: stride between slots; DIV: divisor; SEND: its gate + 1 (0: none),
                         * an earlier RECV/RECV_REDUCE of the same bytes in the same batch: the send
                         * goes out as those bytes arrive (plan_check.c) */
} cm_step;

typedef struct {        /* why a wait or run failed; after a success only code (0) is written */
    int32_t code;
    int32_t peer;
    int32_t sys_errno;
    int32_t step;
    uint64_t done_bytes;
    uint64_t want_bytes;
    cm_hdr local;
    cm_hdr remote;
} cm_status;

typedef struct {        /* one flight-recorder entry: a plan started on the context */
    uint64_t id;        /* running number of plans started on the context */
    uint64_t seq;
    uint64_t count;
    uint64_t tag;
    uint64_t plan;      /* the caller's steps pointer: identifies the plan */
    int64_t t_start_ns; /* CLOCK_MONOTONIC */
    int64_t t_end_ns;   /* 0 while running */
    int32_t kind, coll, dtype, redop, root;
    int32_t state;      /* 1 started, 2 done, 3 failed */
    int32_t code;       /* native code of a failure */
    int32_t peer;       /* peer blamed by a failure */
} cm_fr_entry;

typedef struct cm_ctx cm_ctx;
typedef struct cm_exec cm_exec;

/* reduction kernels (dst = dst op src), and the canonical-order n-way reduction */
int cm_reduce(void *dst, const void *src, size_t count, int dtype, int op);
int cm_reduce_slots(void *dst, const void *base, size_t stride, int nslots, size_t count, int dtype, int op);
int cm_div(void *buf, size_t count, int dtype, int64_t divisor);

/* communicator context and the progress engine */
cm_ctx *cm_ctx_new(int rank, int size, int spin_polls, int yields, int64_t spin_max_ns, int64_t spin_min_ns);
void cm_ctx_free(cm_ctx *ctx);
void cm_ctx_abort(cm_ctx *ctx);
void cm_ctx_revoke(cm_ctx *ctx, int code, int peer);   /* from any thread: fail the context at its next check */
void cm_ctx_kick(cm_ctx *ctx);   /* from any thread: a sliced cm_exec_wait returns soon (CM_EAGAIN) */
/* the context's owner word, the native half of the engine lock (native/ctx.c): the fast path's
 * cm_call_run takes it by itself (CM_EBUSY where another thread has it); every other caller takes
 * it after the Python lock, waiting out a fast-path call in flight (bounded by that call's deadline) */
int cm_ctx_try_enter(cm_ctx *ctx);   /* 1: taken */
void cm_ctx_enter(cm_ctx *ctx);
void cm_ctx_leave(cm_ctx *ctx);
int cm_ctx_pending(cm_ctx *ctx);
int cm_ctx_flight(cm_ctx *ctx, cm_fr_entry *out, int max);   /* newest last; safe to call while another thread waits */
int cm_ctx_flight_capacity(cm_ctx *ctx, int entries);
void cm_sigusr1_install(void);
int cm_sigusr1_take(void);     /* 1 once per SIGUSR1 received since the last call */
void cm_ctx_counters(cm_ctx *ctx, uint64_t *out, int n);
int cm_ctx_transport_bytes(cm_ctx *ctx, const char *name, uint64_t *out);   /* out: tx, rx; 0 when unused */
const char *cm_ctx_chan_transport(cm_ctx *ctx, int peer);     /* the transport carrying peer, or NULL */

int cm_exec_start(cm_ctx *ctx, const cm_step *steps, int nsteps, const uintptr_t *bufs, int nbufs,
                  const cm_hdr *sig, int64_t deadline_ns, cm_exec **out);
int cm_exec_wait(cm_ctx *ctx, cm_exec *e, int64_t block_ns, cm_status *st);
int cm_exec_test(cm_ctx *ctx, cm_exec *e, cm_status *st);
void cm_exec_free(cm_ctx *ctx, cm_exec *e);
int cm_exec_peer(cm_exec *e, int i);
int cm_exec_op_times(cm_exec *e, int64_t *out, int max);   /* (post, done) ns per message, in step order */
void cm_ctx_set_trace(cm_ctx *ctx, int on);   /* the peer of a plan's i-th message (the source, for any-source receives) */
int cm_exec_run(cm_ctx *ctx, const cm_step *steps, int nsteps, const uintptr_t *bufs, int nbufs,
                const cm_hdr *sig, int64_t deadline_ns, cm_status *st);
/* the bounds of a plan (plan_check.c), checked once when it is encoded: why a step does not fit */
enum { CM_PLAN_FITS = 0, CM_PLAN_BAD_KIND = 1, CM_PLAN_BAD_BUF = 2, CM_PLAN_PAST_BUF = 3, CM_PLAN_PAST_BUF2 = 4,
       CM_PLAN_PART_ELEMENT = 5, CM_PLAN_BAD_SLOTS = 6, CM_PLAN_BAD_GATE = 7 };
typedef struct { int32_t step; int32_t reason; } cm_plan_fault;   /* the first step that does not fit (-1: none) */
int cm_plan_check(const cm_step *steps, int nsteps, const uint64_t *lens, int nbufs, int dtype, cm_plan_fault *out);
/* the unexpected queue (match.c): the most bytes one early p2p message may have, and the most queued
 * per peer; a message over either fails the context with CM_E_LIMIT before anything is allocated.
 * A new context starts with the defaults below (MiB), which are also the knobs' (comms.config). */
enum { CM_UNEXP_MSG_MIB = 1024, CM_UNEXP_PEER_MIB = 2048 };
void cm_ctx_set_unexp_limits(cm_ctx *ctx, uint64_t msg_bytes, uint64_t peer_bytes);
typedef struct {        /* a prepared synchronous call of a plan (Python's fast path) */
    cm_ctx *ctx;
    const cm_step *steps;
    const cm_hdr *sig;
    int32_t nsteps;
    int32_t aliased;    /* cm_call_run_pair: 1: the input lies at in_at bytes from the output's start, 0: apart */
    uintptr_t scratch;  /* the caller's scratch buffer (0: none) */
    int64_t timeout_ns; /* deadline: this long after the call starts */
    cm_status status;   /* a failed call's status */
    int64_t in_at;
    uint64_t in_bytes;  /* the two buffers' lengths the plan was built for */
    uint64_t out_bytes;
} cm_call;
/* each takes the context's owner word for the call, and returns CM_EBUSY untouched where another
 * thread holds it (the caller then goes the engine lock's way) */
int cm_call_run(cm_call *c, void *buf);            /* buf: a cffi buffer */
int cm_call_run_addr(cm_call *c, uintptr_t buf);   /* buf: an address */
/* obj: a numpy.ndarray's id(); CM_ESLOW, nothing run, where cm_array_data answers 0 */
int cm_call_run_array(cm_call *c, uintptr_t obj);
/* two buffers, as numpy.ndarray ids or as addresses; CM_ESLOW, nothing run, unless they are aliased as
 * the call says (and the arrays C-contiguous and writable) (engine.c) */
int cm_call_run_pair(cm_call *c, uintptr_t in_obj, uintptr_t out_obj);
int cm_call_run_pair_addr(cm_call *c, uintptr_t in, uintptr_t out);
/* a torch c10d options object's fields read from its memory (native/peek.c; comms/torch_backend/peek.py
 * finds the offsets): reduce op | asyncOp << 8 | (timeout < 0) << 9, or -1 (no layout, no object) */
void cm_opts_layout(int on, uint32_t value, uint32_t op, uint32_t timeout_ms, uint32_t async_op);
int32_t cm_opts_peek(uintptr_t obj);      /* obj: the Python object's address, id() */
/* a numpy array's data and flags read from its memory (native/peek.c; comms/runtime/arrays.py finds
 * the offsets): the data pointer where every bit of `need` is set in the flags, else 0 (and while off) */
void cm_array_layout(int on, uint32_t data, uint32_t flags, uint32_t need);
uintptr_t cm_array_data(uintptr_t obj);
uint64_t cm_ctx_seq(cm_ctx *ctx);             /* the number of the last collective started (each gets the next) */
void cm_ctx_set_seq(cm_ctx *ctx, uint64_t seq);
int64_t cm_now_ns(void);
int64_t cm_spin_budget(cm_ctx *ctx, int64_t now);   /* how long an adaptive wait may spin now (native/wait.c) */
void cm_spin_gap(cm_ctx *ctx, int64_t now, int64_t gap_ns);   /* a spinning wait found a gap in its clock */

/* rows of tokens (expert parallelism, native/rows.c): receive windows and combine's sum */
int cm_window_map(const char *name, uint64_t *bytes, int create, void **out, int *sys_errno);
int cm_sum_rows(void *out, int dtype, uint64_t hidden, uint64_t ntok, const int64_t *start, const uint64_t *rows);
