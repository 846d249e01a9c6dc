"""The few collectives vqhit needs, in one place, each a no-op (or the identity) in a single process.

Every helper works with or without `torch.distributed` initialised (one process: nothing to talk to), on
NCCL (CUDA tensors) and on gloo (CPU tensors): a tensor on the wrong device for the backend is copied to
the backend's device and the result copied back, so callers keep their tensors wherever is convenient.
Collectives must be called by every process in the same order, as always with torch.distributed.

Buffer policy under DDP
-----------------------
DDP does not broadcast buffers: `ddp_kwargs()` gives Accelerate `broadcast_buffers=False`. Accelerate's
default (`broadcast_buffers=True`) copies rank 0's buffers over every other rank before each forward, which
wiped the quantizer's per-rank usage histogram and restart ring buffer, so usage was rank 0's and restart
candidates came from rank 0's images only. With it off:

- BatchNorm normalises with per-replica batch statistics, as the official release does (SyncBatchNorm is a
  model option). Its running statistics are averaged across replicas after every optimiser step by
  `average_batchnorm_stats_` (the training loop calls it): what TensorFlow's MirroredStrategy does with
  BatchNorm moving averages (variables aggregated by MEAN). So every rank, the EMA and the exported model
  hold the same statistics, and they summarise every replica's data, not rank 0's.
- The quantizer keeps its own statistics consistent: usage histograms stay per rank and are summed when
  read (`VectorQuantizer.usage_stats`), dead-code clocks advance on globally summed counts, and restart
  candidates are drawn from every rank's recent encoder outputs, identically on all ranks.
- Parameters are identical on every rank by construction (DDP broadcasts them once at wrap time and
  all-reduces gradients); a restarted code is written identically on every rank.
"""
from __future__ import annotations

import itertools
import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import UsageError

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = ["rank", "world_size", "is_distributed", "all_reduce_sum", "all_reduce_mean",
           "all_gather_cat", "all_gather_objects", "broadcast_", "run_on_main", "first_on_each_machine", "reduce_scalars", "ddp_kwargs", "process_group_kwargs",
           "init_restarted_process_group", "check_elastic_launch", "average_batchnorm_stats_", "process_state",
           "state_and_device"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if _initialized() else 1


def is_distributed() -> bool:
    """True when there is another process to talk to."""
    return _initialized() and dist.get_world_size() > 1


def process_state() -> PartialState:
    """Accelerate's process state (rank, world size, device, barrier), as the training loop's Accelerator sees it:
    ACCELERATE_USE_CPU=1 (set by `accelerate launch --cpu`) makes a multi-process launch run on CPU processes."""
    from accelerate import PartialState  # deferred: models import this module, not Accelerate
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if world_size() != state.num_processes:
        raise UsageError(f"torch.distributed runs {world_size()} processes but Accelerate sees "
                         f"{state.num_processes}; on a machine without GPUs set ACCELERATE_USE_CPU=1 (or use "
                         f"`accelerate launch --cpu`).")
    return state


def state_and_device(device=None) -> tuple[PartialState, torch.device]:
    """(`process_state()`, the device to run on): `device` when given, else the process's own."""
    state = process_state()
    return state, torch.device(device) if device is not None else state.device


def _comm_device(tensor: Tensor) -> torch.device:
    """Where the backend can reduce: NCCL only handles CUDA tensors, gloo is sure only of CPU ones."""
    backend = dist.get_backend()
    if backend == "nccl":
        return tensor.device if tensor.is_cuda else torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device


def _in_place(tensor: Tensor, collective) -> Tensor:
    """Run `collective(buffer)` on a copy of `tensor` on the backend's device, then write it back into `tensor`."""
    buffer = tensor.to(_comm_device(tensor)).contiguous()
    collective(buffer)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over processes, in place; returns it."""
    if not is_distributed():
        return tensor
    return _in_place(tensor, lambda buffer: dist.all_reduce(buffer, op=dist.ReduceOp.SUM))


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average a floating-point `tensor` over processes, in place; returns it."""
    if not tensor.is_floating_point():
        raise ValueError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}; use all_reduce_sum "
                         "for counts, or cast with .float()")
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor).div_(world_size())


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every process's `tensor` along dim 0, in rank order (a new tensor on `tensor`'s device).

    The first dimension may differ between processes (the other dimensions and the dtype may not): each
    process's rows are padded to the longest for the collective and cut back afterwards.
    """
    if tensor.ndim == 0:
        raise ValueError("all_gather_cat concatenates along dim 0; give it at least a 1-d tensor (t.view(1))")
    if not is_distributed():
        return tensor.clone()
    device = _comm_device(tensor)
    local = tensor.to(device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=device))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]).to(tensor.device)


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` on every process with process `src`'s, in place; returns it."""
    if not is_distributed():
        return tensor
    return _in_place(tensor, lambda buffer: dist.broadcast(buffer, src=src))


