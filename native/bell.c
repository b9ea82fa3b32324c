/* Wake-up bells for waits that sleep in poll().
 *
 * A context with only shm peers sleeps on the futex doorbell of its segment, and every shm sender
 * wakes it there. A context with tcp peers must sleep in poll() on its sockets, and a futex does not
 * wake poll(): a rank that waits for a shm message and a tcp message at once (every hierarchical
 * or flat plan over several hosts) used to nap in poll() for up to a millisecond before it looked
 * at its shm rings again. So each context owns a datagram socket bound to an abstract AF_UNIX
 * address (nothing in the file system: it vanishes with the process, even after kill -9), polled
 * with the tcp sockets:
 *
 * - its address is published in the context's shm segment header; a shm sender that finds the
 *   receiver sleeping in poll() (waiting == CM_WAIT_POLL, checked Dekker-style after publishing,
 *   as for the futex) sends it one byte;
 * - another thread of the process that wants the context (cm_ctx_kick) sends to it as well;
 * - the sleeper drains it after waking.
 *
 * Abstract addresses are per network namespace. A same-host peer in another network namespace
 * cannot reach it; its failed send sets bell_broken in the segment header, and the sleeper then
 * caps its naps at 1 ms as before. Without a bell (socket creation failed) the same cap applies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "comms_native.h"

static _Atomic int send_fd = -1;      /* one unbound socket of the process sends every ring */
static _Atomic uint64_t bell_seq;

int cm_bell_open(cm_ctx *ctx) {
    ctx->bell_fd = -1;
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
    ctx->bell_len = (uint32_t)(1 + n);
    memcpy(ctx->bell, a.sun_path, ctx->bell_len);
    return CM_OK;
}

void cm_bell_ring(const char *addr, uint32_t len, _Atomic uint32_t *broken) {
    if (!len || len > sizeof(((struct sockaddr_un *)0)->sun_path)) return;
    int fd = atomic_load(&send_fd);
    if (fd < 0) {
        int mine = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (mine < 0) { if (broken) atomic_store(broken, 1); return; }
        int expect = -1;
        if (atomic_compare_exchange_strong(&send_fd, &expect, mine)) fd = mine;
        else { close(mine); fd = expect; }
    }
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    memcpy(a.sun_path, addr, len);
    char byte = 1;
    ssize_t r = sendto(fd, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&a,
                       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    /* EAGAIN: its queue is full of rings already, it will wake; ECONNREFUSED/ENOENT: unreachable */
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && broken) atomic_store(broken, 1);
}

void cm_bell_drain(cm_ctx *ctx) {
    char buf[64];
    if (ctx->bell_fd < 0) return;
    while (recv(ctx->bell_fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {}
}
