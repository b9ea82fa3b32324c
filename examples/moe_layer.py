"""A Mixtral-style MoE feed-forward block with its experts split across ranks, on comms.moe.

    python -m comms.run -n 4 examples/moe_layer.py [--tokens 64 --hidden 128 --ffn 256 --experts 8 --topk 2]
    torchrun --nproc-per-node 4 examples/moe_layer.py

Shapes on each rank (T tokens of width H, E experts, K of them per token, W ranks, F the FFN width):

    x [T, H] -> router logits [T, E] -> softmax, top-K, renormalised: topk_idx [T, K] int64, topk_weights [T, K] fp32
    dispatch:  recv_x [R, H], recv_topk_idx [R, K] (local expert or -1), recv_topk_weights [R, K]
    experts:   rank r holds experts [r*E/W, (r+1)*E/W), each SwiGLU: w2 @ (silu(w1 @ x) * (w3 @ x)),
               w1, w3 [F, H], w2 [H, F]; y[r] = sum over local k of weight * expert(recv_x[r])   [R, H]
    combine:   out [T, H] = sum of the y rows of each token over its ranks
    low-latency mode: recv_x [E/W, cap*W, H] per local expert, recv_count [E/W]; y of the same shape;
               low_latency_combine applies the weights and returns [T, H]

Every rank builds all E experts from the same seed (to compute the single-process reference for
its own tokens) but uses only its own. The output must match the reference: allclose in fp32, and
within bf16 tolerance in bf16; an fp8 dispatch is checked against a looser bound.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import comms
import comms.moe


class Experts:
    """E SwiGLU experts of width ``ffn`` (all of them: every rank can compute the reference)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = (torch.randn(num_experts, ffn, hidden, generator=g) / hidden ** 0.5).to(dtype)
        self.w3 = (torch.randn(num_experts, ffn, hidden, generator=g) / hidden ** 0.5).to(dtype)
        self.w2 = (torch.randn(num_experts, hidden, ffn, generator=g) / ffn ** 0.5).to(dtype)
        self.router = (torch.randn(num_experts, hidden, generator=g) / hidden ** 0.5).to(dtype)

    def ffn(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e].t()) * (x @ self.w3[e].t())) @ self.w2[e].t()

    def route(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtral routing: softmax over all experts in fp32, top-k, renormalised."""
        probs = torch.softmax((x @ self.router.t()).float(), dim=-1)
        w, idx = probs.topk(k, dim=-1)
        return idx, w / w.sum(dim=-1, keepdim=True)


def reference(experts: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The whole layer in one process: out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(experts.w1.shape[0]):
        t, k = (idx == e).nonzero(as_tuple=True)
        if t.numel():
            out.index_add_(0, t, experts.ffn(e, x[t]).float() * w[t, k].unsqueeze(1))
    return out.to(x.dtype)


def moe_normal(ep: comms.moe.Dispatcher, experts: Experts, x, idx, w, fp8: bool = False) -> torch.Tensor:
    recv_x, recv_idx, recv_w, _, handle = ep.dispatch(x, idx, w, fp8=fp8)
    if fp8:
        recv_x = comms.moe.dequantize(*recv_x, dtype=x.dtype)
    first = ep.rank * ep.experts_per_rank
    y = torch.zeros(recv_x.shape, dtype=torch.float32)
    for e in range(ep.experts_per_rank):
        r, k = (recv_idx == e).nonzero(as_tuple=True)
        if r.numel():
            y.index_add_(0, r, experts.ffn(first + e, recv_x[r]).float() * recv_w[r, k].unsqueeze(1))
    return ep.combine(y.to(x.dtype), handle)


def moe_low_latency(ep: comms.moe.Dispatcher, experts: Experts, x, idx, w, cap: int) -> torch.Tensor:
    recv_x, recv_count, handle = ep.low_latency_dispatch(x, idx, cap)
    first = ep.rank * ep.experts_per_rank
    y = torch.zeros_like(recv_x)
    for e in range(ep.experts_per_rank):
        n = int(recv_count[e])
        y[e, :n] = experts.ffn(first + e, recv_x[e, :n])
    return ep.low_latency_combine(y, idx, w, handle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    args = ap.parse_args(argv)
    comm = comms.init()
    ep = comms.moe.Dispatcher(comm, num_experts=args.experts, hidden=args.hidden)
    failed = False
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        experts = Experts(args.experts, args.hidden, args.ffn, dtype)
        x = torch.randn(args.tokens + comm.rank, args.hidden, generator=torch.Generator().manual_seed(100 + comm.rank))
        x = x.to(dtype)
        idx, w = experts.route(x, args.topk)
        want = reference(experts, x, idx, w).float()
        runs = {"normal": lambda: moe_normal(ep, experts, x, idx, w),
                "low-latency": lambda: moe_low_latency(ep, experts, x, idx, w, cap=args.tokens + comm.size)}
        if dtype == torch.bfloat16 and args.hidden % 128 == 0:
            runs["fp8 normal"] = lambda: moe_normal(ep, experts, x, idx, w, fp8=True)
        for mode, run in runs.items():
            got = run().float()
            scale = want.abs().max().item() or 1.0
            err = (got - want).abs().max().item() / scale
            ok = err <= (0.1 if "fp8" in mode else tol) and got.shape == want.shape
            ok = ok and (dtype != torch.float32 or torch.allclose(got, want, rtol=1e-5, atol=1e-6))
            name = str(dtype).replace("torch.float32", "fp32").replace("torch.bfloat16", "bf16")
            print(f"{name} {mode}: {'OK' if ok else 'MISMATCH'} (max error {err:.2e} of max |out| {scale:.3g}, "
                  f"{x.shape[0]} tokens)", flush=True)
            failed |= not ok
    received = ep.load.received.tolist()
    print(f"load: tokens received per local expert {received}, over all ranks {ep.global_load().tolist()}")
    comm.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
