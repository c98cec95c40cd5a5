"""Process-group set-up and the few collectives the trainers need."""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 300.0) -> None:
    """Join (or create) the process group DeepSpeed will use, then check every process answers.

    A plain `rlhf sft` is world size 1 without a launcher: we set RANK/WORLD_SIZE/MASTER_* ourselves,
    because deepspeed.init_distributed otherwise falls back to MPI discovery and fails without mpi4py.
    A process that cannot reach rank 0, or a rank that never starts, fails the run after `timeout_s` with a
    message naming this host, its rank and the address it waited on (not a hang in the first collective).
    """
    import deepspeed

    from rlhf.errors import RLHFError

    if dist.is_available() and dist.is_initialized():
        return
    for lock in stale_build_locks():
        logger.warning("%s is %.0f minutes old: a build of this DeepSpeed op was killed while holding it, and every "
                       "run that loads the op waits on it forever. Delete it if no build is running.",
                       lock, (time.time() - lock.stat().st_mtime) / 60)
    orphans = orphaned_shared_memory() if os.environ.get("LOCAL_RANK", "0") == "0" else []
    if orphans:
        logger.warning("%d leftover buffer(s) of DeepSpeed's CPU collective, mapped by no process, hold %.1f GiB of "
                       "memory in %s (runs that ended without releasing them): rm %s/%s_* while no run is starting",
                       len(orphans), sum(p.stat().st_size for p in orphans) / 2**30, SHARED_MEMORY_DIR,
                       SHARED_MEMORY_DIR, SHARED_MEMORY_PREFIX)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if os.environ.get("WORLD_SIZE") == "1":
        _skip_shared_memory_comm()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    where = (f"rank {os.environ['RANK']} of {os.environ.get('WORLD_SIZE', '?')} on host {socket.gethostname()}, "
             f"waiting for rank 0 at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError, ValueError) as error:  # torch's DistStoreError is a RuntimeError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RLHFError(f"the processes of this run did not all join within launcher.connect_timeout_s={timeout_s:g}"
                        f" ({where}): {first}. Check that every node runs the same command and can reach "
                        "MASTER_ADDR:MASTER_PORT (firewall, hostfile, launcher.master_addr)") from None
    if world_size() > 1:
        _check_ranks_answer(timeout_s, where)
        _release_shared_memory_name()


def _skip_shared_memory_comm() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory collective (30-90 s in a fresh environment) in a
    process with no peer to share memory with.

    deepspeed.comm builds it whenever its table of compatible ops says it can, whatever the world size. Marked
    incompatible there, DeepSpeed's collectives go through torch.distributed, all that one process needs. The table
    is probed once per process and kept, so the mark holds for every engine built later in this process."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def stale_build_locks(max_age_s: float = 900.0) -> list:
    """Lock files of torch's JIT extension builds (DeepSpeed's ops) older than any build takes.

    torch waits, silently and without limit, for a lock to disappear; a build killed mid-way leaves it behind."""
    from torch.utils.cpp_extension import get_default_build_root

    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    locks = Path(given).glob("*/lock") if given else Path(get_default_build_root()).glob("*/*/lock")
    now = time.time()
    return sorted(p for p in locks if now - p.stat().st_mtime > max_age_s)


SHARED_MEMORY_DIR = Path("/dev/shm")
SHARED_MEMORY_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's SHM_BUFFER_NAME (csrc/cpu/comm/shm.cpp)


def _release_shared_memory_name() -> None:
    """Unlink the name of this rank's buffer for DeepSpeed's CPU shared-memory collective.

    DeepSpeed creates one 69 MB POSIX shared-memory file per rank and never removes it: every multi-process CPU
    run leaves its buffers in /dev/shm, which is RAM, until reboot (312 of them filled a 24 GiB machine and stalled
    every process on it). Once every rank has passed the barrier, every rank has mapped every buffer; the mappings
    outlive the name, and the memory goes back when the last process holding it exits."""
    from deepspeed.comm import comm as ds_comm

    if getattr(ds_comm.cdb, "shm_comm_op", None) is None:
        return
    name = (f"{SHARED_MEMORY_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    (SHARED_MEMORY_DIR / name).unlink(missing_ok=True)


def orphaned_shared_memory() -> list:
    """This user's buffers of DeepSpeed's CPU collective in /dev/shm that no running process maps: left by runs
    that ended without releasing them, they hold memory until reboot. Reported, not removed: a run starting now
    could have created its buffer and not yet mapped it."""
    mine = [p for p in SHARED_MEMORY_DIR.glob(f"{SHARED_MEMORY_PREFIX}_{os.getuid()}_*") if p.is_file()]
    if not mine:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.rsplit(None, 1)[-1] for line in maps.read_text().splitlines()
                          if str(SHARED_MEMORY_DIR) in line)
        except OSError:  # a process that ended, or another user's
            continue
    return sorted(p for p in mine if str(p) not in mapped)


def _check_ranks_answer(timeout_s: float, where: str) -> None:
    """A barrier that names the ranks that did not arrive (gloo's monitored barrier, on a side group so it works
    beside NCCL too)."""
    from rlhf.errors import RLHFError

    group = dist.new_group(backend="gloo")
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as error:
        raise RLHFError(f"not every process answered within launcher.connect_timeout_s={timeout_s:g} ({where}): "
                        f"{str(error).strip().splitlines()[0]}") from None


_keep_alive = False


@contextmanager
def kept_alive():
    """Keep one process group for several stages run in this process (`rlhf pipeline`): DeepSpeed caches groups
    made from the first one, so a group destroyed and created again breaks the next stage's engine."""
    global _keep_alive
    _keep_alive = True
    try:
        yield
    finally:
        _keep_alive = False
        shutdown()


def shutdown() -> None:
    """Destroy the process group: leaving it to interpreter exit aborts the process on CPU (exit 134)."""
    if dist.is_available() and dist.is_initialized() and not _keep_alive:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Sum a dict of floats over ranks (one collective for all of them)."""
    keys = sorted(values)
    if world_size() == 1 or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A tensor summed over every process (returned as a new tensor; the input is untouched)."""
    if world_size() == 1:
        return t
    out = t.detach().clone().to(device())
    dist.all_reduce(out)
    return out.to(t.device)


def batch_reducer():
    """What batch-wide statistics reduce with: sum_over_ranks under several processes, else None."""
    return sum_over_ranks if world_size() > 1 else None


def all_reduce_max(value: float) -> float:
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    n = world_size()
    return {k: v / n for k, v in all_reduce_sum(values).items()}


def gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
