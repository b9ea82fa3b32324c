"""Expert-parallel MoE dispatch and combine with DeepEP semantics, on host memory.

    import comms, comms.moe
    ep = comms.moe.Dispatcher(comm, num_experts=E, hidden=H)
    recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = ep.dispatch(x, topk_idx, topk_weights)
    out = ep.combine(expert_outputs, handle)

Modules: :mod:`.dispatcher` (the API and the flat normal mode), :mod:`.layout` (routing math,
pure), :mod:`.checks` (input checks every rank agrees on), :mod:`.low_latency` (fixed-capacity
decode mode), :mod:`.hierarchical` (two-stage routing across hosts), :mod:`.fp8` (e4m3 with a
scale per 128 channels), :mod:`.rows` (packed rows), :mod:`.stats` (load statistics).
"""
from __future__ import annotations

from .dispatcher import DispatchHandle, Dispatcher, resolve_group
from .fp8 import dequantize, quantize
from .low_latency import LowLatencyHandle
from .stats import LoadStats

__all__ = ["Dispatcher", "DispatchHandle", "LowLatencyHandle", "LoadStats", "quantize", "dequantize",
           "resolve_group"]
