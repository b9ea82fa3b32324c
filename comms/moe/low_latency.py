"""Low-latency dispatch/combine for decoding: fixed-capacity buffers, no count exchange.

Each direction is one equal-split ``all_to_all`` whose size depends only on the call's shape
(``cap = max_tokens_per_rank``), so nothing has to be agreed first:

- Dispatch block for rank p: ``[1 + cap, nbytes]`` uint8. Slot 0 is the header
  (:data:`comms.moe.checks.FIELDS` int64: this rank's verdict on its input, K, hidden, dtype,
  experts, flags, the number of token rows that follow (COUNT) and ``cap`` (EXTRA)). Slots
  ``1..COUNT`` hold this rank's tokens bound for p, ascending: one byte per expert of p (1 where the
  token selected it), the fp8 scales if any, the payload. Later slots are not initialised.
- The receiver places every (token, local expert) pair in ``recv_x[e]``, ordered by source rank
  then source token, packed from slot 0; ``recv_count[e]`` says how many are valid. Rows past it
  are unspecified (not zeroed: the buffer is ``[E/W, cap * W, H]`` and zeroing it would cost more
  than the exchange at decode sizes).
- Combine block for source s: a header, then ``[cap, L, H]`` of y's dtype with ``L = min(K, E/W)``:
  for token row r, the outputs of its experts on this rank in ascending expert order. The source
  returns ``sum over k (ascending) of topk_weights[t, k] * y_k`` accumulated in float32, in y's
  dtype; selections of -1 contribute nothing.

Bad input on any rank is reported on every rank from the headers (InvalidUsage / MismatchError);
a different ``cap``, dtype or fp8 flag between ranks changes the block size, which comms itself
reports as a MismatchError (and aborts the communicator).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidUsage
from . import checks, fp8 as fp8mod
from .checks import COUNT, DTYPE, EXPERTS, EXTRA, FIELDS, FLAG_FP8, FLAGS, HIDDEN, K
from .layout import compute_layout, offsets, owner_of
from .rows import RowFormat

HEADER_BYTES = 8 * FIELDS


@dataclass
class LowLatencyHandle:
    """What combine needs. Source side: for each (token, k), the rank ``src_p``, row ``src_r`` and
    slot ``src_j`` its expert's output comes back in (-1 for no expert). Expert side: each valid
    (expert ``e``, position ``pos``) came from rank ``s``, row ``r``, slot ``j``."""
    owner: int
    num_tokens: int
    k: int
    cap: int
    topk_idx: torch.Tensor
    src_p: torch.Tensor
    src_r: torch.Tensor
    src_j: torch.Tensor
    e: torch.Tensor
    pos: torch.Tensor
    s: torch.Tensor
    r: torch.Tensor
    j: torch.Tensor


def _capacity(cap) -> int:
    try:
        return int(cap)
    except (TypeError, ValueError):
        return 0


def _header_view(buf: torch.Tensor) -> torch.Tensor:
    return buf[..., :HEADER_BYTES].view(torch.int64)


def _fill_blocks(flat, fmt, x, idx, lay, cap: int, world: int, epr: int, fp8: bool):
    """Write this rank's token rows into the send blocks (``flat``: all slots, [W * (1 + cap),
    nbytes]); return where each (token, k) comes back in combine: rank, row, slot (-1: none)."""
    T, E = x.shape[0], world * epr
    block = torch.repeat_interleave(torch.arange(world), torch.tensor(lay.send_counts, dtype=torch.int64))
    within = torch.arange(block.numel()) - torch.tensor(offsets(lay.send_counts), dtype=torch.int64)[block]
    slot = block * (1 + cap) + 1 + within
    chosen = torch.zeros(T, E + 1, dtype=torch.uint8)
    chosen.scatter_(1, torch.where(idx >= 0, idx, torch.full_like(idx, E)), 1)
    fmt.view(flat, "experts").index_copy_(0, slot, chosen[:, :E].view(T, world, epr)[lay.send_idx, block])
    xd = x.detach().contiguous()
    if fp8:
        q, scales = fp8mod.quantize(xd)
        xd = fp8mod.as_bytes(q)
        fmt.view(flat, "scales").index_copy_(0, slot, scales.index_select(0, lay.send_idx))
    fmt.view(flat, "x").index_copy_(0, slot, xd.index_select(0, lay.send_idx))
    row_of = torch.full((T, world + 1), -1, dtype=torch.int64)
    row_of[lay.send_idx, block] = within
    owner = owner_of(idx, epr, world)
    none = torch.full_like(idx, -1)
    earlier = (owner.unsqueeze(1) == owner.unsqueeze(2)) & (idx.unsqueeze(1) < idx.unsqueeze(2)) & \
        (idx.unsqueeze(1) >= 0)                  # [t, k, k']: k' is an earlier expert on the same rank
    return (torch.where(idx >= 0, owner, none), row_of.gather(1, owner),
            torch.where(idx >= 0, earlier.sum(dim=2), none))


def dispatch(ep, x, topk_idx, max_tokens_per_rank, fp8: bool):
    """Low-latency dispatch (see the module docstring): returns (recv_x [E/W, cap * W, H] or, with
    fp8, (float8 rows, float32 scales [E/W, cap * W, H / 128]), recv_count [E/W] int64, handle).
    ``x`` [T <= cap, H], ``topk_idx`` [T, K] as for the normal dispatch; no weights travel."""
    W, epr, H, E, comm = ep.world, ep.experts_per_rank, ep.hidden, ep.num_experts, ep.comm
    cap = _capacity(max_tokens_per_rank)
    p = checks.check_dispatch(x, topk_idx, None, H, E, fp8, need_weights=False)
    if p is None and (cap < 1 or x.shape[0] > cap):
        p = checks.problem(checks.CAPACITY, x.shape[0], cap)
    cap = max(cap, 1)
    dtype = x.dtype if p is None or checks.check_x(x, H) is None else torch.bfloat16
    fields = [("experts", torch.uint8, epr)]
    if fp8:
        fields.append(("scales", torch.float32, H // fp8mod.BLOCK))
    fields.append(("x", torch.uint8 if fp8 else dtype, H))
    fmt = RowFormat(fields, min_bytes=HEADER_BYTES)
    send = fmt.empty(W, 1 + cap)
    hdr = np.tile(checks.header(p, int(topk_idx.shape[1]) if p is None else -1, H,
                                checks.dtype_code(x) if p is None else -1, E, FLAG_FP8 if fp8 else 0), (W, 1))
    hdr[:, EXTRA] = cap
    if p is None:
        idx = topk_idx.to(torch.int64).contiguous()
        lay = compute_layout(idx, E, W)
        hdr[:, COUNT] = lay.send_counts
        src_p, src_r, src_j = _fill_blocks(send.view(W * (1 + cap), fmt.nbytes), fmt, x, idx, lay, cap, W, epr, fp8)
    _header_view(send[:, 0]).copy_(torch.from_numpy(hdr))
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send)
    got = _header_view(recv[:, 0]).numpy()
    checks.verdict(got, "low_latency_dispatch", ep.rank, H, E, agree=(K, HIDDEN, DTYPE, EXPERTS, FLAGS, EXTRA))
    # every (local expert e, source s, row r) the rows select, in that order: recv_x[e] is packed
    valid = torch.arange(cap).unsqueeze(0) < torch.from_numpy(got[:, COUNT].copy()).unsqueeze(1)
    onehot = fmt.view(recv, "experts")[:, 1:, :]                              # [W, cap, epr]
    e, s, r = (onehot.bool() & valid.unsqueeze(2)).permute(2, 0, 1).nonzero().unbind(1)
    recv_count = torch.bincount(e, minlength=epr)
    pos = torch.arange(e.numel()) - torch.tensor(offsets(recv_count.tolist()), dtype=torch.int64)[e]
    j = (onehot.to(torch.int64).cumsum(dim=2) - 1)[s, r, e]                  # slot among the row's experts
    dest, src = e * (cap * W) + pos, s * (1 + cap) + 1 + r
    flat = recv.view(W * (1 + cap), fmt.nbytes)
    recv_x = ep._pool.empty((epr, cap * W, H), torch.uint8 if fp8 else dtype)
    recv_x.view(-1, H).index_copy_(0, dest, fmt.view(flat, "x").index_select(0, src))
    handle = LowLatencyHandle(id(ep), x.shape[0], int(got[0, K]), cap, idx, src_p, src_r, src_j, e, pos, s, r, j)
    ep.load.record(lay.expert_counts, recv_count.tolist())
    if fp8:
        nb = H // fp8mod.BLOCK
        recv_scales = torch.empty(epr, cap * W, nb, dtype=torch.float32)
        recv_scales.view(-1, nb).index_copy_(0, dest, fmt.view(flat, "scales").index_select(0, src))
        return (fp8mod.from_bytes(recv_x), recv_scales), recv_count, handle
    return recv_x, recv_count, handle


def combine(ep, y, topk_idx, topk_weights, handle):
    """Low-latency combine: ``y`` [E/W, cap * W, H] holds each local expert's output for the rows
    of recv_x; returns sum_k topk_weights[t, k] * (output of expert topk_idx[t, k] for token t),
    [T, H] in y's dtype. ``topk_idx`` must be the one given to the dispatch."""
    W, epr, H, E, comm = ep.world, ep.experts_per_rank, ep.hidden, ep.num_experts, ep.comm
    if not isinstance(handle, LowLatencyHandle) or handle.owner != id(ep):
        checks.poison(comm)
        raise InvalidUsage("low_latency_combine: handle is not a LowLatencyHandle of this dispatcher")
    cap, k, T = handle.cap, handle.k, handle.num_tokens
    L = min(k, epr)
    p = None
    if not isinstance(y, torch.Tensor) or y.dtype not in checks.FLOAT_DTYPES or y.device.type != "cpu" \
            or tuple(y.shape) != (epr, cap * W, H):
        p = checks.problem(checks.Y_SHAPE, cap * W, getattr(y, "ndim", -1), (list(getattr(y, "shape", [])) + [0])[0])
    elif not isinstance(topk_idx, torch.Tensor) or tuple(topk_idx.shape) != (T, k) \
            or not torch.equal(topk_idx.to(torch.int64), handle.topk_idx):
        p = checks.problem(checks.IDX_CHANGED)
    elif not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32 \
            or tuple(topk_weights.shape) != (T, k):
        p = checks.problem(checks.W_BAD, T, k)
    dtype = y.dtype if p is None or (isinstance(y, torch.Tensor) and y.dtype in checks.FLOAT_DTYPES) \
        else torch.bfloat16
    fmt = RowFormat([("hdr", torch.int64, FIELDS), ("y", dtype, cap * L * H)])
    send = fmt.empty(W)
    hdr = np.tile(checks.header(p, k, H, checks.FLOAT_DTYPES.index(dtype), E, 0), (W, 1))
    hdr[:, EXTRA] = cap
    fmt.view(send, "hdr").copy_(torch.from_numpy(hdr))
    if p is None and handle.e.numel():
        out_rows = fmt.view(send, "y").view(W, cap * L, H)
        out_rows[handle.s, handle.r * L + handle.j] = y.reshape(-1, H)[handle.e * (cap * W) + handle.pos]
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send)
    checks.verdict(fmt.view(recv, "hdr").numpy(), "low_latency_combine", ep.rank, H, E,
                   agree=(K, HIDDEN, DTYPE, EXPERTS, EXTRA))
    back = fmt.view(recv, "y").view(W, cap * L, H)
    acc = torch.zeros(T, H, dtype=torch.float32)
    for kk in range(k):
        t = (handle.src_p[:, kk] >= 0).nonzero().squeeze(1)
        if t.numel():
            rows = back[handle.src_p[t, kk], handle.src_r[t, kk] * L + handle.src_j[t, kk]].float()
            acc.index_add_(0, t, rows * topk_weights[t, kk].unsqueeze(1))
    return acc if dtype == torch.float32 else acc.to(dtype)
