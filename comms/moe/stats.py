"""Load statistics for expert load balancing: cumulative token counts, per expert.

``LoadStats.routed`` [E] counts the tokens this rank routed to each expert (by fresh dispatches;
a cached dispatch repeats a routing, so it is counted in ``received`` only). ``received`` [E/W]
counts the rows this rank received for each of its experts, over every dispatch (normal, cached
and low-latency). ``dispatches`` counts calls. :meth:`Dispatcher.global_load` sums ``routed`` over
the ranks, which gives the load of every expert in the whole group.
"""
from __future__ import annotations

import torch


class LoadStats:
    def __init__(self, num_experts: int, experts_per_rank: int):
        self.routed = torch.zeros(num_experts, dtype=torch.int64)
        self.received = torch.zeros(experts_per_rank, dtype=torch.int64)
        self.dispatches = 0

    def record(self, routed: torch.Tensor | None, received) -> None:
        if routed is not None:
            self.routed += routed
        self.received += torch.as_tensor(received, dtype=torch.int64)
        self.dispatches += 1

    def reset(self) -> None:
        self.routed.zero_()
        self.received.zero_()
        self.dispatches = 0

    def __repr__(self) -> str:
        return f"LoadStats(dispatches={self.dispatches}, received={self.received.tolist()})"
