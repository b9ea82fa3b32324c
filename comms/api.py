"""Entry points: :func:`init` (torchrun-style environment or an explicit store) and :func:`create`."""
from __future__ import annotations

import os
from typing import Any, Sequence

from . import config
from .runtime.bootstrap import Bootstrap, default_store
from .communicator import Communicator
from .errors import InvalidUsage
from .security.store import secure


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except KeyError:
        raise InvalidUsage(f"comms.init(): {name} is not set; run under torchrun or python -m comms.run, "
                           "or pass rank= and world_size=") from None
    except ValueError:
        raise InvalidUsage(f"comms.init(): {name}={os.environ[name]!r} is not an integer") from None


def init(rank: int | None = None, world_size: int | None = None, store: Any = None,
         timeout: float | None = None, algo: str | None = None) -> Communicator:
    """Create the world communicator (collective over all ranks).

    Without arguments, reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun sets them.
    ``store`` may be any torch.distributed Store; ``timeout`` (seconds, default COMMS_TIMEOUT) is the
    deadline of every wait; ``algo`` overrides COMMS_ALGO (see comms.selection.rules for the grammar).
    """
    rank = _env_int("RANK") if rank is None else int(rank)
    world_size = _env_int("WORLD_SIZE") if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidUsage(f"comms.init(): rank {rank} is not in [0, {world_size})")
    timeout = float(config.get("TIMEOUT") if timeout is None else timeout)
    if timeout <= 0:
        raise InvalidUsage(f"comms.init(): timeout must be positive, got {timeout}")
    if store is None:
        store = default_store(rank, world_size, timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt not in ("", "0"):                 # torchrun restarted the group: the agent's store still
            from torch.distributed import PrefixStore    # holds the keys (and counters) of earlier attempts
            store = PrefixStore(f"comms-attempt-{int(attempt)}/", store)
    generation = (store.add("comms/init", 1) - 1) // world_size
    return create(rank, world_size, store, f"comms/{generation}/", timeout, algo, None)


def create(rank: int, size: int, store: Any, prefix: str, timeout: float, algo: str | None,
           members: Sequence[int] | None, params=None, control=None) -> Communicator:
    """Bootstrap a communicator under ``prefix`` in ``store`` (used by init, split, shrink, grow,
    join and the torch.distributed backend; a split inherits its parent's cost-model ``params``
    instead of calibrating, and its ``control`` plane: (plane, plane ranks); None starts a new
    plane). This is where a store enters comms: with a job secret (COMMS_AUTH_TOKEN or
    COMMS_AUTH_TOKEN_FILE) every value comms sets or gets in it is authenticated from here on
    (comms.security.store), the transports' hellos prove the secret (transports/mesh.py), and the
    control plane admits only the job's CURVE key pair (comms.control.plane)."""
    store, secret = secure(store, rank)
    boot = Bootstrap(rank, size, store, prefix, timeout, secret).run()
    return Communicator(boot, store, prefix, timeout, algo, members, params, control)


def join(name: str = "default", store: Any = None, timeout: float | None = None, algo: str | None = None) -> Communicator:
    """A replacement's way in: wait until a group calls ``comm.grow()`` (same ``name``), then become
    its newest rank(s). ``store``: the group's store (default: MASTER_ADDR:MASTER_PORT, as a client)."""
    from datetime import timedelta
    from .control import membership
    timeout = float(config.get("TIMEOUT") if timeout is None else timeout)
    if store is None:
        from torch.distributed import TCPStore
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise InvalidUsage("comms.join(): MASTER_ADDR and MASTER_PORT must name the group's store, or pass "
                               "store=") from None
        store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))
    return membership.join(secure(store)[0], name, timeout, algo)
