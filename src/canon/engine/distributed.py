"""Data parallelism on torch.distributed, launched by `torchrun` (one process per device,
DistributedDataParallel, NCCL on GPUs and gloo on CPUs); run without torchrun, every call here
degrades to a single process (no process group, no wrapper, collectives return their input), so
the trainer has one code path."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import socket
import threading
import time
import uuid
import warnings
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.constants import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel

from canon.devices import resolve_device
from canon.errors import ConfigError

# How long a rank leaving a gloo group waits for the group's worker threads (shutdown_distributed).
GLOO_WORKERS_GRACE_S = 0.1


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its global rank, its rank on this machine, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # Whether init_distributed joined the process group (and shutdown_distributed leaves it);
    # False when the caller had joined it already.
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and prints summaries."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _pick_device(device: str, local_rank: int, world_size: int) -> torch.device:
    chosen = torch.device(resolve_device(device))
    if chosen.type == "cpu":
        return chosen
    if chosen.index is not None:
        if world_size > 1:
            raise ConfigError(
                f"--device {device} names one GPU, but {world_size} processes run; "
                "use --device cuda (each process takes cuda:LOCAL_RANK)"
            )
        return chosen
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this machine shows "
            f"{torch.cuda.device_count()}; lower torchrun's --nproc_per_node"
        )
    return torch.device("cuda", local_rank)


def cores_per_process() -> int:
    """The CPU cores this process may use, shared among the training processes of its machine."""
    return max(1, len(os.sched_getaffinity(0)) // _env_int("LOCAL_WORLD_SIZE", 1))


# torchrun's run id without --rdzv-id (the static rendezvous of --master-addr/--master-port,
# or c10d's): every launch's, not one of its own.
_SHARED_RUN_ID = "none"
_LAUNCH_KEY = "canon/launch-id"


def elastic_run_id() -> str:
    """The id of this torchrun launch, the same on every process and across elastic restarts:
    torchrun's (--rdzv-id; one per --standalone launch) or, where that is "none" as for every
    launch without --rdzv-id, one drawn by its first worker to ask and kept in torchrun's
    store (a warning where it shares none). c10d's store lives on its rank 0's node: a
    restart after rank 0 moved draws anew, and its run is refused as an earlier job's."""
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    if run_id != _SHARED_RUN_ID:
        return run_id
    address = _agent_store_address()
    if address is None:
        warnings.warn("torchrun's run id is 'none' and it shares no store (etcd, or "
                      "TORCH_DISABLE_SHARE_RDZV_TCP_STORE): a restart cannot tell this job's "
                      "checkpoints from an earlier job's in its folder; pass --rdzv-id=JOB_ID, "
                      "an id of this job alone", stacklevel=2)
        return run_id
    return _launch_id_in_store(*address)


@functools.cache  # one question per process: it is asked again at every checkpoint saved
def _launch_id_in_store(address: str, port: int) -> str:
    drawn = uuid.uuid4().hex[:12]
    # Set only where it is missing: every worker and restart of the launch gets the first's.
    return _store_client(address, port).compare_set(_LAUNCH_KEY, "", drawn).decode()


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process of its own: the one that prints summaries."""
    return _env_int("RANK", 0) == 0


def elastic_restart_count() -> int:
    """How often torchrun has restarted the workers of this run (`--max-restarts`); 0 at first.

    A restarted worker reruns the same command line; it should resume from the run's last
    checkpoint rather than start over.
    """
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def _agent_store_address() -> tuple[str, int] | None:
    """Where torchrun's store is, MASTER_ADDR:MASTER_PORT: it lives across the workers'
    elastic restarts. None where torchrun shares none."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def _store_client(address: str, port: int, timeout: timedelta = default_pg_timeout
                  ) -> dist.TCPStore:
    return dist.TCPStore(address, port, is_master=False, timeout=timeout)


