"""RDMA transport over libfabric (native/rdma.c, rdma_fabric.c, rdma_mr.c): InfiniBand and RoCE
through the ``verbs;ofi_rxm`` provider, AWS EFA through ``efa``, and the same code on libfabric's
software providers (``tcp;ofi_rxm``, ``shm``), which is how CI runs every line but the NIC.

Selection: ``COMMS_TRANSPORT=rdma`` forces it for every peer, local ones included;
``COMMS_TRANSPORT=shm,rdma`` keeps shm inside a host and puts rdma between hosts. Either way init
fails with a clear error when libfabric or its provider cannot be opened (never a silent
fallback). ``auto`` uses it between hosts when libfabric offers a provider other than its software
ones on every rank involved; otherwise tcp carries those pairs. The provider is libfabric's own choice,
steered by its ``FI_PROVIDER`` variable; COMMS_RDMA_DOMAIN picks a device.

Per communicator: one FI_EP_RDM endpoint, whose opaque ``fi_getname`` address is published through
the store, and per peer a TCP connection that carries no data but tells when the peer's process is
gone (libfabric does not: see native/rdma.c).

Registrations: the native side keeps a buffer registered across calls only when this module
vouches for it (:class:`Pins`): before every operation the buffers' owners (the numpy array that
owns the memory, the torch storage) are tracked with weakref finalizers, and their ranges are
forgotten natively once they die, before the memory can be reused.
"""
from __future__ import annotations

import os
import struct
import weakref
from collections import deque

import numpy as np

from .. import config
from ..diag import log as clog
from ..errors import TransportError
from ..selection.model import Link
from .base import Endpoint, Transport
from .mesh import Mesh, local_address

log = clog.get("TRANSPORT")

config.declare("RDMA_DOMAIN", str, "", "libfabric domain (device) the rdma transport opens, e.g. mlx5_0; empty: "
               "libfabric's first choice (for IP providers, the interface of COMMS_SOCKET_ADDR or of the route "
               "towards MASTER_ADDR).")
config.declare("RDMA_EAGER_BYTES", "size", 16 << 10, "Largest rdma message (with its 112-byte header) sent as one "
               "send into a posted receive buffer; larger ones are RMA writes into the receiver's buffer after a "
               "rendezvous. 16K stays within tcp;ofi_rxm's eager protocol.")
config.declare("RDMA_LIBFABRIC", str, "libfabric.so.1", "The libfabric library the rdma transport loads (dlopen): "
               "a path for a vendor's build, e.g. /opt/amazon/efa/lib/libfabric.so.")
config.declare("RDMA_CQ_FD", str, "auto", "Whether the rdma completion queue has a wait descriptor: auto (only where a "
               "host's ranks outnumber its cores, so sleep often; elsewhere they spin, and a descriptor costs the "
               "software providers two syscalls per completion), on, off.")
config.declare("RDMA_MR_LOCAL", bool, False, "Test hook: act as if the provider required FI_MR_LOCAL (register and "
               "pass descriptors for local buffers too), as verbs and EFA do and the software providers do not.")

ADDR = struct.Struct("!HH")          # lengths of the fi_getname blob and of the liveness address
MR_MODES = {0x1: "LOCAL", 0x2: "RAW", 0x4: "VIRT_ADDR", 0x8: "ALLOCATED", 0x10: "PROV_KEY", 0x20: "MMU_NOTIFY",
            0x40: "RMA_EVENT", 0x80: "ENDPOINT", 0x100: "HMEM", 0x200: "COLLECTIVE"}
MR_STATS = ("rdma_registrations", "rdma_cache_hits", "rdma_one_use_registrations", "rdma_forgets", "rdma_pinned")
_probed: dict = {}


def _info_dict(info) -> dict:
    from ..runtime.native import ffi
    modes = int(info.mr_mode)
    return {"provider": ffi.string(info.provider).decode(), "fabric": ffi.string(info.fabric).decode(),
            "domain": ffi.string(info.domain).decode(), "hardware": bool(info.hardware),
            "mr_mode": [name for bit, name in MR_MODES.items() if modes & bit] or ["none"],
            "max_msg_size": int(info.max_msg_size), "inject_size": int(info.inject_size),
            "cq_data_size": int(info.cq_data_size), "tx_depth": int(info.tx_depth), "rx_depth": int(info.rx_depth),
            "cq_wait_fd": bool(info.wait_fd),
            "provider_version": f"{int(info.prov_version) >> 16}.{int(info.prov_version) & 0xffff}"}


