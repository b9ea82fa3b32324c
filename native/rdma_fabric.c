/* The rdma transport's libfabric objects: finding a provider, opening and closing one endpoint.
 *
 * libfabric is loaded with dlopen, so comms builds and imports without it; only the few functions
 * it exports are looked up (fi_getinfo, fi_freeinfo, fi_dupinfo, fi_fabric, fi_strerror); every
 * other fi_* call is an inline function of its headers that calls through the objects' tables.
 *
 * The provider is libfabric's choice among those FI_PROVIDER allows, for an FI_EP_RDM endpoint
 * with FI_MSG and FI_RMA. The hints say which of libfabric's rules comms can follow, and the code
 * follows whatever the provider then asks for:
 * - memory registration modes FI_MR_LOCAL, VIRT_ADDR, ALLOCATED, PROV_KEY and ENDPOINT (rdma_mr.c);
 * - FI_CONTEXT and FI_CONTEXT2 (every request starts with a struct fi_context2), FI_RX_CQ_DATA
 *   (a write's CQ data may consume a posted receive: rdma.c reposts it);
 * - manual progress: comms reads the CQ in every pass of the engine, on both sides of a write;
 * - a CQ wait descriptor only where asked (ranks that share cores sleep often): keeping one costs
 *   the software providers a write and a read on a socket pair per completion (measured: a step of
 *   8 B between 2 ranks 15.4-16.3 us with it, 12.3-12.8 us without); without one, a sleeping wait
 *   naps at most 100 us at a time to read the CQ;
 * - max_msg_size, cq_data_size (4 bytes at least: a write's token) and the tx queue depth;
 * - default completion semantics (FI_DELIVERY_COMPLETE is not asked for: verbs does not offer it;
 *   a write's arrival is its CQ data at the target, never the initiator's completion).
 * For providers on IP (tcp), ``node`` picks the interface: the address the tcp transport would
 * listen on. ``domain`` (COMMS_RDMA_DOMAIN) picks a device by libfabric's domain name.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "rdma.h"

#if CM_HAVE_FABRIC

static struct {
    int tried;
    void *lib;
    int (*getinfo)(uint32_t, const char *, const char *, uint64_t, const struct fi_info *, struct fi_info **);
    void (*freeinfo)(struct fi_info *);
    struct fi_info *(*dupinfo)(const struct fi_info *);
    int (*fabric)(struct fi_fabric_attr *, struct fid_fabric **, void *);
    const char *(*strerror)(int);
} lf;

static char lib_path[256] = "libfabric.so.1";
static char load_error[480];

int rd_library(const char *path) {
    if (lf.lib) return strcmp(path, lib_path) ? CM_E_INVALID : CM_OK;   /* loaded already: only the same */
    snprintf(lib_path, sizeof lib_path, "%s", path && *path ? path : "libfabric.so.1");
    lf.tried = 0;
    return CM_OK;
}

static const char *load(void) {
    if (lf.tried) return lf.lib ? NULL : load_error;
    lf.tried = 1;
    lf.lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (!lf.lib) {
        snprintf(load_error, sizeof load_error, "libfabric is not installed: %s could not be loaded (%s); install "
                 "Debian's libfabric1 (with libfabric-bin for fi_info), or point COMMS_RDMA_LIBFABRIC at your "
                 "vendor's libfabric.so", lib_path, dlerror());
        return load_error;
    }
    lf.getinfo = dlsym(lf.lib, "fi_getinfo");
    lf.freeinfo = dlsym(lf.lib, "fi_freeinfo");
    lf.dupinfo = dlsym(lf.lib, "fi_dupinfo");
    lf.fabric = dlsym(lf.lib, "fi_fabric");
    lf.strerror = dlsym(lf.lib, "fi_strerror");
    if (!lf.getinfo || !lf.freeinfo || !lf.dupinfo || !lf.fabric || !lf.strerror) {
        dlclose(lf.lib);
        lf.lib = NULL;
        snprintf(load_error, sizeof load_error, "%s lacks fi_getinfo, fi_fabric or another function comms needs "
                 "(not libfabric, or too old?)", lib_path);
        return load_error;
    }
    return NULL;
}

