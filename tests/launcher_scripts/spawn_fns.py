"""Module-level functions for ``comms.testing.spawn`` tests (picklable, light imports)."""
import os
import time


def report(rank, world_size, base, scale=1):
    """Returns what the rank saw: its arguments and its environment."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                          "MASTER_ADDR", "MASTER_PORT", "EXTRA_VAR")}
    return {"rank": rank, "world": world_size, "value": (base + rank) * scale, "env": env,
            "pid": os.getpid()}


def store_roundtrip(rank, world_size):
    """Every rank sets a key in the parent's TCPStore and reads all of them."""
    from datetime import timedelta

    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=20))
    store.set(f"k{rank}", str(rank * 10))
    return [int(store.get(f"k{r}")) for r in range(world_size)]


def explode_here(rank, world_size, bad_rank):
    """Rank ``bad_rank`` raises ValueError; the others return their rank."""
    if rank == bad_rank:
        raise ValueError(f"boom from rank {rank}")
    return rank


def all_but_zero_fail(rank, world_size):
    """Ranks > 0 raise (after rank-dependent delays); rank 0 returns."""
    if rank == 0:
        return "fine"
    time.sleep(0.05 * rank)
    raise KeyError(f"failure {rank}")


def exit_hard(rank, world_size):
    """Rank 1 dies with os._exit(7) without reporting; the others sleep 60 s."""
    if rank == 1:
        os._exit(7)
    time.sleep(60)


def hang(rank, world_size, pid_dir):
    """Writes its pid into ``pid_dir``; rank 1 hangs, the others return."""
    with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        time.sleep(600)
    return rank


def unpicklable_result(rank, world_size):
    return lambda: rank