def probe(node: str = "", domain: str | None = None) -> dict:
    """What libfabric would open here (cached per process): the provider, fabric, domain, whether
    it is hardware, its rules; or ``{"error": why}``."""
    domain = config.get("RDMA_DOMAIN") if domain is None else domain
    key = (node, domain, os.environ.get("FI_PROVIDER"), config.get("RDMA_LIBFABRIC"))
    if key not in _probed:
        from ..runtime import native
        from ..runtime.native import ffi
        _library()
        info = ffi.new("cm_rdma_info *")
        rc = native.rdma_probe(node.encode(), domain.encode(), info)
        _probed[key] = _info_dict(info) if rc == 0 else {"error": ffi.string(info.error).decode()}
    return _probed[key]


def _library() -> None:
    from ..runtime import native
    if native.rdma_library(config.get("RDMA_LIBFABRIC").encode()) != 0:
        raise TransportError(f"COMMS_RDMA_LIBFABRIC={config.get('RDMA_LIBFABRIC')!r}: another libfabric is loaded "
                             "in this process already")


def _owner_range(obj):
    """(owner, base address, bytes) of the memory behind ``obj``: the object whose death frees it."""
    if isinstance(obj, np.ndarray):
        root = obj
        while isinstance(root.base, np.ndarray):
            root = root.base
        owner = root if root.base is None else root.base
        base, nbytes = root.__array_interface__["data"][0], root.nbytes
    elif type(obj).__module__.startswith("torch"):
        try:
            owner = obj.untyped_storage()
            base, nbytes = owner.data_ptr(), owner.nbytes()
        except (AttributeError, RuntimeError):
            return None
    else:
        return None
    if not nbytes or not base:
        return None
    try:
        weakref.ref(owner)
    except TypeError:                           # bytes, bytearray: no weak references, nothing cached
        return None
    return owner, base, nbytes


def _died(pins_ref, key: int, base: int, nbytes: int) -> None:
    pins = pins_ref()
    if pins is not None:
        pins.owners.pop(key, None)
        pins.dead.append((base, nbytes))


class Pins:
    """Which buffer ranges native/rdma_mr.c may keep registered (see the module docstring).

    Called with an operation's buffers before it runs. A range is pinned while its owner lives;
    an owner seen again with another range (resized in place) has its old range forgotten; a dead
    owner's range is forgotten before the next operation. Correctness never rests on this: a range
    not pinned is registered for one use, and pinning a range forgets every cached one it overlaps."""

    def __init__(self, engine, small: int):
        self.engine = engine
        self.small = small                      # buffers this small only ever travel as eager messages
        self.owners: dict[int, tuple] = {}      # id(owner) -> (base, nbytes, finalizer)
        self.dead: deque = deque()

    def __call__(self, objs) -> None:
        if self.dead:
            self._forget_dead()
        for obj in objs:
            if getattr(obj, "nbytes", 0) <= self.small:    # no registration needed: skip the lookups
                continue
            found = _owner_range(obj)
            if found is None:
                continue
            owner, base, nbytes = found
            rec = self.owners.get(id(owner))
            if rec is None or rec[0] != base or rec[1] != nbytes:
                self._pin(owner, base, nbytes, rec)

    def _pin(self, owner, base: int, nbytes: int, old) -> None:
        from ..runtime import native
        if old is not None:
            old[2].detach()
        fin = weakref.finalize(owner, _died, weakref.ref(self), id(owner), base, nbytes)
        fin.atexit = False
        self.owners[id(owner)] = (base, nbytes, fin)
        with self.engine.locked() as ctx:
            if ctx is None:
                return
            if old is not None:
                native.rdma_forget(ctx, old[0], old[1])
            native.rdma_pin(ctx, base, nbytes)

    def _forget_dead(self) -> None:
        from ..runtime import native
        with self.engine.locked() as ctx:
            while self.dead:
                base, nbytes = self.dead.popleft()
                if ctx is not None:
                    native.rdma_forget(ctx, base, nbytes)