def first_to_meet(message: str) -> bool:
    """Whether no other worker of this torchrun launch attempt has met `message` (an error that
    ends it) before this one, as torchrun's store counts them: every rank meets an error of the
    recipe, the data or the checkpoint alike. True where torchrun shares no store, or its
    variables cannot be read, or the store does not answer within seconds (a dead or hung
    agent: this process is ending, and must not wait on it)."""
    try:
        address = _agent_store_address()
        attempt = elastic_restart_count()
    except (ConfigError, ValueError, KeyError):  # unreadable: the error shown may say so
        return True
    if address is None:
        return True
    try:  # a gone agent refuses at once, where TCPStore would retry (and log each try)
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return True
    digest = hashlib.sha256(message.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    counts: list[int] = []

    def count() -> None:
        with suppress(RuntimeError, OSError):  # DistNetworkError, DistStoreError
            store = _store_client(*address, timeout=timedelta(seconds=2))
            counts.append(store.add(f"canon/attempt-{attempt}/met-{digest}", 1))

    asking = threading.Thread(target=count, daemon=True)  # a hung agent's store never answers
    asking.start()
    asking.join(timeout=3)
    return not counts or counts[0] == 1


_joins = itertools.count()  # process groups this process has joined (init_distributed)


def _attempt_store() -> dist.Store | None:
    """torchrun's agent store with this restart attempt's, and this join's, own key space;
    None: use env://.

    The agent keeps its store across elastic restarts, and the previous attempt's process
    group keys are still in it: plain env:// initialisation then connects to the dead
    workers' addresses and fails or hangs (seen with torch 2.14 and gloo; see
    pytorch/pytorch#167288). A prefix per attempt starts every attempt from clean keys, and
    one per join does the same for a process that trains twice (canon.train called again
    after the first left its group): torch names every new default group alike.
    """
    address = _agent_store_address()
    return None if address is None else dist.PrefixStore(
        f"canon/attempt-{elastic_restart_count()}/join-{next(_joins)}",
        _store_client(*address))


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the torchrun process group if there is one; otherwise a world of one process.

    `device`: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda", or
    "cuda:N" (single process only).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    chosen = _pick_device(device, local_rank, world_size)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    joins = world_size > 1 and not dist.is_initialized()
    if joins:
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, store=_attempt_store(), rank=rank, world_size=world_size
        )
    return DistributedContext(rank, local_rank, world_size, chosen, owns_process_group=joins)


def shutdown_distributed(ctx: DistributedContext, *, together: bool = True) -> None:
    """Leave the process group if `init_distributed` joined it (a caller's group stays).

    `together` (the ranks finished alike): all ranks first meet at a barrier, since a rank
    tearing gloo down while its peer still talks aborts the peer ("terminate called without an
    active exception", about 1 two-process launch in 4 on CPU). A rank leaving on an error does
    not wait: its peers may be stuck in a collective it will never join."""
    if ctx.owns_process_group and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        if together:
            dist.barrier()
        dist.destroy_process_group()
        if gloo:
            # A gloo worker thread drops its last reference to a collective after signalling
            # it done, and freeing one that holds Python objects (a tensor made in Python, the
            # context autograd stashes) takes the GIL. Neither destroying the group nor its
            # backend's shutdown() joins those threads, so a rank that went straight on to exit
            # left one taking the GIL from a finalising interpreter: "terminate called without
            # an active exception", about 1 launch in 10 of a two-rank test. Sleeping releases
            # the GIL to them.
            time.sleep(GLOO_WORKERS_GRACE_S)


def wrap_model(
    model: nn.Module, ctx: DistributedContext, *, sync_batchnorm: bool = False
) -> nn.Module:
    """Wrap `model` in DDP on this process's device when more than one process runs.

    A single process gets `model` back untouched (it may be spread over several devices by
    model parallelism). `sync_batchnorm` converts every BatchNorm to SyncBatchNorm, so batch
    statistics are computed over the global batch instead of each device's share (CUDA only,
    as in PyTorch).
    """
    if ctx.world_size == 1:
        if sync_batchnorm:
            warnings.warn("--sync-bn (train.sync_batchnorm) has no effect in a single process: "
                          "its batch statistics are already the whole batch's; it applies "
                          "under torchrun with several processes", stacklevel=2)
        return model
    if sync_batchnorm:
        if ctx.device.type != "cuda":
            raise ConfigError(
                "--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
                "drop --sync-bn or train on GPUs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model.to(ctx.device), device_ids=device_ids)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """The sum of `tensor` over all ranks (a new tensor on this rank's device)."""
    total = tensor.detach().to(ctx.device, copy=True)
    if ctx.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def any_rank(flag: bool, ctx: DistributedContext) -> bool:
    """True on every rank if it is on any (one collective and device sync): all ranks must
    stop, or refuse, at the same point, or the others wait for the missing one forever."""
    if ctx.world_size == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)]), ctx).item())


def all_gather_object(value: object, ctx: DistributedContext) -> list:
    """`value` from every rank, in rank order (picklable objects; tensors on the CPU)."""
    if ctx.world_size == 1:
        return [value]
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_buffers(model: nn.Module, ctx: DistributedContext) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics; of an AveragedModel,
    its .module's: its step count sits on the CPU, which an NCCL group cannot send).

    DDP copies rank 0's buffers to every rank before each training forward, but each rank's
    forward then updates its own copy; called before validation, this makes every rank score
    its shard with the model rank 0 saves (timm's distribute_bn averages them instead; canon
    keeps DDP's convention that rank 0's statistics are the model's)."""
    if ctx.world_size == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def sync_context(model: nn.Module, *, sync: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last.

    Use as `with sync_context(model, sync=is_last_micro_step): loss.backward()`.
    """
    wrapped = getattr(model, "_orig_mod", model)  # torch.compile's wrapper of the DDP model
    if not sync and isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    return nullcontext()


def barrier(ctx: DistributedContext) -> None:
    """Wait until every rank gets here (e.g. rank 0 finished writing a checkpoint)."""
    if ctx.world_size == 1:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()
