/* Private to the rdma transport (rdma.c, rdma_fabric.c, rdma_mr.c): its state and wire format.
 *
 * libfabric is reached through dlopen (rdma_fabric.c): comms builds and imports without it, and
 * only opening the transport needs libfabric.so.1. Its headers are needed at build time
 * (libfabric-dev); without them CM_HAVE_FABRIC is 0 and opening fails with an error that says so.
 */
#ifndef COMMS_RDMA_H
#define COMMS_RDMA_H

#include "comms_native.h"

#if defined(__has_include)
#if __has_include(<rdma/fabric.h>)
#define CM_HAVE_FABRIC 1
#endif
#endif
#ifndef CM_HAVE_FABRIC
#define CM_HAVE_FABRIC 0
#endif

/* CDEF-BEGIN: what transports/rdma.py calls (native/build_cffi.py hands these lines to cffi) */
typedef struct {                       /* what the opened (or probed) provider offers: comms.info shows it */
    char provider[64];
    char fabric[128];
    char domain[128];
    uint64_t mr_mode;                  /* FI_MR_* bits the provider requires */
    uint64_t max_msg_size;
    uint64_t inject_size;
    uint32_t cq_data_size;
    uint32_t tx_depth, rx_depth;
    int32_t wait_fd;                   /* 1: its completion queue gives a descriptor to sleep on */
    int32_t hardware;                  /* 1: not one of libfabric's software providers */
    uint32_t prov_version;             /* the provider's FI_VERSION(major, minor) */
    char error[512];                   /* why opening failed */
} cm_rdma_info;
int cm_rdma_library(const char *path);     /* the libfabric to dlopen, before the first probe or open */
int cm_rdma_probe(const char *node, const char *domain, cm_rdma_info *out);
int cm_rdma_open(cm_ctx *ctx, const char *node, const char *domain, const char *shm_name, int mr_local,
                 int wait_fd, size_t eager_bytes, cm_rdma_info *out, void *addr, size_t *addrlen);
int cm_rdma_add_peer(cm_ctx *ctx, int peer, const void *addr, size_t addrlen, int fd);
int cm_rdma_pin(cm_ctx *ctx, uintptr_t base, uint64_t len);
int cm_rdma_forget(cm_ctx *ctx, uintptr_t base, uint64_t len);
int cm_rdma_mr_stats(cm_ctx *ctx, uint64_t *out, int n);   /* registrations, hits, one-use, forgets, pinned */
/* CDEF-END */

#if CM_HAVE_FABRIC
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

/* ---- wire format: every message is a send of one rd_msg, EAGER ones followed by the payload ---- */
#define RD_MAGIC 0x434d5244u          /* "CMRD" */
enum { RD_EAGER = 1, RD_RTS = 2, RD_CTS = 3 };
#define RD_DIRECT 15                   /* rd_msg.slot of a grant of the receive buffer itself */

typedef struct {
    uint32_t magic;
    uint16_t type;                     /* RD_EAGER, RD_RTS, RD_CTS */
    uint16_t slot;                     /* CTS: the staging slot granted, or RD_DIRECT */
    int32_t src;                       /* sender's rank */
    uint32_t seq;                      /* per channel and direction: messages are handled in this order */
    uint64_t raddr;                    /* CTS: where to write (an address or an offset: FI_MR_VIRT_ADDR) */
    uint64_t rkey;                     /* CTS: the key of the receiver's registration */
    uint64_t off;                      /* CTS: byte offset in the message where the grant starts */
    uint64_t len;                      /* CTS: bytes granted */
    uint64_t piece;                    /* CTS: bytes per write (each carries the token as CQ data) */
    uint32_t token;                    /* CTS: the CQ data the writes of this grant carry */
    uint32_t pad;
    cm_hdr hdr;                        /* EAGER, RTS: the message header (mismatch detection) */
} rd_msg;

/* ---- requests: the context of every posted operation starts with libfabric's scratch space ---- */
enum { RQ_TX = 1, RQ_RX = 2, RQ_WRITE = 3 };

typedef struct rd_req {
    struct fi_context2 fictx;          /* FI_CONTEXT / FI_CONTEXT2 modes: the provider's scratch */
    int kind;
    int peer;
    struct rd_req *next;               /* free list (TX), or the channel's held list (RX) */
    char *buf;                         /* TX, RX: the registered buffer */
    uint32_t len;                      /* RX: bytes received */
    uint32_t seq;                      /* RX: the message's rd_msg.seq */
} rd_req;

/* ---- the registration cache (rdma_mr.c) ---------------------------------------------------------
 * A range enters the cache only when Python vouches for it (cm_rdma_pin: its owner is alive and
 * will call cm_rdma_forget before the memory goes); any other buffer is registered for one use. */
typedef struct rd_mr {
    uintptr_t base;
    uint64_t len;
    struct fid_mr *mr;                 /* NULL until first used */
    void *desc;
    uint64_t key;
    int refs;                          /* operations using it now */
    int pinned;                        /* 0: registered for one use, closed when refs drops to 0 */
    int doomed;                        /* forgotten while in use: closed when refs drops to 0 */
    uint64_t used;                     /* LRU stamp */
    struct rd_mr *next;
} rd_mr;

#define RD_MR_MAX 256                  /* pinned ranges kept; the least recently used unused one goes */

