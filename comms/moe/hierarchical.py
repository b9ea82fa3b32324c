"""Hierarchical dispatch across hosts: a token crosses the inter-host link once per remote host.

Topology: ranks sharing a host identity (``comm.local_ranks``, ``COMMS_HOST_ID``) form a host;
hosts are ordered by their lowest rank and ranks within a host ascending, giving every rank a host
index and a local index. With ``L`` ranks on every host, the ranks with the same local index on
all hosts form a *rail*. Two sub-communicators carry the data: ``inter`` (one rail: the same local
index on every host, ranked by host) and ``intra`` (one host, ranked by local index).

Dispatch, after the usual header exchange on the whole group:

1. *Inter-host* (``inter``): each rank sends each token once to its rail peer on every host that
   owns one of the token's experts (its own host included: a local copy). A row carries the
   payload, the expert ids and the weights.
2. *Intra-host* (``intra``): each rank forwards every row it holds to the ranks of its host that
   own one of the row's experts, over shared memory.
3. Each rank reorders what it received into the canonical order (source rank, then source token),
   so ``recv_x`` and friends are exactly those of the flat dispatch.

Every count is known from the header exchange (each source told each rank how many of its tokens
it will get, and each rail peer how many are bound for its host), so nothing else is exchanged.
Combine runs the stages backwards: each rank returns its rows to the forwarding rank, which sums
them per token (float32, local ranks ascending) and sends one partial sum per token and host over
the inter-host link; the source adds the partials (float32, hosts ascending). Partial sums travel
in y's dtype, so with bf16 a token may round once per host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import COUNT, EXTRA, Stages
from .layout import Layout, owner_of, sum_blocks
from .rows import RowFormat


@dataclass(frozen=True)
class Topology:
    """``hosts[h]``: the ranks of host h, ascending; hosts ordered by their lowest rank."""
    hosts: list[list[int]]
    host_of: list[int]
    local_of: list[int]

    @classmethod
    def from_host_keys(cls, keys: list[int]) -> "Topology":
        """``keys[r]``: any value equal for exactly the ranks on r's host (e.g. its lowest rank)."""
        groups: dict[int, list[int]] = {}
        for r, key in enumerate(keys):
            groups.setdefault(key, []).append(r)
        hosts = sorted(groups.values(), key=lambda g: g[0])
        host_of, local_of = [0] * len(keys), [0] * len(keys)
        for h, ranks in enumerate(hosts):
            for i, r in enumerate(ranks):
                host_of[r], local_of[r] = h, i
        return cls(hosts, host_of, local_of)

    @property
    def uniform(self) -> bool:
        return len({len(h) for h in self.hosts}) == 1

    @property
    def hierarchical_ok(self) -> bool:
        """Several hosts, the same number (more than one) of ranks on each."""
        return len(self.hosts) > 1 and self.uniform and len(self.hosts[0]) > 1


@dataclass
class Route:
    """One dispatch's routing through the two stages (kept in the handle for combine and reuse).
    ``sel1``/``counts1``: this rank's tokens sent to each host (host-major); ``held_counts``: rows
    this rank holds from each host's rail peer; ``sel2``/``counts2``: held rows forwarded to each
    local rank; ``recv2_counts``: rows received from each local forwarder; ``perm``: canonical row
    c of recv_x is row ``perm[c]`` of what stage 2 delivered."""
    sel1: torch.Tensor
    counts1: list[int]
    held_counts: list[int]
    sel2: torch.Tensor
    counts2: list[int]
    recv2_counts: list[int]
    perm: torch.Tensor


