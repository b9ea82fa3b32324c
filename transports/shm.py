"""Shared-memory transport for peers on the same host, implemented in native/shm.c.

Each rank creates one /dev/shm segment holding its inbound rings (one per local peer) and maps
every local peer's segment. As soon as every local rank has mapped every segment, each rank
unlinks its own: from then on the segments have no name, and the kernel frees them when the last
process exits, even after ``kill -9``. A rank killed during init leaves a named segment behind;
its name carries the creator's pid, and :func:`comms.runtime.cleanup.sweep_stale_segments` (run at every
init and by the launchers) removes it.

Space is reserved with posix_fallocate, so a /dev/shm too small fails at init with the size it
needs, never with SIGBUS in the middle of a collective.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import struct

from .. import config
from ..runtime.cleanup import SHM_DIR, segment_name, sweep_stale_segments
from ..errors import E_NOMEM, TransportError, code_name
from ..selection.model import Link
from .base import Endpoint, Transport

def _reason(rc: int, err: int) -> str:
    """Why a cm_shm_* call failed: its errno when it names one, else its CM_E_* code."""
    return os.strerror(err) if err > 0 else code_name(rc)


config.declare("SHM_SLOT_BYTES", "size", 128 << 10, "Bytes per slot of a shared-memory channel (a pipeline chunk).")
config.declare("SHM_SLOTS", int, 8, "Slots per shared-memory channel (chunks in flight per direction).")
config.declare("SHM_BOARD_BYTES", "size", 4 << 10, "Payload bytes of each of a rank's two board slots: the largest "
               "all_reduce the board algorithm serves on one host (0: no board).")

ADDR = struct.Struct("!QIIQ")        # segment bytes, slots, slot bytes, board bytes; the segment's name follows
NAME = re.compile(r"comms\.\d+\.\d+\.[0-9a-f]+")


class ShmTransport(Transport):
    name = "shm"
    link = Link(1.5, 6.0)            # until calibration measures them: 1x2 fits gave 1.2-1.6 us a step (6 fresh
    #                                  caches), 4 MiB ping-pongs 6-13 GB/s (the low end kept)
    waits_together = True            # one pass over the rings serves every exchange of a step

    def __init__(self, boot):
        super().__init__(boot)
        self.seg_name: str | None = None
        self.seg_addr = None
        self.seg_bytes = 0
        self.mapped: list[tuple[object, int]] = []
        self.local = boot.local_ranks            # ranks on this host, in rank order
        self.nslots = config.get("SHM_SLOTS")
        self.slot_bytes = (config.get("SHM_SLOT_BYTES") + 63) // 64 * 64
        self.board_bytes = (config.get("SHM_BOARD_BYTES") + 63) // 64 * 64

    def can_connect(self, me, peer) -> bool:
        return me.same_host(peer)

    def listen(self) -> bytes:
        from ..runtime import native
        from ..runtime.native import ffi
        if len(self.local) < 2:
            return b""
        sweep_stale_segments()
        nlocal = len(self.local)
        self.seg_bytes = native.shm_segment_bytes(nlocal, self.nslots, self.slot_bytes, self.board_bytes)
        self.seg_name = segment_name()
        out = ffi.new("void **")
        err = ffi.new("int *")
        rc = native.shm_create(self.seg_name.encode(), self.seg_bytes, out, err)
        if rc != 0:
            self.seg_name = None
            raise self._create_error(rc, err[0], nlocal)
        self.seg_addr = out[0]
        self.mapped.append((self.seg_addr, self.seg_bytes))
        native.shm_init_segment(self.seg_addr, nlocal, self.nslots, self.slot_bytes, self.board_bytes)
        rc = native.ctx_set_shm(self.boot.engine.ctx, self.seg_addr, self.local.index(self.boot.rank), nlocal,
                                self.nslots, self.slot_bytes, self.board_bytes)
        if rc != 0:
            raise TransportError(f"shm: native context rejected the segment layout (code {rc})")
        return ADDR.pack(self.seg_bytes, self.nslots, self.slot_bytes, self.board_bytes) + self.seg_name.encode()

    def _create_error(self, rc: int, err: int, nlocal: int) -> TransportError:
        """The error of a failed cm_shm_create: ``rc`` its CM_E_* code, ``err`` the errno behind it."""
        if rc == E_NOMEM or err in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            try:
                free = shutil.disk_usage(SHM_DIR).free
            except OSError:
                free = -1
            return TransportError(
                f"/dev/shm is too small: rank {self.boot.rank} needs {self.seg_bytes} bytes "
                f"({self.seg_bytes / 2**20:.1f} MiB: {nlocal} local ranks x {self.nslots} slots x "
                f"{self.slot_bytes} B) but only {free} bytes are free; enlarge /dev/shm "
                f"(docker run --shm-size), lower COMMS_SHM_SLOTS / COMMS_SHM_SLOT_BYTES, or set COMMS_TRANSPORT=tcp",
                rank=self.boot.rank)
        return TransportError(f"shm: cannot create segment {self.seg_name}: {_reason(rc, err)}", rank=self.boot.rank)

    def _parse(self, peer: int, address: bytes) -> tuple[str, int, int, int, int]:
        name = address[ADDR.size:].decode("ascii", "replace")
        if len(address) <= ADDR.size or not NAME.fullmatch(name):
            raise TransportError(f"shm: rank {peer} published a malformed address ({len(address)} bytes)",
                                 rank=self.boot.rank, peer=peer)
        return (name, *ADDR.unpack_from(address))

    def connect(self, peer: int, address: bytes) -> Endpoint:
        from ..runtime import native
        from ..runtime.native import ffi
        name, nbytes, nslots, slot_bytes, board_bytes = self._parse(peer, address)
        if (nslots, slot_bytes, board_bytes) != (self.nslots, self.slot_bytes, self.board_bytes):
            raise TransportError(f"shm: rank {peer} uses {nslots} slots of {slot_bytes} B and board slots of "
                                 f"{board_bytes} B but rank {self.boot.rank} uses {self.nslots} of {self.slot_bytes} B "
                                 f"and {self.board_bytes} B; set COMMS_SHM_SLOTS/COMMS_SHM_SLOT_BYTES/"
                                 "COMMS_SHM_BOARD_BYTES alike on every rank", rank=self.boot.rank, peer=peer)
        out = ffi.new("void **")
        err = ffi.new("int *")
        rc = native.shm_attach(name.encode(), nbytes, out, err)
        if rc != 0:
            raise TransportError(f"shm: rank {self.boot.rank} cannot map segment {name} of rank {peer}: "
                                 f"{_reason(rc, err[0])}", rank=self.boot.rank, peer=peer)
        self.mapped.append((out[0], nbytes))
        me, them = self.boot.peers[self.boot.rank], self.boot.peers[peer]
        pid = them.pid if me.same_pid_namespace(them) else 0
        rc = native.ctx_add_shm_peer(self.boot.engine.ctx, peer, out[0], self.local.index(peer), pid)
        if rc != 0:
            raise TransportError(f"shm: segment of rank {peer} does not match this rank's layout (code {rc})",
                                 rank=self.boot.rank, peer=peer)
        return Endpoint(peer, self)

    def coll_bytes(self) -> int:
        return self.board_bytes if self.seg_addr is not None else 0

    def finish(self) -> None:
        """Every local rank has mapped our segment: remove its name."""
        self.unlink()

    def unlink(self) -> None:
        if self.seg_name:
            from ..runtime import native
            from ..runtime.native import ffi
            native.shm_unlink(self.seg_name.encode(), ffi.NULL)
            self.seg_name = None

    def close(self) -> None:
        from ..runtime import native
        from ..runtime.native import ffi
        self.unlink()
        for addr, nbytes in self.mapped:
            native.shm_unmap(addr, nbytes, ffi.NULL)
        self.mapped = []

TRANSPORT = ShmTransport
