"""From the recipe's ``data`` section to this rank's DataLoader."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import Recipe
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
        if world.size > 1:   # the ranks of ``world`` wait for it (a one-process World, e.g. the run report, does not)
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


def build_loader(recipe: Recipe, world: World, start: int = 0) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's micro-batches, starting after ``start`` consumed micro-batches."""
    dataset = build_dataset(recipe, world)
    sampler = ResumableBatchSampler(len(dataset), recipe.data.batch_size, recipe.distributed.grad_accum,
                                    world.size, world.rank, seed=recipe.seed, start=start)
    workers = recipe.data.num_workers
    return torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=workers,
                                       pin_memory=world.device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)
