/* TCP transport: one non-blocking, TCP_NODELAY socket per peer, carrying framed messages in both
 * directions. Each message is a cm_hdr followed by its payload.
 *
 * Sends go out with one sendmsg() of header + payload (no copy). Received payloads land straight
 * in the destination (recv into the user's buffer) except when they are to be reduced on arrival:
 * then they pass through a chunk-sized bounce buffer and are reduced chunk by chunk while the rest
 * is still in flight, which pipelines large messages.
 *
 * A large p2p message whose receive is not posted yet would have to be read into a malloc'ed
 * "unexpected" buffer and copied again when the receive comes (page faults on a fresh buffer, one
 * more pass over the bytes). A stream of send/recv hits this all the time: the header of message
 * N+1 is already in the socket when recv N completes, microseconds before the caller posts recv
 * N+1. So its header is held (the payload stays in the kernel) for up to HOLD_NS while nothing
 * posted on this channel needs the bytes behind it; after that it is drained as before, so a peer
 * blocked in that send is never held up for longer. And when the receive is posted while such a
 * message is still arriving, the part already buffered is copied once and the rest goes straight
 * into the receiver's buffer.
 *
 * While a large message moves, a wait naps in poll() whenever its socket is full (send) or empty
 * (receive) instead of spinning on syscalls (bulk_nap).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "comms_native.h"

/* CDEF-BEGIN: what transports/tcp.py calls (native/build_cffi.py hands these lines to cffi) */
int cm_ctx_add_tcp_peer(cm_ctx *ctx, int peer, int fd, size_t chunk_bytes);
int cm_ctx_set_tcp_delay(cm_ctx *ctx, int peer, int64_t delay_ns);   /* test hook: emulated latency */
/* CDEF-END */

#define HOLD_MIN_BYTES (64u << 10)     /* smaller unexpected messages are cheap to copy: never held */
#define HOLD_NS 2000000LL              /* the longest a p2p header waits for its receive */
#define BULK_BYTES (256u << 10)        /* a message with this much left to move is bandwidth-bound */
#define BULK_NAP_NS 1000000LL          /* the longest nap of a bandwidth-bound transfer */
#define DELAY_NAP_NS 1000000LL         /* the longest sleep while a delayed send waits */

typedef struct {                       /* one channel (cm_chan.priv) */
    int fd;
    int peer_closed;                   /* EOF seen between messages */
    int64_t delay_ns;                  /* test hook: emulated one-way latency of every message */
    cm_hdr tx_hdr;
    size_t tx_hdr_sent;
    size_t rx_hdr_got;                 /* bytes of the next header read into chan->rx_hdr */
    char *bounce;
    size_t bounce_bytes, bounce_fill;
} tcp_chan;

static const cm_transport_ops tcp_ops;

static int sock_error(cm_ctx *ctx, cm_chan *c, int err, const cm_op *op) {
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ESHUTDOWN)
        return cm_fail(ctx, CM_E_PEER_CLOSED, c->peer, err, op);
    return cm_fail(ctx, CM_E_SYS, c->peer, err, op);
}

/* 1 when the head send has bytes to write now (its header, or payload its gate let through) */
static int can_send(const tcp_chan *t, const cm_op *op) {
    return !op->started || t->tx_hdr_sent < sizeof(cm_hdr) || cm_send_limit(op) > op->done;
}

/* The fd a sleeping wait polls: readable always (data, EOF), writable when it has sends. */
static int tcp_poll_fd(cm_ctx *ctx, cm_chan *c, short *events, int64_t *nap_ns) {
    (void)ctx;
    tcp_chan *t = c->priv;
    if (t->peer_closed) return -1;
    /* a held header of a collective whose receive is not posted: its bytes wait in the kernel
     * and would make poll() return at once, a busy loop; only posting the receive (this
     * thread, or another one that kicks) changes anything */
    int parked = !c->rx_active && t->rx_hdr_got == sizeof(cm_hdr) && c->rx_hdr.kind == CM_MSG_COLL;
    *events = (short)((parked ? 0 : POLLIN) | (c->sendq && can_send(t, c->sendq) ? POLLOUT : 0));
    if (t->delay_ns && c->sendq && *nap_ns > DELAY_NAP_NS) *nap_ns = DELAY_NAP_NS;   /* wake up for delayed sends */
    return t->fd;
}

