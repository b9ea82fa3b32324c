"""MoE dispatch and combine the usual CPU way: ``torch.distributed.all_to_all_single`` on Gloo.

This is the baseline comms.moe is compared with (issue #5), shared by the bench's gloo backend
(``python -m bench --ops moe --backends comms,gloo``) and ``examples/moe_bench.py``:

* dispatch: the routing is computed with :func:`comms.moe.layout.compute_layout` -- the same
  routing math as ``comms.moe.Dispatcher`` (each token goes once to every rank owning one of its
  experts, rows in send order: by destination rank, then token), so both produce the same
  ``recv_x``; the per-destination counts are exchanged with one ``all_to_all_single``; then one
  ``all_to_all_single`` with uneven splits carries ``x[send_idx]`` and another one the routing
  metadata (``topk_idx`` as int32 and ``topk_weights`` bit-cast to int32, one [rows, 2K] tensor);
* combine: the rows go back with ``all_to_all_single`` (splits swapped) and are summed per token
  with one ``index_add_`` in float32, returned in the rows' dtype: ``combine(recv_x)`` is ``x``
  times the number of ranks each token went to, exactly as comms' combine for small integers.

Every call allocates its outputs, as comms.moe's dispatch and combine do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Route:
    """What combine needs from dispatch: the source's ``send_idx`` (token indices in send order),
    rows sent to / received from each rank, and the number of tokens."""
    send_idx: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


def dispatch(dist, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Route]:
    """Send each row of ``x`` [T, H] once to every rank owning one of its experts; returns
    (recv_x [R, H], recv_topk_idx [R, K] int32 global ids, recv_topk_weights [R, K] float32, route).
    ``dist`` is ``torch.distributed`` (initialised with Gloo); collective over ``group``."""
    from comms.moe.layout import compute_layout
    world = dist.get_world_size(group)
    lay = compute_layout(topk_idx, num_experts, world)
    send_counts = torch.tensor(lay.send_counts, dtype=torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    rc, sc = recv_counts.tolist(), lay.send_counts
    recv_x = torch.empty(sum(rc), x.shape[1], dtype=x.dtype)
    dist.all_to_all_single(recv_x, x[lay.send_idx], rc, sc, group=group)
    k = topk_idx.shape[1]
    meta = torch.cat([topk_idx.to(torch.int32), topk_weights.to(torch.float32).view(torch.int32)], dim=1)
    recv_meta = torch.empty(sum(rc), 2 * k, dtype=torch.int32)
    dist.all_to_all_single(recv_meta, meta[lay.send_idx], rc, sc, group=group)
    route = Route(lay.send_idx, sc, rc, x.shape[0])
    return recv_x, recv_meta[:, :k], recv_meta[:, k:].view(torch.float32), route


def combine(dist, y: torch.Tensor, route: Route, group=None) -> torch.Tensor:
    """Send every row of ``y`` (one per row of recv_x) back to its source and sum per token in
    float32; returns [T, H] in y's dtype (zeros for a token without experts)."""
    back = torch.empty(sum(route.send_counts), y.shape[1], dtype=y.dtype)
    dist.all_to_all_single(back, y.contiguous(), route.send_counts, route.recv_counts, group=group)
    out = torch.zeros(route.num_tokens, y.shape[1], dtype=torch.float32)
    return out.index_add_(0, route.send_idx, back.float()).to(y.dtype)


def round_trip(dist, x, topk_idx, topk_weights, num_experts: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(recv_x, combine(recv_x)): one dispatch of ``x`` and the combine of what arrived."""
    recv_x, _, _, route = dispatch(dist, x, topk_idx, topk_weights, num_experts, group)
    return recv_x, combine(dist, recv_x, route, group)