def all_gather_objects(value) -> list:
    """Every process's picklable `value`, in rank order (`[value]` in a single process)."""
    if not is_distributed():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


MAIN_WORK_ACK_SECONDS = 300
_main_work = itertools.count()  # every process numbers its `run_on_main` calls alike: they are called in one order


def run_on_main(fn, *args):
    """`fn(*args)` on the main process (rank 0), while the others wait for it without a deadline; returns what `fn`
    returns on the main process, None on the others.

    Work only the main process does (deleting an earlier run, an export, a held-out report) can take longer than
    `--collective-timeout`, which bounds the wait in a collective and so would end the processes that wait for it.
    They wait instead by polling a key of the process group's store, which the main process sets when done. If the
    main process dies, the store (hosted by the main process, or by torchrun's agent, which then ends the group)
    stops answering and they fail at once. If `fn` raises on the main process, every other process raises too: a
    UsageError (the main process prints the user's mistake) or a RuntimeError.
    """
    if not is_distributed():
        return fn(*args)
    key = f"vqhit/main-work-{next(_main_work)}"
    store = dist.distributed_c10d._get_default_store()
    if rank() == 0:
        outcome = "error"
        try:
            result = fn(*args)
            outcome = "done"
            return result
        except UsageError:
            outcome = "usage"
            raise
        finally:
            store.set(key, outcome)
            # The store lives in this process: stay until every other process has read the outcome (they poll, so
            # within moments; one that died is not waited for past MAIN_WORK_ACK_SECONDS).
            deadline = time.monotonic() + MAIN_WORK_ACK_SECONDS
            while store.add(f"{key}/read", 0) < world_size() - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
    while not store.check([key]):
        time.sleep(0.05)
    outcome = store.get(key).decode()
    store.add(f"{key}/read", 1)
    if outcome != "done":
        raise _stop_too(outcome, "the main process")
    return None


@contextmanager
def first_on_each_machine():
    """Run the block on each machine's first process, then on that machine's others: what the first one downloads
    or prepares (a Hub dataset, the table of a folder, in the cache every process of a machine shares) the others
    then find ready. They wait as `run_on_main`'s do, on the store and without a deadline: a download can take
    longer than --collective-timeout. If a first process fails in the block, the others of its machine raise too,
    without entering it: a UsageError (the first process reports the user's mistake) or a RuntimeError."""
    if not is_distributed():
        yield
        return
    key = f"vqhit/first-on-{socket.gethostname()}-{next(_main_work)}"
    store = dist.distributed_c10d._get_default_store()
    if process_state().is_local_main_process:
        outcome = "error"
        try:
            yield
            outcome = "done"
        except UsageError:
            outcome = "usage"
            raise
        finally:
            store.set(key, outcome)
        return
    while not store.check([key]):
        time.sleep(0.05)
    outcome = store.get(key).decode()
    if outcome != "done":
        raise _stop_too(outcome, "the first process of a machine")
    yield


def _stop_too(outcome: str, who: str) -> Exception:
    """What a waiting process raises when `who` (the process it waited for) did not finish: a UsageError when `who`
    stopped on the user's mistake, which `who` reports (so this one stops without a traceback), else a RuntimeError."""
    if outcome == "usage":
        return UsageError(f"{who} stopped on the user's error above; this process stops too")
    return RuntimeError(f"{who} failed (its error is above); this process stops too")


@contextmanager
def leave_process_group():
    """Destroy the process group when the block ends, however it ends (a script's exit, an error, a stop signal).

    A process that exits with the group still up leaves gloo's worker threads holding Python objects while the
    interpreter finalizes, and can then abort (SIGABRT) instead of exiting with its own status."""
    try:
        yield
    finally:
        if _initialized():
            dist.destroy_process_group()


def reduce_scalars(values: dict[str, float | Tensor]) -> dict[str, float]:
    """Mean over processes of every scalar of `values` (floats or one-element tensors), as Python floats.

    One collective for the whole dict (float64), so logging a dozen losses costs one all-reduce. Every
    process must pass the same keys in the same order.
    """
    if not values:
        return {}
    scalars = []
    for key, value in values.items():
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"reduce_scalars: {key!r} has {value.numel()} elements, expected a scalar; "
                                 "reduce it to one number first (e.g. .mean())")
            value = value.detach().reshape(())
        scalars.append(value)
    if is_distributed():
        device = _comm_device(torch.empty(0))
    else:  # where the tensors already are: one device-to-host copy at the end, not one per value
        device = next((v.device for v in scalars if isinstance(v, Tensor)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in scalars])
    all_reduce_mean(stacked)
    return dict(zip(values, stacked.tolist()))