const char *rd_strerror(int err) { return lf.strerror ? lf.strerror(err < 0 ? -err : err) : "libfabric error"; }

/* libfabric's software providers: RDMA semantics over sockets or shared memory, no NIC */
static int software(const char *prov) {
    static const char *const soft[] = {"tcp", "udp", "sockets", "shm", "sm2", "net", NULL};
    char buf[64];
    snprintf(buf, sizeof buf, "%s", prov ? prov : "");
    for (char *tok = strtok(buf, ";"); tok; tok = strtok(NULL, ";")) {
        if (!strncmp(tok, "ofi_", 4)) continue;       /* utility layers (ofi_rxm, ofi_rxd) */
        for (int i = 0; soft[i]; i++)
            if (!strcmp(tok, soft[i])) return 1;
        return 0;
    }
    return 1;
}

static int getinfo(const char *node, const char *domain, const char *shm_name, struct fi_info **out, char *err,
                   size_t errlen) {
    const char *why = load();
    if (why) { snprintf(err, errlen, "%.*s", (int)errlen - 1, why); return CM_E_SYS; }
    struct fi_info *hints = lf.dupinfo(NULL);
    if (!hints) { snprintf(err, errlen, "out of memory"); return CM_E_NOMEM; }
    hints->ep_attr->type = FI_EP_RDM;
    hints->caps = FI_MSG | FI_RMA;
    hints->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->domain_attr->control_progress = FI_PROGRESS_MANUAL;
    hints->domain_attr->data_progress = FI_PROGRESS_MANUAL;
    hints->domain_attr->av_type = FI_AV_TABLE;
    hints->domain_attr->cq_data_size = 4;
    if (domain && *domain) hints->domain_attr->name = strdup(domain);
    uint64_t flags = 0;
    const char *prov = getenv("FI_PROVIDER");
    int shm = prov && !strcmp(prov, "shm");
    if (shm && shm_name && *shm_name) {
        /* name the shm provider's region after comms' own segments, so that the sweep of dead
         * ranks' segments (comms.cleanup) removes it after a kill -9 */
        hints->addr_format = FI_ADDR_STR;
        hints->src_addr = strdup(shm_name);
        hints->src_addrlen = strlen(shm_name) + 1;
    } else if (!shm && node && *node) {
        flags = FI_SOURCE;                           /* IP providers: the interface with this address */
    }
    int r = lf.getinfo(FI_VERSION(1, 14), flags ? node : NULL, NULL, flags, hints, out);
    if (r == -FI_ENODATA && flags) {                 /* not an IP provider: let it choose */
        r = lf.getinfo(FI_VERSION(1, 14), NULL, NULL, 0, hints, out);
    }
    lf.freeinfo(hints);
    if (r) {
        snprintf(err, errlen, "no libfabric provider offers an RDM endpoint with messages and RMA%s%s%s "
                 "(fi_getinfo: %s)", prov ? " under FI_PROVIDER=" : "", prov ? prov : "",
                 domain && *domain ? " on the requested domain" : "", rd_strerror(r));
        return CM_E_SYS;
    }
    return CM_OK;
}

static void describe(const struct fi_info *fi, cm_rdma_info *out) {
    snprintf(out->provider, sizeof out->provider, "%s", fi->fabric_attr->prov_name ? fi->fabric_attr->prov_name : "?");
    snprintf(out->fabric, sizeof out->fabric, "%s", fi->fabric_attr->name ? fi->fabric_attr->name : "?");
    snprintf(out->domain, sizeof out->domain, "%s", fi->domain_attr->name ? fi->domain_attr->name : "?");
    out->mr_mode = (uint64_t)fi->domain_attr->mr_mode;
    out->max_msg_size = fi->ep_attr->max_msg_size;
    out->inject_size = fi->tx_attr->inject_size;
    out->cq_data_size = (uint32_t)fi->domain_attr->cq_data_size;
    out->tx_depth = (uint32_t)fi->tx_attr->size;
    out->rx_depth = (uint32_t)fi->rx_attr->size;
    out->hardware = !software(fi->fabric_attr->prov_name);
    out->prov_version = fi->fabric_attr->prov_version;
}

