"""Routing math for expert-parallel dispatch: pure functions of ``topk_idx``, no communication.

Vocabulary (shared by every module of :mod:`comms.moe`):

- ``E`` experts are split evenly over ``W`` ranks: rank ``r`` owns the ``epr = E // W`` experts
  ``[r * epr, (r + 1) * epr)`` (:func:`owner_of`).
- A token's *destinations* are the distinct ranks owning at least one of its selected experts
  (``topk_idx`` entries of -1 select nothing). A token is sent once to each destination.
- The *send order* lists, for each destination rank ascending, the indices of the tokens bound
  there, ascending. Receivers therefore see rows grouped by source rank and ordered by source token
  index within each group: that is the deterministic ``recv_x`` order.

:func:`check_topk` finds the first invalid entry (out of range, or an expert selected twice by one
token) so the caller can report it on every rank; :func:`compute_layout` assumes valid input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NO_EXPERT = -1


def owner_of(expert_ids: torch.Tensor, epr: int, world: int) -> torch.Tensor:
    """The rank owning each expert id; ``world`` (one past the last rank) where the id is -1."""
    return torch.where(expert_ids >= 0, torch.div(expert_ids, epr, rounding_mode="floor"),
                       torch.full_like(expert_ids, world))


def check_topk(topk_idx: torch.Tensor, num_experts: int) -> tuple[str, tuple[int, ...]] | None:
    """None if every entry is -1 or in ``[0, num_experts)`` and no token selects an expert twice;
    else ``("range", (token, k, value))`` or ``("duplicate", (token, expert))`` for the first
    offending entry in row-major order."""
    if topk_idx.numel() == 0:
        return None
    bad = (topk_idx < NO_EXPERT) | (topk_idx >= num_experts)
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        return "range", (t, k, int(topk_idx[t, k]))
    if topk_idx.shape[1] > 1:
        srt = topk_idx.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            t, k = (int(v) for v in dup.nonzero()[0])
            return "duplicate", (t, int(srt[t, k]))
    return None


@dataclass(frozen=True)
class Layout:
    """Where this rank's tokens go. ``dest[t, p]``: token t goes to rank p. ``send_idx``: token
    indices in send order (int64); ``send_counts[p]``: how many go to rank p. ``expert_counts[e]``:
    how many of this rank's tokens selected expert e (int64, length E)."""
    num_tokens: int
    dest: torch.Tensor
    send_idx: torch.Tensor
    send_counts: list[int]
    expert_counts: torch.Tensor


def compute_layout(topk_idx: torch.Tensor, num_experts: int, world: int) -> Layout:
    """The layout of valid ``topk_idx`` ([T, K] integers) for ``num_experts`` over ``world`` ranks."""
    epr = num_experts // world
    T = topk_idx.shape[0]
    idx = topk_idx.to(torch.int64)
    dest = torch.zeros(T, world + 1, dtype=torch.bool)
    if idx.numel():
        dest.scatter_(1, owner_of(idx, epr, world), True)
    dest = dest[:, :world]
    pairs = dest.t().nonzero()                       # (rank, token), rank-major: the send order
    send_idx = pairs[:, 1].contiguous()
    send_counts = torch.bincount(pairs[:, 0], minlength=world).tolist() if pairs.numel() else [0] * world
    sel = idx[idx >= 0]
    expert_counts = torch.bincount(sel, minlength=num_experts) if sel.numel() else \
        torch.zeros(num_experts, dtype=torch.int64)
    return Layout(T, dest, send_idx, send_counts, expert_counts)


def localize(recv_idx: torch.Tensor, recv_weights: torch.Tensor | None, rank: int, epr: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global expert ids (and weights) of received rows -> the local expert index on ``rank``
    where the expert lives here, -1 elsewhere (weights: kept here, 0 elsewhere)."""
    local = recv_idx.to(torch.int64) - rank * epr
    here = (recv_idx >= 0) & (local >= 0) & (local < epr)
    out_idx = torch.where(here, local, torch.full_like(local, NO_EXPERT))
    out_w = None
    if recv_weights is not None:
        out_w = torch.where(here, recv_weights, torch.zeros_like(recv_weights))
    return out_idx, out_w


def tokens_per_local_expert(local_idx: torch.Tensor, epr: int) -> list[int]:
    """How many rows select each local expert (rows hold each expert at most once)."""
    sel = local_idx[local_idx >= 0]
    if not sel.numel():
        return [0] * epr
    return torch.bincount(sel, minlength=epr).tolist()


def offsets(counts: list[int]) -> list[int]:
    """Exclusive prefix sums: where each block starts."""
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


def sum_blocks(rows: torch.Tensor, index: torch.Tensor, counts: list[int], num_tokens: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[index[i]] += rows[i]`` in increasing i (block by block), accumulated in float32 from
    zero and returned in rows' dtype ([num_tokens, H], zeros for tokens without rows): the fixed
    summation order of combine. Runs natively (:func:`comms.moe.native.sum_rows`);
    :func:`sum_blocks_reference` is its torch twin, bit for bit."""
    from .native import row_pointers, sum_rows
    if out is None:
        out = torch.empty(num_tokens, rows.shape[1], dtype=rows.dtype)
    rows = rows.contiguous()
    return sum_rows(out, row_pointers(rows, 0, index.numel()), index.to(torch.int64))


def sum_blocks_reference(rows: torch.Tensor, index: torch.Tensor, counts: list[int], num_tokens: int,
                         chunk_bytes: int = 1 << 20, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`sum_blocks`: ``out[index[i]] += rows[i]`` block by block in order,
    accumulated in float32 and returned in rows' dtype: the fixed summation order of combine. Within a block ``index`` is strictly
    ascending (the send order), so the rows of a range of tokens are a contiguous run of each
    block; tokens are processed ``chunk_bytes`` of float32 accumulator at a time, which keeps the
    accumulator and the converted rows in cache instead of streaming [T, H] float32 temporaries.
    ``out`` ([num_tokens, H] of rows' dtype) receives the result if given."""
    hidden = rows.shape[1]
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=rows.dtype)
    if not num_tokens:
        return out
    step = max(1, chunk_bytes // (4 * max(hidden, 1)))
    edges = torch.arange(0, num_tokens + step, step).clamp_(max=num_tokens)
    starts, bounds, off = [], [], 0
    for c in counts:                    # where each chunk of tokens starts in each block
        starts.append(off)
        bounds.append(torch.searchsorted(index[off:off + c], edges).tolist() if c else [0] * len(edges))
        off += c
    acc = torch.empty(min(step, num_tokens), hidden, dtype=torch.float32)
    for i in range(len(edges) - 1):
        lo, hi = int(edges[i]), int(edges[i + 1])
        if lo == hi:
            break
        a = acc[:hi - lo].zero_()
        for b, base in enumerate(starts):
            r0, r1 = base + bounds[b][i], base + bounds[b][i + 1]
            if r1 > r0:
                a.index_add_(0, index[r0:r1] - lo, rows[r0:r1].float())
        out[lo:hi] = a
    return out