def ddp_kwargs() -> list:
    """Accelerate kwargs handlers for `Accelerator(kwargs_handlers=ddp_kwargs())`: DDP without buffer
    broadcasting (the policy in this module's docstring).

    Recent torch releases warn that `broadcast_buffers` is deprecated in favour of `forward_sync_buffers`, which
    Accelerate's handler does not offer yet; `broadcast_buffers=False` keeps working and means the same here
    (buffers are equal on every rank when the model is wrapped, so skipping the initial sync changes nothing).
    """
    from accelerate.utils import DistributedDataParallelKwargs  # deferred: models import this module, not Accelerate

    return [DistributedDataParallelKwargs(broadcast_buffers=False)]


def process_group_kwargs(timeout_seconds: float) -> list:
    """Accelerate kwargs handlers that bound every collective's wait: when a process dies or hangs, the others fail
    after `timeout_seconds` instead of waiting forever (gloo raises; NCCL's watchdog aborts the process)."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_seconds))]


# torchrun (its c10d rendezvous) keeps one TCP store for every restart of a worker group, and its workers use that
# store as it is. The keys through which the ranks of a process group exchange their addresses are the same in
# every attempt, so the dead attempt's keys are still there when the group restarts: a restarted rank can read a
# dead rank's address before its successor overwrites it, then fail to connect ("Connection refused", and a
# timeout). On one node every worker knows the attempt (torchrun's restart count), and the keys of each attempt go
# under a prefix of their own. Across nodes no value tells the attempt alike on every node (a node whose workers
# did not fail restarts them without counting), so only torchrun can keep the attempts apart: its
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every attempt a new store.
def _restarted_by_torchrun() -> tuple[int, int] | None:
    """(restart count, nodes) when torchrun started this worker on its shared store, else None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ.get("GROUP_WORLD_SIZE", "1"))


def check_elastic_launch() -> None:
    """Refuse, at its first start, a run that torchrun may restart on several nodes with one store for every attempt
    (see above): a restart there fails hours later, with the work since the last checkpoint lost."""
    restarted = _restarted_by_torchrun()
    if restarted is None or restarted[1] == 1 or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return
    raise UsageError("torchrun may restart this run on several nodes with one store for every attempt, where a "
                     "restarted process can read a dead one's address and fail to connect: export "
                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node before torchrun (or give --max-restarts 0)")


def init_restarted_process_group(timeout_seconds: float) -> None:
    """Start torch.distributed in a worker group that torchrun restarted on one node, with every key of this
    attempt under a prefix of its own (see above); elsewhere do nothing, and Accelerate starts it as usual."""
    restarted = _restarted_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if restarted is None or restarted[0] == 0 or restarted[1] != 1 or world < 2 or _initialized():
        return
    from accelerate.utils import parse_flag_from_env

    timeout = timedelta(seconds=timeout_seconds)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    backend = "nccl" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore(f"restart-{restarted[0]}/", store),
                            rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)


def training_accelerator(project_dir: str, grad_accum: int, timeout_seconds: float):
    """The Accelerator of a training run: DDP with the buffer policy above, collectives bounded by
    `timeout_seconds`, in the process group of a restarted elastic attempt when there is one.

    Autocast is vqhit's, not Accelerate's: Accelerate would patch the discriminator's forward with autocast, and R1
    must stay in fp32. So precision, compilation and accumulation are pinned against the launcher's settings, which
    the run's configuration has turned into options (`vqhit.launcher`)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    from .launcher import PINNED_ACCELERATOR_SETTINGS

    init_restarted_process_group(timeout_seconds)
    accelerator = Accelerator(**PINNED_ACCELERATOR_SETTINGS, log_with="tensorboard", project_dir=project_dir,
                              gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum),
                              kwargs_handlers=[*ddp_kwargs(), *process_group_kwargs(timeout_seconds)])
    process_state()  # torchrun's processes that Accelerate took for one each (no GPU, no --cpu)
    return accelerator


@torch.no_grad()
def average_batchnorm_stats_(module: nn.Module, also_sum: Tensor | None = None) -> Tensor | None:
    """Replace every BatchNorm running_mean / running_var in `module` by its mean over processes, in place; returns
    `also_sum` summed over processes, in the same collective (the training step's flags ride along).

    One collective per dtype (one in practice). Call it on every process after the optimiser step; in a single
    process nothing is communicated and `also_sum` is returned as it is.
    """
    if not is_distributed():
        return also_sum
    groups: dict[tuple, list[Tensor]] = {}
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            for stat in (m.running_mean, m.running_var):
                groups.setdefault((stat.dtype, stat.device), []).append(stat)
    if also_sum is not None:
        groups.setdefault((also_sum.dtype, also_sum.device), []).insert(0, also_sum)
    for stats in groups.values():
        flat = all_reduce_sum(torch.cat([s.reshape(-1) for s in stats]))
        for stat, value in zip(stats, flat.split([s.numel() for s in stats])):
            if stat is also_sum:
                also_sum = value.view_as(stat).clone()
            else:
                stat.copy_(value.div_(world_size()).view_as(stat))
    return also_sum
