/* Bounds of plans: every byte a plan's steps read or write lies inside the buffer the step names.
 *
 * The engine (engine.c) runs a plan on raw addresses; it cannot tell how long the caller's buffers
 * are. So a plan is checked once, when it is encoded (comms.runtime.engine.Encoded), against the
 * byte lengths of the buffers it will run on: the caller's input and output and its scratch. The
 * cache that holds the encoded plan is keyed by what fixes those lengths (collective, count,
 * dtype, splits...), so every later call with that plan passes buffers at least as long, and the
 * hot path (cm_exec_run, cm_call_run) checks nothing more. Together with the checks on arriving
 * messages (match.c: a message's size must equal its receive's, which this check keeps inside its
 * buffer), no step and no message writes past a buffer.
 *
 * What each step touches (algorithms/plan.py documents the steps):
 *   SEND, RECV, RECV_REDUCE, DIV, BOARD   buf[off, off + nbytes)
 *   COPY, REDUCE                          buf[off, off + nbytes) and buf2[off2, off2 + nbytes)
 *   REDUCE_SLOTS                          buf[off, off + nbytes) and, for k < peer (>= 1),
 *                                         buf2[off2 + k * aux, off2 + k * aux + nbytes)
 *   PHASE                                 nothing
 * A gated SEND (aux = its gate + 1) names an earlier RECV or RECV_REDUCE from a named peer of the
 * very same bytes (buf, off, nbytes), with only communication steps between the two (they are in
 * flight together): the engine sends those bytes as that receive delivers them (cm_send_limit).
 * A step of 0 bytes touches nothing. Steps that reduce (RECV_REDUCE, REDUCE, REDUCE_SLOTS, DIV,
 * BOARD) must cover whole elements of the plan's dtype: the kernels round down, and a message that
 * is reduced on arrival is cut at element boundaries (tcp's bounce buffer, rdma's staging slots).
 */
#include "comms_native.h"

/* [off, off + n) inside [0, len), without overflow */
static int inside(uint64_t off, uint64_t n, uint64_t len) { return off <= len && n <= len - off; }

static int reduces(int kind) {
    return kind == CM_STEP_RECV_REDUCE || kind == CM_STEP_REDUCE || kind == CM_STEP_REDUCE_SLOTS ||
           kind == CM_STEP_DIV || kind == CM_STEP_BOARD;
}

/* The reason step `s` does not fit, or CM_PLAN_FITS. */
static int step_fits(const cm_step *s, const uint64_t *lens, int nbufs, size_t esz) {
    if (s->kind == CM_STEP_PHASE || !s->nbytes) return CM_PLAN_FITS;
    if (s->kind < CM_STEP_SEND || s->kind > CM_STEP_BOARD) return CM_PLAN_BAD_KIND;
    if (s->buf < 0 || s->buf >= nbufs) return CM_PLAN_BAD_BUF;
    if (!inside(s->off, s->nbytes, lens[s->buf])) return CM_PLAN_PAST_BUF;
    if (reduces(s->kind) && (!esz || s->nbytes % esz)) return CM_PLAN_PART_ELEMENT;
    if (s->kind != CM_STEP_COPY && s->kind != CM_STEP_REDUCE && s->kind != CM_STEP_REDUCE_SLOTS)
        return CM_PLAN_FITS;
    if (s->buf2 < 0 || s->buf2 >= nbufs) return CM_PLAN_BAD_BUF;
    uint64_t len2 = lens[s->buf2];
    if (!inside(s->off2, s->nbytes, len2)) return CM_PLAN_PAST_BUF2;
    if (s->kind == CM_STEP_REDUCE_SLOTS) {
        if (s->peer < 1) return CM_PLAN_BAD_SLOTS;
        /* the last slot, off2 + (peer - 1) * aux, must leave room for nbytes: aux <= room / (peer - 1) */
        uint64_t room = len2 - s->off2 - s->nbytes, more = (uint64_t)(s->peer - 1);
        if (more && s->aux > room / more) return CM_PLAN_PAST_BUF2;
    }
    return CM_PLAN_FITS;
}

static int is_comm(int kind) { return kind == CM_STEP_SEND || kind == CM_STEP_RECV || kind == CM_STEP_RECV_REDUCE; }

/* 1 when step i is no gated send, or its gate is one the engine can follow */
static int gate_fits(const cm_step *steps, int i) {
    const cm_step *s = &steps[i];
    if (s->kind != CM_STEP_SEND || !s->aux) return 1;
    if (s->aux > (uint64_t)i) return 0;
    int g = (int)(s->aux - 1);
    if (!cm_gate_matches(&steps[g], s)) return 0;
    for (int k = g + 1; k < i; k++)
        if (!is_comm(steps[k].kind)) return 0;
    return 1;
}

int cm_plan_check(const cm_step *steps, int nsteps, const uint64_t *lens, int nbufs, int dtype, cm_plan_fault *out) {
    out->step = -1;
    out->reason = CM_PLAN_FITS;
    if (nsteps < 0 || nbufs < 0 || nbufs > CM_MAX_BUFS) { out->reason = CM_PLAN_BAD_BUF; return CM_E_INVALID; }
    size_t esz = cm_dtype_size(dtype);
    for (int i = 0; i < nsteps; i++) {
        int why = step_fits(&steps[i], lens, nbufs, esz);
        if (why == CM_PLAN_FITS && !gate_fits(steps, i)) why = CM_PLAN_BAD_GATE;
        if (why != CM_PLAN_FITS) {
            out->step = i;
            out->reason = why;
            return CM_E_INVALID;
        }
    }
    return CM_OK;
}