/* A bulk transfer just filled its socket (send) or emptied it (receive): the next bytes come at
 * the link's pace, not within microseconds, so the engine's spin (two syscalls per channel and pass)
 * would only burn the CPU that the copies and the network stack need, and a spinning rank on a
 * shared core uses up its share of it. Sleep in poll() over every tcp channel until one is ready,
 * for at most BULK_NAP_NS. Only in contexts whose every channel has a descriptor to poll (this nap
 * neither announces a sleep nor polls the context's bell, so a channel woken through the waker,
 * such as shm's, could not wake it: see wait.c),
 * not close to the earliest deadline of a running plan, and not while another thread wants
 * the context (kick). A nap that times out leaves nothing moved on the next pass, so no nap
 * follows: a stalled peer gets the engine's own policy. */
static void bulk_nap(cm_ctx *ctx) {
    if (ctx->waker_chans || ctx->failed || atomic_load(&ctx->kick)) return;
    int64_t margin = 2 * BULK_NAP_NS;             /* wake before the earliest deadline */
    int64_t now = cm_now_ns(), until = now + BULK_NAP_NS;
    for (cm_exec *e = ctx->active; e; e = e->next_active)
        if (!e->done && e->deadline - margin < until) until = e->deadline - margin;
    if (until - now < 10000) return;
    cm_nap(ctx, until - now);
}

static int tcp_progress_send(cm_ctx *ctx, cm_chan *c) {
    tcp_chan *t = c->priv;
    int moved = 0;
    while (c->sendq) {
        cm_op *op = c->sendq;
        if (!op->started && t->delay_ns) {         /* latency emulation (a test hook) */
            int64_t now = cm_now_ns();
            if (!op->t_ready) op->t_ready = now + t->delay_ns;
            if (now < op->t_ready) break;
        }
        if (!op->started) {
            t->tx_hdr = op->exec->sig;
            t->tx_hdr.nbytes = op->nbytes;
            t->tx_hdr.src = ctx->rank;
            t->tx_hdr_sent = 0;
            op->started = 1;
        }
        struct iovec iov[2];
        int n = 0;
        if (t->tx_hdr_sent < sizeof(cm_hdr)) {
            iov[n].iov_base = (char *)&t->tx_hdr + t->tx_hdr_sent;
            iov[n++].iov_len = sizeof(cm_hdr) - t->tx_hdr_sent;
        }
        uint64_t limit = cm_send_limit(op);
        if (op->done < limit) {
            iov[n].iov_base = op->ptr + op->done;
            iov[n++].iov_len = limit - op->done;
        }
        if (!n) break;                           /* a gated send waits for its bytes to arrive */
        size_t want = iov[0].iov_len + (n > 1 ? iov[1].iov_len : 0);
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t w = sendmsg(t->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return sock_error(ctx, c, errno, op);
        }
        moved = 1;
        size_t hdr_left = sizeof(cm_hdr) - t->tx_hdr_sent;
        if ((size_t)w <= hdr_left) {
            t->tx_hdr_sent += (size_t)w;
        } else {
            t->tx_hdr_sent = sizeof(cm_hdr);
            op->done += (size_t)w - hdr_left;
            c->tp->tx_bytes += (size_t)w - hdr_left;
        }
        if (t->tx_hdr_sent == sizeof(cm_hdr) && op->done == op->nbytes) { cm_op_done(ctx, c, op, 1); continue; }
        /* not done: the socket is full, or (all that was offered went) a gated send's next bytes
         * have not arrived yet */
        if ((size_t)w < want && op->nbytes - op->done >= BULK_BYTES) bulk_nap(ctx);   /* socket buffer full */
        break;
    }
    return moved;
}

