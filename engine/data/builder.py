"""From the recipe's ``data`` section to this rank's DataLoader (the data layer sees its own section, the
seed and the accumulation count; never the whole recipe)."""
from __future__ import annotations

from pathlib import Path

import torch

from geoforge.engine.config import DataConfig
from geoforge.engine.data.decode import installed
from geoforge.engine.data.minecraft import MinecraftClips, find_minecraft_clips
from geoforge.engine.data.re10k import Re10KClips, find_clips
from geoforge.engine.data.sampler import EpochIndexed, ResumableBatchSampler
from geoforge.engine.data.synthetic import ensure_synthetic_dataset
from geoforge.engine.distributed import World, barrier


def build_dataset(data: DataConfig, world: World, seed: int) -> torch.utils.data.Dataset:
    if data.kind == "synthetic":
        if world.is_main:   # generated once, atomically, on first use
            ensure_synthetic_dataset(Path(data.root), clips=data.synthetic_clips, frames=data.synthetic_frames,
                                     resolution=data.resolution, seed=data.scene_seed(seed), split=data.split)
        if world.size > 1:   # the ranks of ``world`` wait for it (a one-process World, e.g. the run report, does not)
            barrier()
    common = dict(split=data.split, num_frames=data.frames, frame_skip=data.frame_skip,
                  resolution=data.resolution, seed=seed, fixed_windows=data.fixed_windows,
                  decode_backend=data.decode_backend, on_error=data.on_error)
    if data.kind == "minecraft":
        return MinecraftClips(data.root, **common)
    return Re10KClips(data.root, hflip_prob=data.hflip_prob, reverse_prob=data.reverse_prob,
                      back_and_forth_prob=data.back_and_forth_prob, frame_skip_increase=data.frame_skip_increase,
                      **common)


def clip_names(data: DataConfig) -> list[str]:
    """The names of the dataset's clips in index order (what a sample's ``index`` refers to), without
    decoding anything: the identity of a data set for caches keyed by clip index."""
    if data.kind == "minecraft":
        return [video.stem for video, _ in find_minecraft_clips(data.root, data.split, data.on_error)]
    return [clip.name for clip in find_clips(data.root, data.split, on_error=data.on_error)[1]]


def uses_dali(data: DataConfig, world: World) -> bool:
    """Whether training batches are decoded by NVDEC in a DALI pipeline of the main process
    (``engine.data.dali_loader``): ``data.decode_backend`` ``dali`` or ``auto`` on a CUDA device with DALI
    installed. On CPU the DataLoader stays (PyAV, or DALI's CPU decoder for ``dali``, in its workers)."""
    backend = data.decode_backend
    if world.device.type != "cuda" or backend not in ("dali", "auto"):
        return False
    if backend == "dali" and not installed("dali"):
        raise ValueError("data.decode_backend: dali, but DALI is not installed (pip install nvidia-dali-cuda120)")
    return installed("dali")


def build_loader(data: DataConfig, world: World, seed: int, grad_accum: int = 1, start: int = 0,
                 data_parallel: tuple[int, int] | None = None, dataset: torch.utils.data.Dataset | None = None):
    """An endless loader of this rank's micro-batches (``grad_accum`` per optimizer step), starting after
    ``start`` consumed micro-batches: a DataLoader (PyAV / torchcodec in its workers), or on a GPU with DALI
    the main-process NVDEC loader (same plan, order and bad-file handling; :func:`uses_dali`).
    ``data_parallel = (dp_rank, dp_size)`` when ranks share clips (sequence parallelism); default
    ``(world.rank, world.size)``. ``dataset``: :func:`build_dataset`'s, when the caller built it already.
    With ``data.frame_skip_increase`` the sampler's items carry their sub-epoch: ``data.subepoch_samples`` rounded up
    to whole optimizer steps of the global batch (``DataConfig.subepoch_steps``)."""
    dataset = dataset if dataset is not None else build_dataset(data, world, seed)
    dp_rank, dp_size = data_parallel or (world.rank, world.size)
    sampler = ResumableBatchSampler(len(dataset), data.batch_size, grad_accum, dp_size, dp_rank, seed=seed,
                                    start=start,
                                    subepoch_steps=data.subepoch_steps(data.batch_size * grad_accum * dp_size))
    if uses_dali(data, world):
        from geoforge.engine.data.dali_loader import PlannedLoader

        return PlannedLoader(dataset, sampler, prefetch=4, device=world.device)
    workers = data.num_workers
    return torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=workers,
                                       pin_memory=world.device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None,
                                       worker_init_fn=ignore_stop_signals if workers > 0 else None)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGUSR1: a cluster signals the whole process group, and the
    trainer (engine/preemption.py) finishes its step and checkpoints before exiting; torch's worker
    handler would otherwise die on SIGTERM and fail the step. The workers still exit with the trainer."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
