"""Process-group set-up shared by the three launchers (python, torchrun, deepspeed).

``python engine/train.py`` has no launcher variables: we fill in a single-rank world on a free local
port so that DeepSpeed's engine (which always wants a process group) works the same way. On a machine
without CUDA, DeepSpeed picks its CPU accelerator and communication goes over gloo.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from geoforge.engine.errors import MissingCapability

log = logging.getLogger("geoforge.distributed")


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    local_size: int
    device: torch.device
    threads: str = ""   # how this process chose its intra-op threads (CPU; empty on CUDA), for the banner

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The one device resolution: ``"auto"`` is CUDA when a CUDA device is available, else the CPU;
    anything else (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) is taken as given."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_threads(requested: int, local_size: int, env: dict[str, str] | None = None,
                cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """Intra-op threads for one of ``local_size`` ranks on this machine, and why (for the banner).

    ``requested`` > 0 (``distributed.threads``) wins, then ``OMP_NUM_THREADS``; otherwise the cores this process
    may run on (its CPU affinity, capped by a cgroup CPU quota) that other processes are keeping busy right now
    (:func:`_busy_elsewhere`; ``load``), split over the local ranks. OpenMP threads on oversubscribed cores wait on
    each other: two threads on a loaded 2-core machine ran a tiny step ~20x slower than one (~10 s instead of
    ~0.5 s); one thread too few costs at most 2x. (A container may see its host's run queue: the banner says what
    was read, and the override.)"""
    env = os.environ if env is None else env
    if requested > 0:
        return requested, f"{requested} (distributed.threads)"
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        n = int(env["OMP_NUM_THREADS"])
        return n, f"{n} (OMP_NUM_THREADS)"
    cores = cores if cores is not None else _usable_cores()
    load = load if load is not None else _busy_elsewhere()
    free = max(1, min(cores, round(cores - load)))
    n = max(1, free // local_size)
    return n, (f"{n} per rank: {cores} core(s) allowed, {load:.1f} busy with other processes, {local_size} local "
               f"rank(s); set distributed.threads or OMP_NUM_THREADS to override")


def _busy_elsewhere(samples: int = 5, interval: float = 0.02) -> float:
    """Threads of other processes running right now: the run queue of ``/proc/loadavg`` (its 4th field,
    ``running/total``) minus this process, averaged over a few samples. Not the 1-minute load average, which
    still counts a job that just finished (back-to-back runs would each see the previous one)."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(open("/proc/loadavg").read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0.0, sum(counts) / len(counts))


def _usable_cores() -> int:
    """The cores this process may run on: its affinity, capped by a cgroup v2 CPU quota (``cpu.max``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def init_world(device: str = "auto", local_rank_arg: int | None = None, threads: int = 0) -> World:
    """Initialise torch.distributed through DeepSpeed and return this process's place in the world. On the CPU,
    set this process's intra-op threads (:func:`cpu_threads`; ``threads``: ``distributed.threads``)."""
    if "RANK" not in os.environ:   # plain `python engine/train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if local_rank_arg is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_arg)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    size = int(os.environ["WORLD_SIZE"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))

    use_cuda = resolve_device(device).type == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise MissingCapability("device: 'cuda' but no CUDA device is available")
    how = ""
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        n, how = cpu_threads(threads, local_size)   # ranks sharing a CPU split its free cores
        torch.set_num_threads(n)
    import deepspeed

    if use_cuda:   # before the process group: NCCL binds each rank's communicator to the current device
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    return World(rank=dist.get_rank(), local_rank=local_rank, size=dist.get_world_size(),
                 local_size=local_size, device=dev, threads=how)


# DeepSpeed's dynamic loss scaling set as torch's GradScaler, which Lightning's "16-mixed" (GF's and DFoT's training
# precision) uses: initial scale 2^16, halved at every overflow (hysteresis 1), doubled after 2000 steps without one
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1,
                     "consecutive_hysteresis": False, "min_loss_scale": 1}


