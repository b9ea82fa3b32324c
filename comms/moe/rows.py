"""Packed rows: several per-token fields side by side in one uint8 row, so one message moves them.

A :class:`RowFormat` is a fixed list of named fields, each ``count`` values of a dtype, at 8-byte
aligned offsets; the row stride is a multiple of 8, so every field of a packed buffer
``[N, nbytes]`` can be viewed in place as a strided ``[N, count]`` tensor of its dtype. Used by the
low-latency and the hierarchical modes (the flat normal mode moves ``x`` unpacked, straight into
``recv_x``). Nothing here communicates.

Also the memory behind large buffers: :class:`BufferPool` (outputs handed to the caller, reused
once dropped), :class:`Scratch` (internal staging kept between calls), :func:`empty`.
"""
from __future__ import annotations

import math
import mmap
import weakref

import numpy as np
import torch

HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 4 << 20


def _map(nbytes: int) -> mmap.mmap:
    """Anonymous memory with room for a 2 MiB-aligned ``nbytes``, marked for transparent huge
    pages where the kernel offers them (``madvise`` mode): first touch then faults once per 2 MiB."""
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return area


def _carve(area: mmap.mmap, nbytes: int) -> np.ndarray:
    base = np.frombuffer(area, np.uint8, count=1)
    start = (-base.__array_interface__["data"][0]) % HUGE_PAGE
    return np.frombuffer(area, np.uint8, count=nbytes, offset=start)


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)``; 4 MiB and more in huge-page memory (see :func:`_map`)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(_carve(_map(nbytes), nbytes)).view(dtype).view(shape)


class BufferPool:
    """Large output buffers (recv_x, combine's result) that are reused once the caller drops them.

    Receiving ~100 MiB into fresh memory costs more in page faults than in copying (every page is
    faulted in and zeroed by the kernel on first touch). The pool keeps up to ``keep`` mappings;
    a returned tensor owns a numpy view of its mapping, and when every tensor and view of it is
    gone (the weak reference to that numpy view dies) the mapping is handed out again, already
    faulted in. Tensors below 4 MiB come from ``torch.empty``."""

    def __init__(self, keep: int = 6):
        self.keep = keep
        self._areas: list[list] = []                 # [mapping, size, weakref to the live view or None]

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < HUGE_MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        free = [a for a in self._areas if (a[2] is None or a[2]() is None) and nbytes <= a[1] <= 2 * nbytes]
        if free:
            entry = min(free, key=lambda a: a[1])
        else:
            if len(self._areas) >= self.keep:        # forget idle mappings (freed once unreferenced)
                self._areas = [a for a in self._areas if a[2] is not None and a[2]() is not None]
            entry = [_map(nbytes), nbytes, None]
            if len(self._areas) < self.keep:
                self._areas.append(entry)
        view = _carve(entry[0], nbytes)
        entry[2] = weakref.ref(view)
        return torch.from_numpy(view).view(dtype).view(shape)

    def clear(self) -> None:
        self._areas.clear()


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


class Scratch:
    """Internal staging buffers kept between calls (the packed send rows of dispatch, the rows
    coming back in combine), so that large calls do not pay for fresh pages every time: buffers
    above glibc's mmap threshold are returned to the kernel when freed and fault in again when
    reallocated. A buffer is valid until the next request under the same name."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = rows * cols * dtype.itemsize
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[name] = empty((max(nbytes, 8),), torch.uint8)
        return buf[:nbytes].view(dtype).view(rows, cols)

    def clear(self) -> None:
        self._bufs.clear()
