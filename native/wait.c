/* Sleeping and waking, for every transport.
 *
 * A wait that has spun and yielded without news sleeps until something can move, a deadline
 * nears, or another thread wants the context (cm_ctx_kick). What it sleeps on depends on what its
 * channels offer, never on which transports they are:
 *
 * - channels and transports that name a file descriptor (poll_fd, ctx_poll_fd: sockets, completion
 *   queues) are polled together with the context's bell;
 * - channels without one (shared-memory rings) are woken through the context's waker: whoever
 *   publishes news for the context bumps its word and, if the context announced that it sleeps,
 *   wakes it: with FUTEX_WAKE when it sleeps on the word, with one datagram to its bell when it
 *   sleeps in poll() (a futex does not wake poll()).
 *
 * The announcement is Dekker-style: the sleeper stores `waiting`, fences, then re-checks every
 * channel (ready, ctx_ready) before it sleeps; a waker publishes, fences, then reads `waiting`.
 * One of the two always sees the other.
 *
 * How long to spin first. A wait whose pending operations are all on transports whose data comes
 * through the kernel (tcp: spin_ns 0) sleeps at once. The others (shm, rdma: CM_SPIN_ADAPTIVE) spin
 * for the context's budget, which learns from the rank's own waits: each idle stretch of a wait
 * (from the last progress to the next) pulls the budget towards twice its length when it was short
 * enough to catch by spinning (at most spin_max_ns), and towards spin_min_ns when it was longer, so
 * a rank whose peers keep it waiting long sleeps instead of burning a core it gains nothing from.
 * A spinning wait that finds a gap in its own clock readings, and spent at least half of it in a run
 * queue (cm_spin_gap), was preempted: something this rank cannot see (another job, the other host's
 * ranks on a shared core, the kernel's network work) wants the CPU. So does one whose thread, every
 * RUN_DELAY_EVERY_NS, finds that it spent more than RUN_DELAY_SHARE of the time waiting in a run
 * queue (a spinner that is never preempted still delays the peer it waits for, which queues behind
 * it). For CM_CONTENDED_NS after either
 * the budget stays at its minimum and the wait yields before it sleeps, as on a host with more
 * ranks than cores.
 *
 * The bell is a datagram socket bound to an abstract AF_UNIX address (nothing in the file system:
 * it vanishes with the process, even after kill -9). Abstract addresses are per network namespace;
 * a waker in another one cannot reach it, sets bell_broken, and the sleeper then caps its naps at
 * 1 ms. Without a bell (socket creation failed) the same cap applies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "comms_native.h"

#define BROKEN_NAP_NS 1000000LL        /* the longest nap while a waker cannot reach the bell */
#define RUN_DELAY_EVERY_NS 2000000LL   /* how often a spinning thread looks at its run-queue wait */
#define RUN_DELAY_SHARE 10             /* percent of that time spent waiting for a CPU: contended */

static _Atomic int send_fd = -1;       /* one unbound socket of the process sends every ring */
static _Atomic uint64_t bell_seq;

int cm_bell_open(cm_ctx *ctx) {
    cm_waker *w = &ctx->own_waker;
    ctx->bell_fd = -1;
    w->bell_len = 0;
    atomic_store(&w->bell_broken, 1);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return CM_OK;                       /* no bell: waits fall back to short naps */
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    int n = snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "comms-bell.%d.%llu", (int)getpid(),
                     (unsigned long long)atomic_fetch_add(&bell_seq, 1));
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
    if (bind(fd, (struct sockaddr *)&a, len) < 0) { close(fd); return CM_OK; }
    ctx->bell_fd = fd;
    w->bell_len = (uint32_t)(1 + n);
    memcpy(w->bell, a.sun_path, w->bell_len);
    atomic_store(&w->bell_broken, 0);
    return CM_OK;
}

static void bell_ring(cm_waker *w) {
    uint32_t len = w->bell_len;
    if (!len || len > sizeof(((struct sockaddr_un *)0)->sun_path)) return;
    int fd = atomic_load(&send_fd);
    if (fd < 0) {
        int mine = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (mine < 0) { atomic_store(&w->bell_broken, 1); return; }
        int expect = -1;
        if (atomic_compare_exchange_strong(&send_fd, &expect, mine)) fd = mine;
        else { close(mine); fd = expect; }
    }
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    memcpy(a.sun_path, w->bell, len);
    char byte = 1;
    ssize_t r = sendto(fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&a,
                       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    /* EAGAIN: its queue is full of rings already, it will wake; ECONNREFUSED/ENOENT: unreachable */
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) atomic_store(&w->bell_broken, 1);
}

