"""Expert-parallel dispatch and combine with DeepEP semantics, on host memory.

    ep = Dispatcher(comm, num_experts=E, hidden=H)
    recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = ep.dispatch(x, topk_idx, topk_weights)
    out = ep.combine(y, handle)                      # y: one row per row of recv_x -> [T, H]
    recv_x, *_ = ep.dispatch(x2, handle=handle)      # cached routing: no exchange, no count sync

Contract of :meth:`Dispatcher.dispatch` (see also :mod:`comms.moe.layout`):

- ``x`` [T, H] bfloat16/float16/float32, ``topk_idx`` [T, K] integer global expert ids (-1: none,
  no expert twice in a row), ``topk_weights`` [T, K] float32. T may differ between ranks and be 0.
- Each token goes once to every rank owning one of its experts. ``recv_x`` [R, H] holds the rows
  ordered by source rank, then source token index. ``recv_topk_idx`` [R, K] (int64) holds the local
  expert index where the expert lives on this rank and -1 elsewhere; ``recv_topk_weights`` [R, K]
  the weights there and 0 elsewhere; ``tokens_per_expert`` (list, E/W) the rows per local expert.
- With ``fp8=True`` the tokens travel as float8_e4m3fn with a float32 scale per 128 channels and
  ``recv_x`` is ``(recv_x_fp8 [R, H], recv_scales [R, H/128])`` (:mod:`comms.moe.fp8`).
- One exchange of small header rows precedes the data: every rank's input errors and
  disagreements (K, hidden, dtype, fp8) are raised on every rank before a token moves
  (:mod:`comms.moe.checks`). A cached dispatch skips it and trusts the handle.

:meth:`Dispatcher.combine` sends each row of ``y`` back to its source and returns [T, H] in y's
dtype: token t's row is the sum, accumulated in float32 over its destination ranks in ascending
order, of the rows that came from it (zeros for a token with no expert). Hence
``combine(recv_x) == x * number of destination ranks`` exactly for 1-4 destinations.

Across hosts (several hosts, the same number of ranks on each) the dispatcher is hierarchical by
default (:mod:`comms.moe.hierarchical`); the low-latency mode is in :mod:`comms.moe.low_latency`.
All calls are collective: every rank of the group makes the same calls in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..communicator import Communicator
from ..errors import InvalidUsage, MismatchError
from . import checks, fp8 as fp8mod, layout as lay, low_latency
from .checks import COUNT, EXTRA, FIELDS, FLAG_FP8, Stages
from .hierarchical import Hierarchical, Topology
from .rows import BufferPool, Scratch
from .single_copy import SingleCopy
from .stats import LoadStats


def resolve_group(group: Any) -> Communicator:
    """The comms communicator behind ``group``: a Communicator, or a "comms" torch ProcessGroup
    that exposes it as ``group.comm``."""
    if isinstance(group, Communicator):
        return group
    inner = getattr(group, "comm", None)
    if isinstance(inner, Communicator):
        return inner
    raise InvalidUsage(f"comms.moe.Dispatcher: group must be a comms Communicator or a torch ProcessGroup of "
                       f"the 'comms' backend exposing its communicator as .comm; got {type(group).__name__}")


@dataclass
class DispatchHandle:
    """The routing of one dispatch, for :meth:`Dispatcher.combine` and cached dispatches. Opaque;
    valid only with the dispatcher that made it."""
    owner: int
    num_tokens: int
    num_recv: int
    k: int
    send_idx: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    tokens_per_expert: list[int]
    route: Any = field(default=None, repr=False)     # hierarchical routing, when used


class Dispatcher:
    """Dispatch/combine for ``num_experts`` experts of width ``hidden`` split evenly over the ranks
    of ``group``. Construction is collective (it checks that every rank passed the same numbers
    and learns which ranks share a host). ``hierarchical``: "auto" (when the group spans several
    hosts with the same number of ranks each), True (require that), or False.

    Memory: outputs of 4 MiB or more (recv_x, combine's result) come from a pool of huge-page
    mappings that are reused once every tensor and view of them is gone, and the staging buffers
    (packed send rows, rows coming back) are kept between calls. With the single-copy exchange
    (one host) recv_x is a view of this rank's shared-memory receive window instead, which is
    likewise reused only once every tensor and view of it is gone (:mod:`comms.moe.windows`).
    :meth:`close` releases all of them."""

    def __init__(self, group: Any, num_experts: int, hidden: int, *, hierarchical: Any = "auto"):
        self.comm = comm = resolve_group(group)
        self.rank, self.world = comm.rank, comm.size
        self.num_experts, self.hidden = int(num_experts), int(hidden)
        mine = np.array([self.num_experts, self.hidden, min(comm.local_ranks + [comm.rank])], np.int64)
        every = np.empty(3 * self.world, np.int64)
        comm.all_gather(every, mine)
        every = every.reshape(self.world, 3)
        diff = np.nonzero((every[:, :2] != every[0, :2]).any(axis=1))[0]
        if diff.size:
            s = int(diff[0])
            raise MismatchError(f"comms.moe.Dispatcher: rank 0 has num_experts={every[0, 0]}, hidden={every[0, 1]} "
                                f"but rank {s} has num_experts={every[s, 0]}, hidden={every[s, 1]}", rank=self.rank)
        if self.hidden < 1 or self.num_experts < self.world or self.num_experts % self.world:
            raise InvalidUsage(f"comms.moe.Dispatcher: need hidden >= 1 and num_experts a positive multiple of the "
                               f"{self.world} ranks; got num_experts={self.num_experts}, hidden={self.hidden}")
        self.experts_per_rank = self.num_experts // self.world
        self.topology = Topology.from_host_keys(every[:, 2].tolist())
        use = self.topology.hierarchical_ok if hierarchical == "auto" else bool(hierarchical)
        if use and not self.topology.hierarchical_ok:
            raise InvalidUsage(f"comms.moe.Dispatcher: hierarchical=True needs several hosts with the same number "
                               f"of ranks each; hosts are {self.topology.hosts}")
        self.hier = Hierarchical(comm, self.topology, self.experts_per_rank) if use else None
        self.single = SingleCopy(comm, one_host=len(self.topology.hosts) == 1)
        self.load = LoadStats(self.num_experts, self.experts_per_rank)
        self._scratch, self._pool = Scratch(), BufferPool()

    # -- normal mode -----------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None, *, handle: DispatchHandle | None = None,
                 fp8: bool = False):
        """See the module docstring. Returns (recv_x, recv_topk_idx, recv_topk_weights,
        tokens_per_expert, handle)."""
        if handle is not None:
            return self._dispatch_cached(x, topk_idx, topk_weights, handle, fp8)
        W, epr = self.world, self.experts_per_rank
        p = checks.check_dispatch(x, topk_idx, topk_weights, self.hidden, self.num_experts, fp8)
        rows = np.zeros((W, FIELDS + epr), np.int64)
        k = int(topk_idx.shape[1]) if p is None else -1
        rows[:, :FIELDS] = checks.header(p, k, self.hidden, checks.dtype_code(x) if p is None else -1,
                                         self.num_experts, FLAG_FP8 if fp8 else 0)
        layout = None
        if p is None:
            idx = topk_idx.to(torch.int64).contiguous()
            layout = lay.compute_layout(idx, self.num_experts, W)
            rows[:, COUNT] = layout.send_counts
            rows[:, FIELDS:] = layout.expert_counts.view(W, epr).numpy()
            if self.hier is not None:
                rows[:, EXTRA] = self.hier.host_counts(layout)
        got = np.empty_like(rows)
        self.comm.all_to_all(got, rows)
        checks.verdict(got, "dispatch", self.rank, self.hidden, self.num_experts)
        recv_counts = got[:, COUNT].tolist()
        tokens_per_expert = got[:, FIELDS:].sum(axis=0).tolist()
        payload, scales = self._payload(x, fp8)
        w = topk_weights.detach().contiguous()
        if self.hier is not None:
            recv, route = self.hier.dispatch(layout, got, payload, scales, idx, w)
        else:
            recv, route = self._flat_dispatch(layout, recv_counts, payload, scales, idx, w), None
        recv_payload, recv_scales, recv_idx, recv_w = recv
        local_idx, local_w = lay.localize(recv_idx, recv_w, self.rank, epr)
        handle = DispatchHandle(id(self), layout.num_tokens, sum(recv_counts), k, layout.send_idx,
                                layout.send_counts, recv_counts, local_idx, local_w, tokens_per_expert, route)
        self.load.record(layout.expert_counts, tokens_per_expert)
        return self._recv_x(recv_payload, recv_scales, fp8), local_idx, local_w, tokens_per_expert, handle

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send every row of ``y`` ([R, H], one per row of recv_x, floating) back to its source
        and sum per token; returns [T, H] in y's dtype (see the module docstring)."""
        stages = self.hier.combine_stages if self.hier is not None else Stages(self.comm)
        if not isinstance(handle, DispatchHandle) or handle.owner != id(self):
            stages.fail(InvalidUsage("combine: handle is not a DispatchHandle of this dispatcher"))
        p = checks.check_x(y, self.hidden)
        if p is None and y.shape[0] != handle.num_recv:
            p = checks.problem(checks.HANDLE, handle.num_recv, y.shape[0])
        if p is not None:
            stages.fail(InvalidUsage(f"combine: invalid input on rank {self.rank}: "
                                     f"{checks.describe(p, self.hidden, self.num_experts)}", rank=self.rank))
        y = y.contiguous()
        if self.hier is not None:
            return self.hier.combine(y, handle.route, handle.num_tokens)
        out = self._pool.empty((handle.num_tokens, self.hidden), y.dtype)
        if self.single.enabled:
            return stages.run(0, self.single.combine, y, handle.send_counts, handle.recv_counts, handle.send_idx, out)
        back = self._scratch.get("back", sum(handle.send_counts), self.hidden, y.dtype)
        stages.run(0, self.comm.all_to_all, back, y, out_splits=handle.send_counts, in_splits=handle.recv_counts)
        return lay.sum_blocks(back, handle.send_idx, handle.send_counts, handle.num_tokens, out=out)

    # -- low-latency mode (comms.moe.low_latency) --------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, max_tokens_per_rank: int,
                             *, fp8: bool = False):
        """Returns (recv_x [E/W, max_tokens_per_rank * W, H], recv_count [E/W], handle); see
        :func:`comms.moe.low_latency.dispatch`."""
        return low_latency.dispatch(self, x, topk_idx, max_tokens_per_rank, fp8)

    def low_latency_combine(self, y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle) -> torch.Tensor:
        """The weighted sum [T, H] of the experts' outputs ``y`` [E/W, max_tokens_per_rank * W, H]."""
        return low_latency.combine(self, y, topk_idx, topk_weights, handle)

    # -- statistics and teardown -------------------------------------------------------------------
    def global_load(self) -> torch.Tensor:
        """Collective: cumulative tokens routed to each of the E experts, summed over all ranks."""
        out = self.load.routed.clone()
        self.comm.all_reduce(out)
        return out

    def link_stats(self) -> dict:
        """Byte counters summed over the communicators this dispatcher uses (the group, and the
        intra- and inter-host ones of the hierarchical mode), plus ``window_tx_bytes``: rows written
        straight into the peers' receive windows by the single-copy exchange
        (:mod:`comms.moe.single_copy`)."""
        comms_ = [self.comm] + (self.hier.comms() if self.hier is not None else [])
        total: dict = {}
        for c in comms_:
            for key, v in c.stats().items():
                total[key] = total.get(key, 0) + v
        total["window_tx_bytes"] = self.single.tx_bytes
        return total

    def close(self) -> None:
        """Drop the staging buffers and the single-copy exchange's windows, and close the
        sub-communicators of the hierarchical mode (the group itself stays open). Tensors already
        returned stay valid."""
        self._scratch.clear()
        self._pool.clear()
        self.single.close()
        if self.hier is not None:
            self.hier.close()

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _payload(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What travels for ``x``: its rows, or their fp8 bytes and scales."""
        x = x.detach().contiguous()
        if not fp8:
            return x, None
        q, scales = fp8mod.quantize(x)
        return fp8mod.as_bytes(q), scales

    @staticmethod
    def _recv_x(payload: torch.Tensor, scales: torch.Tensor | None, fp8: bool):
        return (fp8mod.from_bytes(payload), scales) if fp8 else payload

    def _flat_dispatch(self, layout, recv_counts, payload, scales, idx, w):
        """Move the rows straight into ``recv_x``, and the small per-row fields (expert ids,
        weights, scales: int32 words) beside them: by single-copy writes into the peers
        (:mod:`comms.moe.single_copy`) when every rank is on this host, else with one uneven
        all_to_all for each."""
        comm, send, R = self.comm, layout.send_idx, sum(recv_counts)
        parts = []
        if idx is not None:
            parts += [idx.to(torch.int32), w.view(torch.int32)]
        if scales is not None:
            parts.append(scales.view(torch.int32))
        meta = torch.cat(parts, dim=1).index_select(0, send) if parts else None
        if self.single.enabled:
            recv_payload, recv_meta = self.single.dispatch(payload, send, layout.send_counts, recv_counts, meta)
        else:
            recv_payload = self._pool.empty((R, payload.shape[1]), payload.dtype)
            recv_meta = torch.empty(R, meta.shape[1], dtype=torch.int32) if parts else None
            packed = self._scratch.get("send", send.numel(), payload.shape[1], payload.dtype)
            torch.index_select(payload, 0, send, out=packed)
            comm.all_to_all(recv_payload, packed, out_splits=recv_counts, in_splits=layout.send_counts)
            if parts:
                comm.all_to_all(recv_meta, meta, out_splits=recv_counts, in_splits=layout.send_counts)
        if not parts:
            return recv_payload, None, None, None
        k = idx.shape[1] if idx is not None else 0
        recv_idx = recv_meta[:, :k] if idx is not None else None
        recv_w = recv_meta[:, k:2 * k].view(torch.float32).contiguous() if idx is not None else None
        recv_scales = recv_meta[:, 2 * k:].view(torch.float32).contiguous() if scales is not None else None
        return recv_payload, recv_scales, recv_idx, recv_w

    def _dispatch_cached(self, x, topk_idx, topk_weights, handle, fp8):
        stages = self.hier.dispatch_stages if self.hier is not None else Stages(self.comm)
        if not isinstance(handle, DispatchHandle) or handle.owner != id(self):
            stages.fail(InvalidUsage("dispatch: handle is not a DispatchHandle of this dispatcher"))
        p = checks.check_x(x, self.hidden)
        if p is None and x.shape[0] != handle.num_tokens:
            p = checks.problem(checks.HANDLE, handle.num_tokens, x.shape[0])
        if p is None and fp8 and self.hidden % checks.FP8_BLOCK:
            p = checks.problem(checks.FP8_HIDDEN)
        if p is None and (topk_idx is not None or topk_weights is not None):
            stages.fail(InvalidUsage("dispatch: with a cached handle pass only x (the routing is the handle's)"))
        if p is not None:
            stages.fail(InvalidUsage(f"dispatch: invalid input on rank {self.rank}: "
                                     f"{checks.describe(p, self.hidden, self.num_experts)}", rank=self.rank))
        payload, scales = self._payload(x, fp8)
        if self.hier is not None:
            (recv_payload, recv_scales, _, _), _ = self.hier.dispatch(None, None, payload, scales, None, None,
                                                                      route=handle.route)
        else:
            layout = lay.Layout(handle.num_tokens, None, handle.send_idx, handle.send_counts, None)
            recv_payload, recv_scales, _, _ = stages.run(0, self._flat_dispatch, layout, handle.recv_counts,
                                                         payload, scales, None, None)
        self.load.record(None, handle.tokens_per_expert)
        return (self._recv_x(recv_payload, recv_scales, fp8), handle.recv_topk_idx,
                handle.recv_topk_weights, handle.tokens_per_expert, handle)