int rd_probe(const char *node, const char *domain, cm_rdma_info *out) {
    memset(out, 0, sizeof *out);
    struct fi_info *fi = NULL;
    int r = getinfo(node, domain, NULL, &fi, out->error, sizeof out->error);
    if (r) return r;
    describe(fi, out);
    lf.freeinfo(fi);
    return CM_OK;
}

#define TRY(call, what) do { int rc_ = (call); if (rc_) { \
        snprintf(t->info.error, sizeof t->info.error, "%s failed: %s", what, rd_strerror(rc_)); \
        rd_close(t); return CM_E_SYS; } } while (0)

int rd_open(rd_ctx *t, const char *node, const char *domain, const char *shm_name, int wait_fd) {
    t->cq_fd = -1;
    int r = getinfo(node, domain, shm_name, &t->fi, t->info.error, sizeof t->info.error);
    if (r) return r;
    struct fi_info *fi = t->fi;
    describe(fi, &t->info);
    t->rx_cq_data = (fi->mode & FI_RX_CQ_DATA) != 0;
    if (fi->domain_attr->cq_data_size < 4) {
        snprintf(t->info.error, sizeof t->info.error, "provider %s carries %zu bytes of CQ data with a write; comms "
                 "needs 4", t->info.provider, fi->domain_attr->cq_data_size);
        rd_close(t);
        return CM_E_SYS;
    }
    TRY(lf.fabric(fi->fabric_attr, &t->fabric, NULL), "fi_fabric");
    TRY(fi_domain(t->fabric, fi, &t->domain, NULL), "fi_domain");
    struct fi_cq_attr cqa = { .format = FI_CQ_FORMAT_DATA, .wait_obj = wait_fd ? FI_WAIT_FD : FI_WAIT_NONE,
                              .size = fi->tx_attr->size + fi->rx_attr->size };
    if (fi_cq_open(t->domain, &cqa, &t->cq, NULL) == 0) {
        if (wait_fd && fi_control(&t->cq->fid, FI_GETWAIT, &t->cq_fd) != 0) t->cq_fd = -1;
    } else {                                        /* the shm provider has no wait descriptor */
        cqa.wait_obj = FI_WAIT_NONE;
        t->cq = NULL;
        TRY(fi_cq_open(t->domain, &cqa, &t->cq, NULL), "fi_cq_open");
    }
    t->info.wait_fd = t->cq_fd >= 0;
    struct fi_av_attr ava = { .type = FI_AV_TABLE };
    TRY(fi_av_open(t->domain, &ava, &t->av, NULL), "fi_av_open");
    TRY(fi_endpoint(t->domain, fi, &t->ep, NULL), "fi_endpoint");
    TRY(fi_ep_bind(t->ep, &t->cq->fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)");
    TRY(fi_ep_bind(t->ep, &t->av->fid, 0), "fi_ep_bind(av)");
    TRY(fi_enable(t->ep), "fi_enable");
    return CM_OK;
}

void rd_close(rd_ctx *t) {
    if (t->ep) fi_close(&t->ep->fid);
    if (t->av) fi_close(&t->av->fid);
    if (t->cq) fi_close(&t->cq->fid);
    if (t->domain) fi_close(&t->domain->fid);
    if (t->fabric) fi_close(&t->fabric->fid);
    if (t->fi) lf.freeinfo(t->fi);
    t->ep = NULL; t->av = NULL; t->cq = NULL; t->domain = NULL; t->fabric = NULL; t->fi = NULL;
}

#endif /* CM_HAVE_FABRIC */
