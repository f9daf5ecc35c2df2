"""Diffusion training as a :class:`engine.trainer.Task`, with the Geometry Forcing alignment when the recipe
turns it on.

The backbone is the recipe's ``model.arch`` (the video DiT under flow matching, or DFoT's U-ViT3D under
DFoT's continuous diffusion), optionally started from ``model.pretrained``. Per micro-batch: this rank's clips from the recipe's data loader (``engine.data``), moved to the device;
per-sample noise drawn from ``(seed, step, clip index)`` (``engine.objectives.video_loss.sample_noise``:
one rank and N ranks with the same global batch see the same noise); the frozen teacher's features
added to the batch (live VGGT or its cache; outside the trained module, never a gradient); then the
trainer calls :class:`engine.objectives.video_loss.VideoDiffusionLoss`. After a step: validation
(``logging.validate_every``) and a sample video (``logging.sample_every`` and at the end).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from geoforge.engine.checkpoint import save_module_weights
from geoforge.engine.config import Recipe
from geoforge.engine.data.builder import build_dataset, build_loader
from geoforge.engine.distributed import ParallelLayout, World
from geoforge.engine.eval.validate import validate, validation_batch, write_sample_video
from geoforge.engine.models.arch import build_model, repeated_blocks
from geoforge.engine.models.uvit3d.checkpoint import load_backbone_weights
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from geoforge.engine.teacher.builder import build_teacher
from geoforge.engine.trainer import MicroBatch, Task, Trainer


class DiffusionTask(Task):
    use_ema = True
    counters = ("skipped_clips",)   # bad clips the dataset passed over (data.on_error: skip)

    def __init__(self, recipe: Recipe, world: World, layout: ParallelLayout | None = None):
        self.recipe, self.world = recipe, world
        # ranks of one sequence-parallel group share clips: the loader splits them over the DP groups
        self.data_parallel = (layout.dp_rank, layout.dp_size) if layout is not None else None
        self.count_clips = layout is None or layout.sp_rank == 0   # a shared clip's bad files counted once
        # the data first: a missing data root or layout fails here, before the teacher and the model are built
        self.dataset = build_dataset(recipe.data, world, recipe.seed)
        gf = recipe.gf
        released = gf.released_size if gf.alignment_form == "as_released" else None
        self.teacher = (build_teacher(recipe.teacher, recipe.data, world.device, seed=recipe.seed,
                                      released_size=released)
                        if gf.enabled else None)   # frozen GF teacher (or its cache), or None
        # identical initial weights on every rank; the trainer then reseeds the global RNG per DP rank
        # (engine.trainer.seed_data_parallel_stream: dropout masks differ between DP ranks)
        torch.manual_seed(recipe.seed)
        backbone = build_model(recipe.model, recipe.backend)   # model.arch: the video DiT or DFoT's U-ViT3D
        if recipe.model.pretrained:
            chosen = load_backbone_weights(recipe.model.pretrained, backbone, recipe.model.pretrained_weights)
            if world.is_main:
                print(f"model.pretrained: loaded {recipe.model.pretrained} ({chosen})")
        dims = None if self.teacher is None else self.teacher.dims
        dfot = recipe.dfot if recipe.model.arch == "uvit3d" else None   # the U-ViT3D: DFoT's continuous diffusion
        self.module = VideoDiffusionLoss(backbone, recipe.objective, gf, dims, recipe.backend, dfot)
        self._val_batch = None
        self._last_batch: dict[str, torch.Tensor] | None = None

    def repeated_blocks(self) -> list[torch.nn.Module]:
        return repeated_blocks(self.module.dit)

    def micro_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        return iter(build_loader(self.recipe.data, self.world, self.recipe.seed, self.recipe.distributed.grad_accum,
                                 start=start, data_parallel=self.data_parallel, dataset=self.dataset))

    def prepare(self, raw: dict[str, torch.Tensor], step: int, timer) -> MicroBatch:
        r, device = self.recipe, self.world.device
        batch = {k: v.to(device, non_blocking=True) for k, v in raw.items() if torch.is_tensor(v)}
        counts = ({"skipped_clips": int(raw["skipped_clips"].sum())}
                  if "skipped_clips" in raw and self.count_clips else {})
        noise = sample_noise(r.objective, r.model.cond_dropout, raw["frames"].shape, raw["index"], r.seed, step)
        noise = {k: v.to(device, non_blocking=True) for k, v in noise.items()}
        timer.mark("data")
        if self.teacher is not None:   # GF targets in the batch (no grad, not trained)
            batch.update(self.teacher(batch))
        timer.mark("teacher")
        self._last_batch = batch
        return MicroBatch((batch, noise), counts)

    def export(self, directory: Path, world: World, zero_stage: int) -> None:
        save_module_weights(directory, self.module, world, zero_stage)

    def after_step(self, trainer: Trainer, step: int, last: bool) -> None:
        logging = self.recipe.logging
        if logging.validate_every and step % logging.validate_every == 0:
            if self._val_batch is None:
                self._val_batch = validation_batch(self.recipe, logging.validate_videos, self.world)
            result = validate(self.module.dit, self._val_batch, self.recipe, step)   # every rank: ZeRO-3 forwards
            trainer.log.validation(result, step)
        if (logging.sample_every and step % logging.sample_every == 0) or last:
            path = write_sample_video(self.module.dit, self._last_batch, self.recipe, trainer.run_dir, step,
                                      self.world)
            trainer.log.info(f"sample video: {path}")


__all__ = ["DiffusionTask"]