static void bell_drain(cm_ctx *ctx) {
    char buf[64];
    if (ctx->bell_fd < 0) return;
    while (recv(ctx->bell_fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {}
}

void cm_wake(cm_waker *w) {
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t how = atomic_load_explicit(&w->waiting, memory_order_relaxed);
    if (how == CM_WAIT_FUTEX) {
        atomic_fetch_add(&w->word, 1);
        syscall(SYS_futex, &w->word, FUTEX_WAKE, 1, NULL, NULL, 0);
    } else if (how == CM_WAIT_POLL) {
        bell_ring(w);
    }
}

void cm_wake_always(cm_waker *w) {
    atomic_fetch_add(&w->word, 1);
    atomic_thread_fence(memory_order_seq_cst);
    syscall(SYS_futex, &w->word, FUTEX_WAKE, 1, NULL, NULL, 0);
    if (atomic_load(&w->waiting) == CM_WAIT_POLL) bell_ring(w);
}

void cm_waker_share(cm_ctx *ctx, cm_waker *where) {
    cm_waker *w = &ctx->own_waker;
    atomic_store(&where->word, 0);
    atomic_store(&where->waiting, CM_WAIT_NONE);
    memcpy(where->bell, w->bell, sizeof where->bell);
    where->bell_len = w->bell_len;
    atomic_store(&where->bell_broken, atomic_load(&w->bell_broken));
    ctx->waker = where;
}

/* Fill the context's pollfd table with every descriptor its transports and channels want polled;
 * *nap is lowered to the shortest nap any of them allows. Returns the count. The table has room
 * for one descriptor per channel and transport plus the bell (cm_ctx_new), so every peer is
 * polled, however many there are. */
static int gather_fds(cm_ctx *ctx, int64_t *nap) {
    struct pollfd *fds = ctx->pollfds;
    int n = 0, max = ctx->pollfds_cap - 1;          /* the last entry is the bell's */
    for (int i = 0; i < ctx->ntp && n < max; i++) {
        cm_transport *t = &ctx->tp[i];
        short ev = 0;
        int fd = t->ops->ctx_poll_fd ? t->ops->ctx_poll_fd(ctx, t, &ev) : -1;
        if (fd >= 0 && ev) { fds[n].fd = fd; fds[n].events = ev; fds[n++].revents = 0; }
    }
    for (int p = 0; p < ctx->size && n < max; p++) {
        cm_chan *c = &ctx->chans[p];
        if (!c->ops || !c->ops->poll_fd) continue;
        short ev = 0;
        int fd = c->ops->poll_fd(ctx, c, &ev, nap);
        if (fd >= 0 && ev) { fds[n].fd = fd; fds[n].events = ev; fds[n++].revents = 0; }
    }
    return n;
}

/* Whether anything is ready now, checked after the sleep was announced. */
static int news(cm_ctx *ctx) {
    if (atomic_load(&ctx->kick)) return 1;
    for (int i = 0; i < ctx->ntp; i++) {
        cm_transport *t = &ctx->tp[i];
        if (t->ops->ctx_ready && t->ops->ctx_ready(ctx, t)) return 1;
    }
    for (int p = 0; p < ctx->size; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->ops && c->ops->ready && c->ops->ready(ctx, c)) return 1;
    }
    return 0;
}

static struct timespec ts_of(int64_t ns) {
    struct timespec ts = { .tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL };
    return ts;
}

int cm_sleep(cm_ctx *ctx, int64_t timeout_ns) {
    struct pollfd *fds = ctx->pollfds;
    int64_t nap = timeout_ns;
    int n = gather_fds(ctx, &nap);
    cm_waker *w = ctx->waker;
    if (n == 0 && ctx->waker_chans == 0) {          /* nothing to sleep on */
        sched_yield();
        return CM_OK;
    }
    if (n == 0) {                                   /* every channel is woken through the word */
        uint32_t word = atomic_load(&w->word);
        atomic_store(&w->waiting, CM_WAIT_FUTEX);
        atomic_thread_fence(memory_order_seq_cst);
        if (!news(ctx)) {
            struct timespec ts = ts_of(nap);
            ctx->counters[CM_CNT_SLEEPS]++;
            syscall(SYS_futex, &w->word, FUTEX_WAIT, word, &ts, NULL, 0);
        }
        atomic_store(&w->waiting, CM_WAIT_NONE);
        return CM_OK;
    }
    if (ctx->bell_fd >= 0) { fds[n].fd = ctx->bell_fd; fds[n].events = POLLIN; fds[n++].revents = 0; }
    if ((ctx->bell_fd < 0 || atomic_load(&w->bell_broken)) && nap > BROKEN_NAP_NS) nap = BROKEN_NAP_NS;
    atomic_store(&w->waiting, CM_WAIT_POLL);
    atomic_thread_fence(memory_order_seq_cst);
    if (!news(ctx)) {                               /* news that came before the announcement rang nothing */
        struct timespec ts = ts_of(nap);
        ctx->counters[CM_CNT_SLEEPS]++;
        ppoll(fds, (nfds_t)n, &ts, NULL);
    }
    atomic_store(&w->waiting, CM_WAIT_NONE);
    bell_drain(ctx);
    return CM_OK;
}

/* This thread's run_delay: the nanoseconds it has been runnable but not running, from
 * /proc/thread-self/schedstat (its second field); -1 where the kernel does not say. Opened and
 * closed each time (about 10 us, at most once per RUN_DELAY_EVERY_NS of waiting), so no
 * descriptor outlives the thread that read it. */
static int64_t run_delay_ns(void) {
    int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[96];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *field = strchr(buf, ' ');
    return field ? strtoll(field + 1, NULL, 10) : -1;
}

static __thread int64_t rd_at = -1, rd_last;      /* this thread's last sample: when, and its value */

/* The nanoseconds this thread spent in a run queue since its last sample (-1 where the kernel does
 * not say, or there is no earlier sample), taking a new sample at ``now``. */
static int64_t queued_since_sample(int64_t now) {
    int64_t rd = run_delay_ns(), queued = rd >= 0 && rd_at >= 0 && rd_last >= 0 ? rd - rd_last : -1;
    rd_at = now;
    rd_last = rd;
    return queued;
}

static void spin_preempted(cm_ctx *ctx, int64_t now) {
    ctx->contended_until = now + CM_CONTENDED_NS;
    ctx->counters[CM_CNT_PREEMPTED]++;
}

int64_t cm_spin_budget(cm_ctx *ctx, int64_t now) {
    /* A spinning wait keeps a core that a peer may need: where this thread itself spent more than
     * RUN_DELAY_SHARE of the time since the last sample waiting for a CPU, the CPUs it runs on are
     * wanted by more threads than they have (the host's own ranks, others the topology cannot see,
     * the kernel's network work), and the context counts as contended. */
    if (rd_at < 0 || now - rd_at >= RUN_DELAY_EVERY_NS) {
        int64_t span = now - rd_at, queued = queued_since_sample(now);
        if (queued >= 0 && queued * 100 > span * RUN_DELAY_SHARE) spin_preempted(ctx, now);
    }
    return now < ctx->contended_until ? ctx->spin_min_ns : ctx->spin_ns;
}

void cm_spin_learn(cm_ctx *ctx, int64_t idle_ns) {
    int64_t target = idle_ns <= ctx->spin_max_ns ? 2 * idle_ns : ctx->spin_min_ns;
    int64_t b = ctx->spin_ns + (target - ctx->spin_ns) / 4;
    if (b > ctx->spin_max_ns) b = ctx->spin_max_ns;
    if (b < ctx->spin_min_ns) b = ctx->spin_min_ns;
    ctx->spin_ns = b;
}

/* A spinning wait found a gap of gap_ns in its own clock readings: it was off its CPU. That shows
 * contention only where this thread spent at least half of the gap in a run queue, another thread
 * of this machine running in its place. A gap taken by the hypervisor or by interrupts (the thread
 * never waited in a run queue) says nothing of who else wants the CPU, and sleeping for it only
 * adds wake-ups. Where the kernel reports no run_delay, every gap counts. */
void cm_spin_gap(cm_ctx *ctx, int64_t now, int64_t gap_ns) {
    int64_t queued = queued_since_sample(now);
    if (queued < 0 || queued * 2 >= gap_ns) spin_preempted(ctx, now);
}

int cm_nap(cm_ctx *ctx, int64_t timeout_ns) {
    int64_t nap = timeout_ns;
    int n = gather_fds(ctx, &nap);
    if (!n) return CM_OK;
    struct timespec ts = ts_of(nap);
    ctx->counters[CM_CNT_SLEEPS]++;
    ppoll(ctx->pollfds, (nfds_t)n, &ts, NULL);
    return CM_OK;
}