static ssize_t recv_some(cm_ctx *ctx, cm_chan *c, void *buf, size_t len, int *rc) {
    tcp_chan *t = c->priv;
    for (;;) {
        ssize_t r = recv(t->fd, buf, len, MSG_DONTWAIT);
        if (r > 0) return r;
        if (r == 0) {
            /* an orderly close between messages is only an error for someone who still expects
             * traffic on this channel (cm_tcp_check_closed); inside a message it always is */
            t->peer_closed = 1;
            if (c->rx_active || t->rx_hdr_got || c->recvq || c->sendq) {
                *rc = cm_fail(ctx, CM_E_PEER_CLOSED, c->peer, 0, c->rx_op ? c->rx_op : c->recvq ? c->recvq : c->sendq);
                return -1;
            }
            *rc = 0;
            return -1;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) { *rc = 0; return -1; }
        *rc = sock_error(ctx, c, errno, c->rx_op);
        return -1;
    }
}

/* Hold the complete header in c->rx_hdr instead of matching it, when it is a large p2p message with
 * no receive posted for it yet, nothing posted on this channel waits behind it (a collective
 * receive from this peer needs the stream drained) and nothing is being sent to this peer (in an
 * exchange the peer may be blocked in its send until this side drains). While held, t->bounce_fill
 * (otherwise unused between messages: it is reset when a message is matched) keeps when the hold
 * began. A bad header is never held: cm_match reports it. */
static int hold_p2p(cm_ctx *ctx, cm_chan *c) {
    tcp_chan *t = c->priv;
    const cm_hdr *h = &c->rx_hdr;
    if (h->magic != CM_MAGIC || h->src != c->peer || h->kind != CM_MSG_P2P || h->nbytes < HOLD_MIN_BYTES ||
        c->sendq)
        return 0;
    for (cm_op *op = c->recvq; op; op = op->next)
        if (op->exec->is_coll || op->exec->sig.tag == h->tag) return 0;
    for (cm_op *op = ctx->anyq; op; op = op->next)
        if (op->exec->sig.tag == h->tag) return 0;
    int64_t now = cm_now_ns();
    if (!t->bounce_fill) { t->bounce_fill = (size_t)now; return 1; }
    return now - (int64_t)t->bounce_fill < HOLD_NS;
}

/* The receive of the unexpected message arriving on c was posted: copy what is buffered into it
 * and receive the rest in place (as cm_unexp_to_op in match.c does at the end, only earlier). */
static cm_op *unexp_to_direct(cm_chan *c) {
    cm_unexp *u = c->rx_unexp;
    cm_op *op = u->waiter;                 /* its size equals the message's (engine.c: post) */
    memcpy(op->ptr, u->data, u->got);
    op->done = u->got;
    cm_unexp_drop(c, u);
    c->rx_unexp = NULL;
    c->rx_op = op;
    return op;
}

static int check_closed(cm_ctx *ctx, cm_chan *c) {
    tcp_chan *t = c->priv;
    if (t->peer_closed && (c->recvq || c->sendq || c->rx_active))
        return cm_fail(ctx, CM_E_PEER_CLOSED, c->peer, 0, c->recvq ? c->recvq : c->sendq);
    return CM_OK;
}