class Hierarchical:
    """The two sub-communicators and the stage logic. Construction is collective (two splits)."""

    def __init__(self, comm, topo: Topology, experts_per_rank: int):
        self.topo, self.epr = topo, experts_per_rank
        self.world = comm.size
        self.host, self.local = topo.host_of[comm.rank], topo.local_of[comm.rank]
        self.nhosts, self.L = len(topo.hosts), len(topo.hosts[0])
        self.intra = comm.split(self.host, self.local)
        self.inter = comm.split(self.local, self.host)
        self.dispatch_stages = Stages(self.inter, self.intra)
        self.combine_stages = Stages(self.intra, self.inter)
        self._by_host = torch.tensor([r for h in topo.hosts for r in h], dtype=torch.int64)
        lut = torch.full((self.world + 1,), self.L, dtype=torch.int64)      # rank -> local index here
        for i, r in enumerate(topo.hosts[self.host]):
            lut[r] = i
        self._local_lut = lut

    def comms(self) -> list:
        return [self.intra, self.inter]

    def close(self) -> None:
        self.intra.close()
        self.inter.close()

    def _host_mask(self, layout: Layout) -> torch.Tensor:
        """[T, hosts]: token t has an expert on host h."""
        return layout.dest[:, self._by_host].view(layout.num_tokens, self.nhosts, self.L).any(dim=-1)

    def host_counts(self, layout: Layout) -> list[int]:
        """For each rank p: how many of this rank's tokens are bound for p's host (header EXTRA)."""
        per_host = self._host_mask(layout).sum(dim=0).tolist()
        return [per_host[self.topo.host_of[p]] for p in range(self.world)]

    def _route_counts(self, layout: Layout, got: np.ndarray) -> tuple:
        pairs = self._host_mask(layout).t().nonzero()
        sel1 = pairs[:, 1].contiguous()
        counts1 = torch.bincount(pairs[:, 0], minlength=self.nhosts).tolist() if pairs.numel() \
            else [0] * self.nhosts
        hosts = self.topo.hosts
        held_counts = [int(got[hosts[h][self.local], EXTRA]) for h in range(self.nhosts)]
        blocks, off = [], 0
        recv2_counts = []
        for f in range(self.L):
            start = off
            for h in range(self.nhosts):
                s = hosts[h][f]
                n = int(got[s, COUNT])
                blocks.append((s, off, n))
                off += n
            recv2_counts.append(off - start)
        blocks.sort()
        perm = torch.cat([torch.arange(o, o + n, dtype=torch.int64) for _, o, n in blocks])
        return sel1, counts1, held_counts, recv2_counts, perm

    def _forward_plan(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Held rows (their global expert ids) -> (rows forwarded to each local rank, counts)."""
        n = ids.shape[0]
        dest = torch.zeros(n, self.L + 1, dtype=torch.bool)
        if ids.numel():
            dest.scatter_(1, self._local_lut[owner_of(ids.to(torch.int64), self.epr, self.world)], True)
        pairs = dest[:, :self.L].t().nonzero()
        counts = torch.bincount(pairs[:, 0], minlength=self.L).tolist() if pairs.numel() else [0] * self.L
        return pairs[:, 1].contiguous(), counts

    def dispatch(self, layout, got, payload, scales, idx, w, route: Route | None = None):
        """Stages 1-3 for ``payload`` [T, P] (+ fp8 ``scales``, and ``idx``/``w`` unless cached).
        Returns ((recv_payload, recv_scales, recv_idx, recv_w), route)."""
        stages = self.dispatch_stages
        fields = []
        if idx is not None:
            fields += [("idx", torch.int32, idx.shape[1]), ("w", torch.float32, idx.shape[1])]
        if scales is not None:
            fields.append(("scales", torch.float32, scales.shape[1]))
        fields.append(("x", payload.dtype, payload.shape[1]))
        fmt = RowFormat(fields)
        if route is None:
            sel1, counts1, held_counts, recv2_counts, perm = self._route_counts(layout, got)
        else:
            sel1, counts1, held_counts, recv2_counts, perm = (route.sel1, route.counts1, route.held_counts,
                                                              route.recv2_counts, route.perm)
        send1 = fmt.empty(sel1.numel())
        fmt.pack(send1, "x", payload, sel1)
        if scales is not None:
            fmt.pack(send1, "scales", scales, sel1)
        if idx is not None:
            fmt.pack(send1, "idx", idx.to(torch.int32), sel1)
            fmt.pack(send1, "w", w, sel1)
        held = fmt.empty(sum(held_counts))
        stages.run(0, self.inter.all_to_all, held, send1, out_splits=held_counts, in_splits=counts1)
        if route is None:
            sel2, counts2 = self._forward_plan(fmt.view(held, "idx"))
            route = Route(sel1, counts1, held_counts, sel2, counts2, recv2_counts, perm)
        recv2 = fmt.empty(sum(route.recv2_counts))
        stages.run(1, self.intra.all_to_all, recv2, held.index_select(0, route.sel2),
                   out_splits=route.recv2_counts, in_splits=route.counts2)
        fields = [fmt.take(recv2, name, route.perm) if fmt.has(name) else None for name in ("x", "scales", "idx", "w")]
        return tuple(fields), route

    def combine(self, y: torch.Tensor, route: Route, num_tokens: int) -> torch.Tensor:
        """The stages backwards, with the per-host partial sums (see the module docstring)."""
        stages = self.combine_stages
        z = torch.empty_like(y)
        z.index_copy_(0, route.perm, y)
        back2 = torch.empty(sum(route.counts2), y.shape[1], dtype=y.dtype)
        stages.run(0, self.intra.all_to_all, back2, z, out_splits=route.counts2, in_splits=route.recv2_counts)
        partial = sum_blocks(back2, route.sel2, route.counts2, sum(route.held_counts))
        back1 = torch.empty(sum(route.counts1), y.shape[1], dtype=y.dtype)
        stages.run(1, self.inter.all_to_all, back1, partial, out_splits=route.counts1, in_splits=route.held_counts)
        return sum_blocks(back1, route.sel1, route.counts1, num_tokens)