typedef struct {
    rd_mr *list;
    int npinned;
    uint64_t clock;
    uint64_t next_key;                 /* keys comms picks when the provider does not (no FI_MR_PROV_KEY) */
    uint64_t regs, hits, temps, forgets;   /* cm_rdma_mr_stats */
} rd_cache;

/* ---- the context's rdma state (cm_transport.priv) ------------------------------------------------ */
typedef struct {
    cm_rdma_info info;
    struct fi_info *fi;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    int cq_fd;                         /* -1: the CQ cannot wake a sleeper (shm provider) */
    int rx_cq_data;                    /* FI_RX_CQ_DATA mode: a write's CQ data consumes a posted receive */
    uint64_t mr_mode;                  /* the provider's, plus FI_MR_LOCAL when COMMS_RDMA_MR_LOCAL */
    size_t eager_bytes;                /* rd_msg + payload of the largest EAGER message */
    size_t piece_bytes;                /* bytes per RMA write */
    int tx_max, tx_used;               /* operations posted and not completed, at most tx_max */
    /* send and receive buffers: one registration each */
    char *txmem, *rxmem;
    rd_mr *txmr, *rxmr;
    rd_req *txreq, *rxreq, *txfree;
    int ntx, nrx;
    rd_req *repost;                    /* receive buffers to post again (the post failed with EAGAIN) */
    rd_cache cache;
    fi_addr_t *addr;                   /* per rank */
} rd_ctx;

#define RD_SLOTS 4                     /* staging slots per channel for receives that reduce */
#define RD_SLOT_BYTES (1u << 20)
#define RD_PIECE_BYTES (4u << 20)      /* the largest single write */
#define RD_NTX 128                     /* send buffers */
#define RD_NRX 128                     /* receive buffers kept posted */
#define RD_MAX_GRANTS (RD_SLOTS + 1)
#define RD_NOFD_NAP_NS 100000LL        /* without a CQ descriptor, naps end this soon to poll the CQ */
#define RD_CLOSE_GRACE_NS 250000000LL  /* after a peer's liveness connection closed, its last messages may
                                        * still be on the way (another connection): wait this long for them */

typedef struct {
    uint64_t off, len, piece, raddr, rkey, posted;
    uint32_t token;
} rd_cts;

typedef struct {                       /* one channel (cm_chan.priv) */
    rd_ctx *t;
    int fd;                            /* liveness connection; -1 once closed */
    int peer_closed;
    int64_t closed_at;                 /* when peer_closed was seen */
    uint32_t tx_seq, rx_seq;
    /* receive side */
    rd_req *held;                      /* arrived ahead of rx_seq, sorted by seq */
    rd_req *inq, *inq_tail;            /* EAGER and RTS messages waiting to be matched, in order */
    int rndv;                          /* a rendezvous is being received (after its RTS matched) */
    int direct;                        /* its writes land in place, not in staging slots */
    uint8_t gen;                       /* the token's generation: a stale write is an error */
    uint64_t total, granted;
    uint64_t pieces, landed_pieces;
    char *dest;
    rd_mr *dest_mr;
    char *stage;
    rd_mr stage_mr;
    int busy[RD_SLOTS], landed[RD_SLOTS];
    uint64_t slot_off[RD_SLOTS], slot_len[RD_SLOTS];
    /* send side: the rendezvous at the head of the send queue */
    cm_op *tx_op;
    rd_mr *tx_mr;
    rd_cts grants[RD_MAX_GRANTS];
    int ngrants;
    uint64_t written;
} rd_chan;

/* rdma.c: the protocol */
void rd_repost(rd_ctx *t, rd_req *r);
int rd_send_msg(cm_ctx *ctx, cm_chan *c, rd_msg *m, const void *payload, size_t len);
int rd_grant(cm_ctx *ctx, cm_chan *c);
int rd_start_rndv(cm_ctx *ctx, cm_chan *c);
int rd_post_writes(cm_ctx *ctx, cm_chan *c);
int rd_peer_gone(rd_chan *rc);
int rd_progress(cm_ctx *ctx, cm_transport *tp);
int rd_fail(cm_ctx *ctx, int peer, int err, const cm_op *op);

/* rdma_ops.c */
extern const cm_transport_ops cm_rdma_ops;

/* rdma_fabric.c */
int rd_library(const char *path);
int rd_open(rd_ctx *t, const char *node, const char *domain, const char *shm_name, int wait_fd);
void rd_close(rd_ctx *t);
const char *rd_strerror(int err);
int rd_probe(const char *node, const char *domain, cm_rdma_info *out);

/* rdma_mr.c */
int rd_mr_reg(rd_ctx *t, rd_mr *m, uint64_t access);
rd_mr *rd_mr_acquire(rd_ctx *t, const void *ptr, uint64_t len);
void rd_mr_release(rd_ctx *t, rd_mr *m);
uint64_t rd_mr_raddr(const rd_ctx *t, const rd_mr *m, const void *ptr);
int rd_mr_pin(rd_ctx *t, uintptr_t base, uint64_t len);
void rd_mr_forget(rd_ctx *t, uintptr_t base, uint64_t len);
void rd_mr_revoke(rd_ctx *t);
void rd_mr_clear(rd_ctx *t);
#endif /* CM_HAVE_FABRIC */

#endif
