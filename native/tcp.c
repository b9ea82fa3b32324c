/* TCP transport: one non-blocking, TCP_NODELAY socket per peer, carrying framed messages in both
 * directions. Each message is a cm_hdr followed by its payload.
 *
 * Sends go out with one sendmsg() of header + payload (no copy). Received payloads land straight
 * in the destination (recv into the user's buffer) except when they are to be reduced on arrival:
 * then they pass through a chunk-sized bounce buffer and are reduced chunk by chunk while the rest
 * is still in flight, which pipelines large messages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include "comms_native.h"

static int sock_error(cm_ctx *ctx, cm_chan *c, int err, const cm_op *op) {
    if (err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ESHUTDOWN)
        return cm_fail(ctx, CM_E_PEER_CLOSED, c->peer, err, op);
    return cm_fail(ctx, CM_E_SYS, c->peer, err, op);
}

int cm_tcp_progress_send(cm_ctx *ctx, cm_chan *c) {
    int moved = 0;
    while (c->sendq) {
        cm_op *op = c->sendq;
        if (!op->started && c->delay_ns) {         /* latency emulation (a test hook) */
            int64_t now = cm_now_ns();
            if (!op->t_ready) op->t_ready = now + c->delay_ns;
            if (now < op->t_ready) break;
        }
        if (!op->started) {
            c->tx_hdr = op->exec->sig;
            c->tx_hdr.nbytes = op->nbytes;
            c->tx_hdr.src = ctx->rank;
            c->tx_hdr_sent = 0;
            op->started = 1;
        }
        struct iovec iov[2];
        int n = 0;
        if (c->tx_hdr_sent < sizeof(cm_hdr)) {
            iov[n].iov_base = (char *)&c->tx_hdr + c->tx_hdr_sent;
            iov[n++].iov_len = sizeof(cm_hdr) - c->tx_hdr_sent;
        }
        if (op->done < op->nbytes) {
            iov[n].iov_base = op->ptr + op->done;
            iov[n++].iov_len = op->nbytes - op->done;
        }
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t w = sendmsg(c->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return sock_error(ctx, c, errno, op);
        }
        moved = 1;
        size_t hdr_left = sizeof(cm_hdr) - c->tx_hdr_sent;
        if ((size_t)w <= hdr_left) {
            c->tx_hdr_sent += (size_t)w;
        } else {
            c->tx_hdr_sent = sizeof(cm_hdr);
            op->done += (size_t)w - hdr_left;
            ctx->counters[CM_CNT_TCP_TX] += (size_t)w - hdr_left;
        }
        if (c->tx_hdr_sent == sizeof(cm_hdr) && op->done == op->nbytes) cm_op_done(ctx, c, op, 1);
        else break;                               /* socket buffer full */
    }
    return moved;
}

static ssize_t recv_some(cm_ctx *ctx, cm_chan *c, void *buf, size_t len, int *rc) {
    for (;;) {
        ssize_t r = recv(c->fd, buf, len, MSG_DONTWAIT);
        if (r > 0) return r;
        if (r == 0) {
            /* an orderly close between messages is only an error for someone who still expects
             * traffic on this channel (cm_tcp_check_closed); inside a message it always is */
            c->peer_closed = 1;
            if (c->rx_active || c->rx_hdr_got || c->recvq || c->sendq) {
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

int cm_tcp_check_closed(cm_ctx *ctx, cm_chan *c) {
    if (c->peer_closed && (c->recvq || c->sendq || c->rx_active))
        return cm_fail(ctx, CM_E_PEER_CLOSED, c->peer, 0, c->recvq ? c->recvq : c->sendq);
    return CM_OK;
}

int cm_tcp_progress_recv(cm_ctx *ctx, cm_chan *c) {
    int moved = 0, rc = 0;
    if (c->peer_closed) return cm_tcp_check_closed(ctx, c);
    for (;;) {
        if (!c->rx_active) {
            if (c->rx_hdr_got < sizeof(cm_hdr)) {
                ssize_t r = recv_some(ctx, c, (char *)&c->rx_hdr + c->rx_hdr_got, sizeof(cm_hdr) - c->rx_hdr_got, &rc);
                if (r < 0) return rc < 0 ? rc : moved;
                c->rx_hdr_got += (size_t)r;
                moved = 1;
                if (c->rx_hdr_got < sizeof(cm_hdr)) continue;
            }
            int m = cm_match(ctx, c);
            if (m < 0) return m;
            if (m == CM_EAGAIN) return moved;      /* header held until a receive is posted */
            c->rx_hdr_got = 0;
            c->bounce_fill = 0;
            if (c->rx_hdr.nbytes == 0) { cm_message_done(ctx, c); moved = 1; continue; }
        }
        uint64_t total = c->rx_hdr.nbytes;
        cm_op *op = c->rx_op;
        if (op && op->kind == CM_STEP_RECV_REDUCE) {
            size_t esz = cm_dtype_size(op->exec->sig.dtype);
            uint64_t left = total - op->done - c->bounce_fill;
            size_t room = c->bounce_bytes - c->bounce_fill;
            ssize_t r = recv_some(ctx, c, c->bounce + c->bounce_fill, left < room ? left : room, &rc);
            if (r < 0) return rc < 0 ? rc : moved;
            moved = 1;
            c->bounce_fill += (size_t)r;
            ctx->counters[CM_CNT_TCP_RX] += (size_t)r;
            size_t whole = c->bounce_fill / esz * esz;
            if (whole) {
                int e = cm_deliver(ctx, c, c->bounce, whole);
                if (e < 0) return e;
                c->bounce_fill -= whole;
                if (c->bounce_fill) memmove(c->bounce, c->bounce + whole, c->bounce_fill);
            }
            if (op->done == total) cm_message_done(ctx, c);
        } else {
            char *dst = op ? op->ptr + op->done : c->rx_unexp->data + c->rx_unexp->got;
            uint64_t got = op ? op->done : c->rx_unexp->got;
            ssize_t r = recv_some(ctx, c, dst, total - got, &rc);
            if (r < 0) return rc < 0 ? rc : moved;
            moved = 1;
            ctx->counters[CM_CNT_TCP_RX] += (size_t)r;
            if (op) op->done += (size_t)r; else c->rx_unexp->got += (size_t)r;
            if ((op ? op->done : c->rx_unexp->got) == total) cm_message_done(ctx, c);
        }
    }
}

/* Block in poll() until a socket with pending work is ready, for at most timeout_ns. */
int cm_tcp_sleep(cm_ctx *ctx, int64_t timeout_ns) {
    struct pollfd fds[256];
    int n = 0;
    for (int p = 0; p < ctx->size && n < 256; p++) {
        cm_chan *c = &ctx->chans[p];
        if (c->type != CM_CHAN_TCP || c->peer_closed) continue;
        fds[n].fd = c->fd;
        fds[n].events = (short)(POLLIN | (c->sendq ? POLLOUT : 0));
        fds[n++].revents = 0;
    }
    int delayed = 0;
    for (int p = 0; p < ctx->size; p++) delayed |= ctx->chans[p].type == CM_CHAN_TCP && ctx->chans[p].delay_ns && ctx->chans[p].sendq;
    if (delayed && timeout_ns > 1000000) timeout_ns = 1000000;   /* wake up for delayed sends */
    int ms = (int)((timeout_ns + 999999) / 1000000);
    ctx->counters[CM_CNT_SLEEPS]++;
    poll(fds, (nfds_t)n, ms);
    return CM_OK;
}