def deepspeed_config(recipe, mode: str = "fp32") -> dict:
    """The DeepSpeed config of a recipe (engine.config.Recipe): micro-batch, accumulation, clipping, ZeRO, and the
    precision ``mode`` DeepSpeed runs, which the trainer picks (``engine.precision``) on CUDA only:

    - ``bf16``: DeepSpeed's bf16 mode (bf16 weights and gradients, fp32 master weights);
    - ``fp16``: DeepSpeed's fp16 mode (fp16 weights and gradients, fp32 master weights) with dynamic loss scaling
      (``loss_scale: 0``; :data:`FP16_LOSS_SCALING`), as GF trained;
    - ``fp32``: neither block enabled (elsewhere bf16 runs as autocast over fp32 weights).
    """
    if mode not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"deepspeed_config: mode must be bf16, fp16 or fp32, got {mode!r}")
    config = {
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_accumulation_steps": recipe.distributed.grad_accum,
        "gradient_clipping": recipe.optimizer.grad_clip,
        "zero_optimization": {"stage": recipe.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if mode == "fp16":
        config["fp16"] = {"enabled": True, **FP16_LOSS_SCALING}
    else:
        config["bf16"] = {"enabled": mode == "bf16"}
    return config


@dataclass(frozen=True)
class ParallelLayout:
    """Data x sequence parallelism: ``dp_size`` groups of ``sp_size`` consecutive ranks; the ranks of a
    sequence-parallel group (``sp_group``, None when sp_size is 1) read the same clips."""

    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    sp_group: object = None

    def describe(self) -> str:
        return f"DP {self.dp_size} x SP {self.sp_size}"


def parallel_layout(world: World, sequence_parallel: int = 1) -> ParallelLayout:
    """Collective (every rank creates every group): the layout of ``distributed.sequence_parallel`` ranks
    per clip. Raises ValueError naming the key if the world size is not a multiple."""
    n = sequence_parallel
    if n < 1 or world.size % n:
        raise ValueError(f"distributed.sequence_parallel: {n} does not divide the world of {world.size} ranks "
                         f"(launch a multiple of {n} processes)")
    group = None
    if n > 1:
        for first in range(0, world.size, n):   # new_group is collective over the whole world
            g = dist.new_group(list(range(first, first + n)))
            if first <= world.rank < first + n:
                group = g
    return ParallelLayout(dp_rank=world.rank // n, dp_size=world.size // n, sp_rank=world.rank % n, sp_size=n,
                          sp_group=group)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    box = [obj]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0],
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over all ranks (one all-reduce); identity on a single rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The sum of each value over all ranks (one all-reduce); identity on a single rank."""
    return {k: v * world_size() for k, v in mean_over_ranks(values).items()}


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_group_holders: list[Callable[[], None]] = []


def on_shutdown(release: Callable[[], None]) -> None:
    """Register ``release``: drops a module's references to process groups (called by :func:`shutdown`)."""
    _group_holders.append(release)


def shutdown() -> int:
    """Tear torch.distributed down so that the interpreter exits cleanly; every entry point and worker ends here.
    Returns the number of process groups still referenced afterwards (0 when every group and its threads are gone).

    ``destroy_process_group`` only unregisters the groups: a gloo group's worker threads stop when its last
    Python reference goes (``~ProcessGroupGloo`` waits for the work in flight and joins them, the GIL released).
    A group still referenced at interpreter exit keeps its threads, and one of them may still be releasing the
    collective that just finished: freeing its tensors takes the GIL, which a finalising interpreter answers
    with ``pthread_exit``, and the unwind through the work's destructor aborts the process ("terminate called
    without an active exception", SIGABRT) after the job's work is done (measured: 7 of 60 runs of a 2-rank
    U-ViT3D worker). So the references are dropped here and the groups destroyed now: this package's
    (:func:`on_shutdown`; the trainer's DeepSpeed hooks: ``Trainer.release``) and the ones libraries keep in
    module globals (:func:`_drop_library_references`). Groups that outlive that (ZeRO-3 keeps its own, see
    ``Trainer.release``) are idle by the end of a short pause with the GIL released, so none is still releasing
    work when the interpreter finalises; the count is logged at debug level."""
    if not dist.is_initialized():
        return 0
    from torch.distributed import distributed_c10d as c10d

    groups = [weakref.ref(g) for g in list(c10d._world.pg_map)]
    dist.destroy_process_group()   # every group, subgroups included
    for release in _group_holders:
        release()
    _drop_library_references()
    gc.collect()   # the last references: each group's destructor joins its threads here
    alive = sum(r() is not None for r in groups)
    if alive:
        log.debug("shutdown: %d process group(s) still referenced; pausing for their threads", alive)
        time.sleep(0.2)   # releases the GIL: the threads finish releasing their last work now
    return alive


def _drop_library_references() -> None:
    """Process groups that libraries keep in module globals past ``destroy_process_group``:

    - ``torch.distributed.nn.functional``: ``def all_reduce(..., group=group.WORLD)`` binds the world group as a
      default argument when the module is first imported after ``init_process_group`` (``torch.utils.checkpoint``
      imports it lazily, through ``torch._dynamo``);
    - ``deepspeed.utils.groups``: the groups DeepSpeed caches (``_WORLD_GROUP``, data / expert parallel ones);
    - ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK``: ZeRO-3 keeps the top module there for good,
      and each of its parameters holds its group (``ds_process_group``)."""
    nnf = sys.modules.get("torch.distributed.nn.functional")
    for fn in vars(nnf).values() if nnf is not None else ():
        defaults = getattr(fn, "__defaults__", None)
        if defaults and any(isinstance(d, dist.ProcessGroup) for d in defaults):
            fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in defaults)
    groups = sys.modules.get("deepspeed.utils.groups")
    for name, value in list(vars(groups).items()) if groups is not None else ():
        if isinstance(value, dist.ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
            value.clear()
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()