class RdmaTransport(Transport):
    name = "rdma"
    link = Link(5.0, 10.0)            # a 100 Gbit/s-class NIC, until calibration measures the real one
    waits_together = False            # every exchange is its own sends, writes and completions

    def __init__(self, boot):
        super().__init__(boot)
        self.mesh = Mesh(boot, b"CMRL", self.name)
        self.info: dict | None = None
        self.pins: Pins | None = None

    @classmethod
    def describe(cls) -> dict:
        return probe()

    def can_connect(self, me, peer) -> bool:
        return self.listed or not me.same_host(peer)    # auto: between hosts, where both ranks opened it

    def _wanted(self) -> bool:
        if self.boot.size < 2:
            return False
        if self.listed:
            return True
        if self.mesh.all_local():
            return False
        found = probe(local_address(False))
        if not found.get("hardware"):
            log.info("comms: rank %d: no RDMA hardware provider (%s); tcp carries the traffic between hosts",
                     self.boot.rank, found.get("error") or f"libfabric offers {found.get('provider')}")
            return False
        return True

    def listen(self) -> bytes:
        if not self._wanted():
            return b""
        from ..runtime import native
        from ..runtime.native import ffi
        from ..runtime.cleanup import segment_name
        info = ffi.new("cm_rdma_info *")
        blob = ffi.new("char[1024]")
        blen = ffi.new("size_t *", 1024)
        node = local_address(self.mesh.all_local())
        _library()
        rc = native.rdma_open(self.boot.engine.ctx, node.encode(), config.get("RDMA_DOMAIN").encode(),
                              f"fi_shm://{segment_name()}".encode(), int(config.get("RDMA_MR_LOCAL")),
                              int(self._cq_fd()), config.get("RDMA_EAGER_BYTES"), info, blob, blen)
        if rc != 0:
            why = ffi.string(info.error).decode() or f"code {rc}"
            provider = os.environ.get("FI_PROVIDER")
            msg = (f"rdma: rank {self.boot.rank} cannot open libfabric{' provider ' + provider if provider else ''}: "
                   f"{why}")
            if self.listed:
                raise TransportError(f"{msg} (COMMS_TRANSPORT={config.get('TRANSPORT')} asks for it; leave rdma out "
                                     "of it, or unset it, to use shm and tcp)", rank=self.boot.rank)
            log.warning("comms: %s; tcp carries the traffic between hosts instead", msg)
            return b""
        self.info = _info_dict(info)
        log.info("comms: rank %d rdma: provider %s %s, fabric %s, domain %s, MR modes %s", self.boot.rank,
                 self.info["provider"], self.info["provider_version"], self.info["fabric"], self.info["domain"],
                 ",".join(self.info["mr_mode"]))
        if self.info["provider"] == "shm" and self.boot.rank == 0:
            log.warning("comms: rdma over libfabric's shm provider: it guards each rank's region with a spin lock "
                        "that its peers take too, so a rank killed while holding it (inside a libfabric call) "
                        "leaves its peers spinning in libfabric, where no comms deadline can reach them. comms' "
                        "own shm transport (the default on one host) survives a kill -9.")
        self.pins = Pins(self.boot.engine, config.get("RDMA_EAGER_BYTES") - 128)   # minus the header, rounded
        fi = ffi.buffer(blob, blen[0])[:]
        liveness = self.mesh.listen()
        return ADDR.pack(len(fi), len(liveness)) + fi + liveness

    def _cq_fd(self) -> bool:
        want = config.get("RDMA_CQ_FD").lower()
        if want not in ("auto", "on", "off"):
            raise TransportError(f"COMMS_RDMA_CQ_FD={want!r}: expected auto, on or off", rank=self.boot.rank)
        return self.boot.oversubscribed if want == "auto" else want == "on"

    def _parse(self, peer: int, address: bytes) -> tuple[bytes, bytes]:
        if len(address) >= ADDR.size:
            nfi, nlive = ADDR.unpack_from(address)
            if 0 < nfi <= 1024 and ADDR.size + nfi + nlive == len(address):
                return address[ADDR.size:ADDR.size + nfi], address[ADDR.size + nfi:]
        raise TransportError(f"rdma: rank {peer} published a malformed address ({len(address)} bytes)",
                             rank=self.boot.rank, peer=peer)

    def connect(self, peer: int, address: bytes) -> Endpoint:
        from ..runtime import native
        fi, liveness = self._parse(peer, address)
        sock = self.mesh.connection(peer, liveness)
        sock.setblocking(False)
        rc = native.rdma_add_peer(self.boot.engine.ctx, peer, fi, len(fi), sock.fileno())
        if rc != 0:
            sock.close()
            raise TransportError(f"rdma: rank {self.boot.rank} cannot add rank {peer}'s endpoint to its address "
                                 f"vector (code {rc})", rank=self.boot.rank, peer=peer)
        sock.detach()                         # the engine owns and closes the fd now
        return Endpoint(peer, self)

    def finish(self) -> None:
        self.mesh.close()

    def close(self) -> None:
        self.mesh.close()

    def buffer_hook(self):
        return self.pins

    def stats(self) -> dict:
        if self.info is None:
            return {}
        from ..runtime import native
        from ..runtime.native import ffi
        out = ffi.new("uint64_t[5]")
        with self.boot.engine.locked() as ctx:
            if ctx is None or native.rdma_mr_stats(ctx, out, 5) != 0:
                return {}
        return {name: int(out[i]) for i, name in enumerate(MR_STATS)}

TRANSPORT = RdmaTransport