static int tcp_progress_recv(cm_ctx *ctx, cm_chan *c) {
    tcp_chan *t = c->priv;
    int moved = 0, rc = 0;
    if (t->peer_closed) return check_closed(ctx, c);
    for (;;) {
        if (!c->rx_active) {
            if (t->rx_hdr_got < sizeof(cm_hdr)) {
                ssize_t r = recv_some(ctx, c, (char *)&c->rx_hdr + t->rx_hdr_got, sizeof(cm_hdr) - t->rx_hdr_got, &rc);
                if (r < 0) return rc < 0 ? rc : moved;
                t->rx_hdr_got += (size_t)r;
                moved = 1;
                if (t->rx_hdr_got < sizeof(cm_hdr)) continue;
            }
            if (hold_p2p(ctx, c)) return moved;    /* its receive is about to be posted */
            int m = cm_match(ctx, c);
            if (m < 0) return m;
            if (m == CM_EAGAIN) return moved;      /* header held until a receive is posted */
            t->rx_hdr_got = 0;
            t->bounce_fill = 0;
            if (c->rx_hdr.nbytes == 0) {
                int d = cm_message_done(ctx, c);
                if (d < 0) return d;
                moved = 1;
                continue;
            }
        }
        uint64_t total = c->rx_hdr.nbytes;
        cm_op *op = c->rx_op;
        if (op && op->kind == CM_STEP_RECV_REDUCE) {
            size_t esz = cm_dtype_size(op->exec->sig.dtype);
            uint64_t left = total - op->done - t->bounce_fill;
            size_t room = t->bounce_bytes - t->bounce_fill;
            ssize_t r = recv_some(ctx, c, t->bounce + t->bounce_fill, left < room ? left : room, &rc);
            if (r < 0) {
                if (rc == 0 && moved && left >= BULK_BYTES && !t->peer_closed) bulk_nap(ctx);
                return rc < 0 ? rc : moved;
            }
            moved = 1;
            t->bounce_fill += (size_t)r;
            c->tp->rx_bytes += (size_t)r;
            size_t whole = t->bounce_fill / esz * esz;
            if (whole) {
                int e = cm_deliver(ctx, c, t->bounce, whole);
                if (e < 0) return e;
                t->bounce_fill -= whole;
                if (t->bounce_fill) memmove(t->bounce, t->bounce + whole, t->bounce_fill);
            }
            if (op->done == total && (rc = cm_message_done(ctx, c)) < 0) return rc;
        } else {
            if (!op && c->rx_unexp->waiter) op = unexp_to_direct(c);
            char *dst = op ? op->ptr + op->done : c->rx_unexp->data + c->rx_unexp->got;
            uint64_t got = op ? op->done : c->rx_unexp->got;
            ssize_t r = recv_some(ctx, c, dst, total - got, &rc);
            if (r < 0) {
                if (rc == 0 && moved && total - got >= BULK_BYTES && !t->peer_closed) bulk_nap(ctx);
                return rc < 0 ? rc : moved;
            }
            moved = 1;
            c->tp->rx_bytes += (size_t)r;
            if (op) op->done += (size_t)r; else c->rx_unexp->got += (size_t)r;
            if ((op ? op->done : c->rx_unexp->got) == total && (rc = cm_message_done(ctx, c)) < 0) return rc;
        }
    }
}

static void tcp_abort(cm_ctx *ctx, cm_chan *c) {
    (void)ctx;
    shutdown(((tcp_chan *)c->priv)->fd, SHUT_RDWR);      /* the peer reads EOF */
}

static void tcp_free(cm_ctx *ctx, cm_chan *c) {
    (void)ctx;
    tcp_chan *t = c->priv;
    if (!t) return;
    if (t->fd >= 0) close(t->fd);
    free(t->bounce);
    free(t);
    c->priv = NULL;
}

static const cm_transport_ops tcp_ops = {
    .name = "tcp",
    .spin_ns = 0,                         /* bytes arrive through the kernel: sleep in poll() at once */
    .progress_send = tcp_progress_send,
    .progress_recv = tcp_progress_recv,
    .poll_fd = tcp_poll_fd,
    .abort = tcp_abort,
    .free = tcp_free,
};

/* ---- set-up (transports/tcp.py) ------------------------------------------------------------------ */
int cm_ctx_add_tcp_peer(cm_ctx *ctx, int peer, int fd, size_t chunk_bytes) {
    if (peer < 0 || peer >= ctx->size || peer == ctx->rank || fd < 0 || chunk_bytes < 64) return CM_E_INVALID;
    cm_transport *tp = cm_ctx_transport(ctx, &tcp_ops);
    tcp_chan *t = calloc(1, sizeof *t);
    if (!tp || !t || !(t->bounce = malloc(chunk_bytes))) { free(t); return tp ? CM_E_NOMEM : CM_E_INVALID; }
    t->bounce_bytes = chunk_bytes;
    t->fd = fd;
    int r = cm_ctx_attach(ctx, peer, tp, t);
    if (r < 0) { free(t->bounce); free(t); }
    return r;
}

int cm_ctx_set_tcp_delay(cm_ctx *ctx, int peer, int64_t delay_ns) {
    if (peer < 0 || peer >= ctx->size || ctx->chans[peer].ops != &tcp_ops || delay_ns < 0) return CM_E_INVALID;
    ((tcp_chan *)ctx->chans[peer].priv)->delay_ns = delay_ns;
    return CM_OK;
}
