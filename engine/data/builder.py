"""From the recipe's ``data`` section to this rank's DataLoader."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import Recipe
from engine.data.decode import installed
from engine.data.minecraft import MinecraftClips, find_minecraft_clips
from engine.data.re10k import Re10KClips, find_clips
from engine.data.sampler import EpochIndexed, ResumableBatchSampler
from engine.data.synthetic import ensure_synthetic_dataset
from engine.distributed import World, barrier


def build_dataset(recipe: Recipe, world: World) -> torch.utils.data.Dataset:
    data = recipe.data
    if data.kind == "synthetic":
        if world.is_main:   # generated once, atomically, on first use
            ensure_synthetic_dataset(Path(data.root), clips=data.synthetic_clips, frames=data.synthetic_frames,
                                     resolution=data.resolution, seed=recipe.seed, split=data.split)
        barrier()
    common = dict(split=data.split, num_frames=data.frames, frame_skip=data.frame_skip,
                  resolution=data.resolution, seed=recipe.seed, fixed_windows=data.fixed_windows,
                  decode_backend=data.decode_backend, on_error=data.on_error)
    if data.kind == "minecraft":
        return MinecraftClips(data.root, **common)
    return Re10KClips(data.root, hflip_prob=data.hflip_prob, **common)


def clip_names(recipe: Recipe) -> list[str]:
    """The names of the dataset's clips in index order (what a sample's ``index`` refers to), without
    decoding anything: the identity of a data set for caches keyed by clip index."""
    data = recipe.data
    if data.kind == "minecraft":
        return [video.stem for video, _ in find_minecraft_clips(data.root, data.split, data.on_error)]
    return [clip.name for clip in find_clips(data.root, data.split, on_error=data.on_error)[1]]


def uses_dali(recipe: Recipe, world: World) -> bool:
    """Whether training batches are decoded by NVDEC in a DALI pipeline of the main process
    (``engine.data.dali_loader``): ``data.decode_backend`` ``dali`` or ``auto`` on a CUDA device with DALI
    installed. On CPU the DataLoader stays (PyAV, or DALI's CPU decoder for ``dali``, in its workers)."""
    backend = recipe.data.decode_backend
    if world.device.type != "cuda" or backend not in ("dali", "auto"):
        return False
    if backend == "dali" and not installed("dali"):
        raise ValueError("data.decode_backend: dali, but DALI is not installed (pip install nvidia-dali-cuda120)")
    return installed("dali")


def build_loader(recipe: Recipe, world: World, start: int = 0):
    """An endless loader of this rank's micro-batches, starting after ``start`` consumed micro-batches: a
    DataLoader (PyAV / torchcodec in its workers), or on a GPU with DALI the main-process NVDEC loader (same
    plan, order and bad-file handling; ``uses_dali``)."""
    dataset = build_dataset(recipe, world)
    sampler = ResumableBatchSampler(len(dataset), recipe.data.batch_size, recipe.distributed.grad_accum,
                                    world.size, world.rank, seed=recipe.seed, start=start)
    if uses_dali(recipe, world):
        from engine.data.dali_loader import PlannedLoader

        return PlannedLoader(dataset, sampler, prefetch=4, device=world.device)
    workers = recipe.data.num_workers
    return torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=workers,
                                       pin_memory=world.device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)
