"""The benchmark's MoE op: expert-parallel dispatch then combine, timed as one round trip
(``python -m bench --ops moe``), with its routings and exact check data. See :class:`MoE`.
"""
from __future__ import annotations

from .ops import MOE, Buffers, Layout, Op, pattern, torch

ROUTING_SEED = 1234         # moe --moe-routing random: rank r's generator is seeded ROUTING_SEED + r


def random_routing(tokens: int, experts: int, topk: int, rank: int, seed: int = ROUTING_SEED
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-K routing of rank ``rank``'s ``tokens`` tokens (examples/moe_bench.py's): a
    generator seeded ``seed + rank`` draws uniform scores [tokens, experts]; each token selects its
    ``topk`` highest-scoring experts (distinct), weighted by those scores. Returns (topk_idx int64,
    topk_weights float32), both [tokens, topk]."""
    g = torch.Generator().manual_seed(seed + rank)
    scores = torch.rand(tokens, experts, generator=g)
    w, idx = scores.topk(topk, dim=-1)
    return idx, w.float()


class MoE(Op):
    """Expert-parallel dispatch then combine, timed as one round trip: comms'
    :class:`comms.moe.Dispatcher`, or on gloo the usual CPU way (:mod:`bench.moe_gloo`). Each rank
    has ``T`` tokens of ``hidden`` elements; ``size`` is the bytes of one rank's tokens
    (``T x hidden x element size``; sizes below one token are dropped), so algbw = size / time is
    the token GB/s of the round trip: the bytes of the tokens a rank dispatches per second.

    Routing (``routing``): ``"consecutive"`` (the default): token ``t`` of rank ``r`` selects the
    ``topk`` consecutive experts from ``(5 t + 3 r) mod E`` (distinct, weight 1/topk);
    ``"random"``: :func:`random_routing` (uniform scores, top-K, weights = the scores, a generator
    per rank). Both are deterministic, so the check is exact: ``recv_x`` must hold every source's
    rows for this rank (by source rank, then token) and ``combine(recv_x)`` must equal ``x`` times
    the number of ranks each token went to. busbw counts the bytes a rank sends to other ranks in
    both phases (averaged over ranks) per second, as all_to_all's busbw does."""
    name, redop = MOE, "none"
    FLOAT = ("float32", "float16", "bfloat16")
    ROUTINGS = ("consecutive", "random")

    def __init__(self, experts: int = 0, topk: int = 4, hidden: int = 1024, routing: str = "consecutive"):
        if routing not in self.ROUTINGS:
            raise ValueError(f"unknown moe routing {routing!r}; choose from {', '.join(self.ROUTINGS)}")
        self.experts, self.topk, self.hidden, self.routing = experts, topk, hidden, routing

    def num_experts(self, nranks: int) -> int:
        return self.experts or 4 * nranks

    def layout(self, nbytes, nranks, es):
        tokens = nbytes // es // self.hidden
        if tokens == 0:
            return None
        count = tokens * self.hidden
        return Layout(count * es, count, count, count, tokens)

    def routing_of(self, tokens: int, rank: int, nranks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_idx int64, topk_weights float32), both [tokens, topk]: what rank ``rank`` passes
        to dispatch, on every backend."""
        e = self.num_experts(nranks)
        if self.routing == "random":
            return random_routing(tokens, e, self.topk, rank)
        start = (5 * torch.arange(tokens, dtype=torch.int64) + 3 * rank) % e
        idx = (start[:, None] + torch.arange(self.topk, dtype=torch.int64)[None, :]) % e
        return idx, torch.full((tokens, self.topk), 1.0 / self.topk, dtype=torch.float32)

    def topk_idx(self, tokens: int, rank: int, nranks: int) -> torch.Tensor:
        return self.routing_of(tokens, rank, nranks)[0]

    def destinations(self, tokens: int, rank: int, nranks: int) -> torch.Tensor:
        """[tokens, nranks] bool: token t of ``rank`` goes to rank p."""
        epr = self.num_experts(nranks) // nranks
        owner = self.topk_idx(tokens, rank, nranks) // epr
        dest = torch.zeros(tokens, nranks, dtype=torch.bool)
        dest.scatter_(1, owner, True)
        return dest

    def dispatched_rows(self, lay: Layout, nranks: int) -> list[int]:
        """Per rank, the token rows it dispatches (one per token and destination rank, its own
        included): DeepEP counts these rows' bytes (it counts the rows a rank receives, which
        over all ranks is the same total)."""
        return [int(self.destinations(lay.block, r, nranks).sum()) for r in range(nranks)]

    def bus_factor(self, nranks):
        return 2.0 * (nranks - 1) / nranks        # a nominal figure; see bus_factor_for

    def bus_factor_for(self, lay: Layout, nranks: int) -> float:
        off = 0
        for r in range(nranks):
            d = self.destinations(lay.block, r, nranks)
            off += int(d.sum()) - int(d[:, r].sum())
        return 2.0 * off / (nranks * lay.block)

    def msg_bytes(self, lay, nranks, es):
        return lay.nbytes

    def buffers(self, lay, rank, nranks, root, place):
        return Buffers(lay.count, 0)

    def check_input(self, lay, rank, nranks, root, dtype):
        return pattern(lay.count, rank, nranks, dtype)

    def expected(self, lay, rank, nranks, root, dtype):
        ndest = self.destinations(lay.block, rank, nranks).sum(1, keepdim=True)
        x = self.check_input(lay, rank, nranks, root, dtype).view(lay.block, self.hidden)
        return (x.to(torch.float64) * ndest).to(x.dtype).view(-1)

    def expected_recv(self, lay, rank, nranks, dtype) -> torch.Tensor:
        rows = []
        for s in range(nranks):
            xs = pattern(lay.count, s, nranks, dtype).view(lay.block, self.hidden)
            rows.append(xs[self.destinations(lay.block, s, nranks)[:, rank]])
        return torch.cat(rows)
