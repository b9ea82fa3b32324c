"""FP8 (e4m3fn) tokens with one float32 scale per 128 channels, as DeepEP sends them.

Contract: for ``x`` of shape [N, H] (H a multiple of 128), :func:`quantize` returns ``q``
(``torch.float8_e4m3fn``, [N, H]) and ``scales`` (float32, [N, H / 128]) with
``x ~= q.float() * scales`` block by block: each block of 128 channels is divided by
``max(amax, 1e-4) / 448`` (448 being the largest finite e4m3fn value) and rounded to nearest, so
the error of every element is at most ``amax_block / 16`` (3 mantissa bits) for normal values.
comms moves float8 as its bytes (``q.view(torch.uint8)``); nothing here communicates.
"""
from __future__ import annotations

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of ``x`` [N, H]; see the module docstring."""
    n, h = x.shape
    blocks = x.float().view(n, h // BLOCK, BLOCK)
    scales = blocks.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (blocks / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n, h)
    return q, scales.contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q`` [..., H] (float8, or its uint8 bytes) times ``scales`` [..., H / 128], as ``dtype``."""
    if q.dtype == torch.uint8:
        q = q.view(FP8)
    shape = q.shape
    blocks = q.float().reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK) * scales.unsqueeze(-1)
    return blocks.reshape(shape).to(dtype)


def as_bytes(q: torch.Tensor) -> torch.Tensor:
    """The uint8 view comms can move."""
    return q.view(torch.uint8)


def from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.view(FP8)
