"""Packed rows: several per-token fields side by side in one uint8 row, so one message moves them.

A :class:`RowFormat` is a fixed list of named fields, each ``count`` values of a dtype, at 8-byte
aligned offsets; the row stride is a multiple of 8, so every field of a packed buffer
``[N, nbytes]`` can be viewed in place as a strided ``[N, count]`` tensor of its dtype. Used by the
low-latency and the hierarchical modes (the flat normal mode moves ``x`` unpacked, straight into
``recv_x``). Nothing here communicates.
"""
from __future__ import annotations

import torch


def _align(n: int, a: int = 8) -> int:
    return (n + a - 1) // a * a


class RowFormat:
    """Fields ``(name, dtype, count)`` in order; ``min_bytes`` pads short rows (block headers)."""

    def __init__(self, fields: list[tuple[str, torch.dtype, int]], min_bytes: int = 0):
        self.fields: dict[str, tuple[int, torch.dtype, int]] = {}
        off = 0
        for name, dtype, count in fields:
            self.fields[name] = (off, dtype, count)
            off = _align(off + count * dtype.itemsize)
        self.nbytes = max(_align(off), _align(min_bytes))

    def empty(self, *lead: int) -> torch.Tensor:
        """An uninitialised packed buffer ``[*lead, nbytes]`` (uint8)."""
        return torch.empty(*lead, self.nbytes, dtype=torch.uint8)

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """Field ``name`` of every row of ``buf`` ``[..., nbytes]``, in place: ``[..., count]``."""
        off, dtype, count = self.fields[name]
        return buf[..., off:off + count * dtype.itemsize].view(dtype)

    def has(self, name: str) -> bool:
        return name in self.fields

    def pack(self, buf: torch.Tensor, name: str, src: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Row i of ``buf`` gets ``src[index[i]]`` (or ``src[i]``) in field ``name``; ``src`` is
        ``[T, count]`` of the field's dtype (or its bytes), contiguous."""
        off, dtype, count = self.fields[name]
        nb = count * dtype.itemsize
        dst = buf[:, off:off + nb]
        raw = src.contiguous()
        if raw.numel() == 0:                     # (empty tensors may carry strides view() rejects)
            return
        raw = (raw.view(torch.uint8) if raw.dtype != torch.uint8 else raw).reshape(raw.shape[0], nb)
        if index is None:
            dst.copy_(raw)
        else:
            torch.index_select(raw, 0, index, out=dst)

    def take(self, buf: torch.Tensor, name: str, index: torch.Tensor | None = None) -> torch.Tensor:
        """Field ``name`` of rows ``index`` (all rows if None) as a new contiguous tensor."""
        v = self.view(buf, name)
        return v.contiguous() if index is None else v.index_select(0, index)
