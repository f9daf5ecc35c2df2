"""GeoForge training entry point.

    python engine/train.py --recipe dfot_tiny                       # one process
    torchrun --nproc_per_node 2 engine/train.py --recipe dfot_tiny  # N processes
    deepspeed --num_gpus 2 engine/train.py --recipe dfot_tiny       # DeepSpeed launcher (CPU: gloo)

The same loop runs under all three: recipe -> data -> model + objective -> DeepSpeed engine (ZeRO
stage, bf16, gradient accumulation and clipping, AdamW, warmup + constant/cosine schedule) -> steps,
with a sharded EMA, atomic checkpoints (``--resume auto`` continues exactly), tensorboard events,
``metrics.jsonl``, a progress bar and a sample video at the end.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a script: engine/ must not shadow top-level modules
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch

from engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engine.config import ConfigError, Recipe, load_recipe
from engine.data.builder import build_loader
from engine.distributed import (World, any_rank, broadcast_object, deepspeed_config, init_world, mean_over_ranks,
                                shutdown)
from engine.ema import ShardedEMA
from engine.eval.validate import validate, validation_batch
from engine.models.attention import attention_backend, set_attention_backend
from engine.eval.weights import load_backbone_weights
from engine.models.arch import build_model
from engine.models.teacher import build_teacher
from engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from engine.run_dir import RunLog, resolve_run_dir, write_resolved_recipe
from engine.samples import write_sample_video


class NonFiniteLossError(RuntimeError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="gf_tiny", help="recipe name in recipes/ or a path to a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optimizer.lr=1e-4 (repeatable)")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint path")
    p.add_argument("--stage", default=None, choices=("generate", "score", "pairs", "train"),
                   help="VideoGPA recipes: run only this stage (default: every pending stage in order)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_engine(recipe: Recipe, world: World, teacher_dims: dict[str, int] | None = None):
    """DiT + objective wrapped in a DeepSpeed engine with a client AdamW and LR schedule."""
    import deepspeed

    torch.manual_seed(recipe.seed)   # identical initial weights on every rank
    model_cfg = recipe.model
    model_cfg.activation_checkpointing = recipe.distributed.activation_checkpointing
    backbone = build_model(model_cfg)   # model.arch: the video DiT or DFoT's U-ViT3D
    if model_cfg.pretrained:
        chosen = load_backbone_weights(model_cfg.pretrained, backbone, model_cfg.pretrained_weights)
        if world.is_main:
            print(f"model.pretrained: loaded {model_cfg.pretrained} ({chosen})")
    dfot = recipe.dfot if model_cfg.arch == "uvit3d" else None   # U-ViT3D: DFoT's continuous diffusion
    module = VideoDiffusionLoss(backbone, recipe.objective, recipe.gf, teacher_dims, recipe.backend, dfot)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.schedule.lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(recipe), dist_init_required=False)
    return engine


def train(recipe: Recipe, run_dir: Path, resume: str | None, world: World) -> dict:
    teacher = build_teacher(recipe, world.device)   # frozen GF teacher (or its cache): outside the engine
    engine = build_engine(recipe, world, None if teacher is None else teacher.dims)
    ema = ShardedEMA(engine.module, recipe.ema.decay, world.rank, world.size) if recipe.ema.enabled else None
    log = RunLog(run_dir, world, total_steps=recipe.schedule.steps)
    trained = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    d = recipe.distributed
    log.info(f"GeoForge {recipe.name}: {world.size} rank(s) on {world.device.type} | DeepSpeed ZeRO-{d.zero_stage}"
             f"{' bf16' if d.bf16 else ' fp32'} | {trained / 1e6:.2f}M trained parameters | "
             f"attention: {attention_backend()} | fused kernels: {recipe.backend} | run dir: {run_dir}")

    step, consumed, skipped, bad_clips = 0, 0, 0, 0
    checkpoint = None
    if resume == "auto":
        checkpoint = latest_checkpoint(run_dir)
    elif resume:
        checkpoint = Path(resume)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine, world, ema)
        step, consumed, skipped = state["step"], state["consumed_micro_batches"], state["skipped_nonfinite"]
        bad_clips = state.get("skipped_clips", 0)
        log.resume_from(step)
        log.info(f"resumed from {checkpoint} at step {step}")
    elif resume == "auto":
        log.info(f"--resume auto: no complete checkpoint in {run_dir}, starting from scratch")

    loader = build_loader(recipe, world, start=consumed)
    batches = iter(loader)
    accum = recipe.distributed.grad_accum
    in_a_row = 0
    started = time.perf_counter()
    log.start_progress(step)
    val_batch = (validation_batch(recipe, recipe.logging.validate_videos, world)
                 if recipe.logging.validate_every else None)
    while step < recipe.schedule.steps:
        parts_sum: dict[str, float] = {}
        micro, bad_here = 0, 0
        while micro < accum:
            batch = {k: v.to(world.device) for k, v in next(batches).items() if torch.is_tensor(v)}
            if "skipped_clips" in batch:   # bad clips the dataset passed over (data.on_error: skip)
                bad_here += int(batch["skipped_clips"].sum())
            if teacher is not None:   # GF targets in the batch (no grad, not trained)
                batch.update(teacher(batch))
            consumed += 1
            noise = sample_noise(recipe.objective, recipe.model.cond_dropout, batch["frames"].shape,
                                 batch["index"].cpu(), recipe.seed, step)
            noise = {k: v.to(world.device) for k, v in noise.items()}
            out = engine(batch, noise)
            if any_rank(not torch.isfinite(out["loss"]).item()):
                skipped += 1
                in_a_row += 1
                log.warn_once("nonfinite", f"non-finite loss at step {step}: the micro-batch is skipped "
                                           f"(counted in metrics as skipped_nonfinite)")
                if in_a_row >= recipe.logging.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{in_a_row} non-finite losses in a row (logging.max_nonfinite="
                        f"{recipe.logging.max_nonfinite}) at step {step}: stopping. Lower optimizer.lr, "
                        f"check the data, or resume from the last checkpoint.")
                continue
            in_a_row = 0
            engine.backward(out["loss"])
            engine.step()
            micro += 1
            for k, v in out.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach())
        step += 1
        if ema is not None:
            ema.update()
        parts = mean_over_ranks({**{k: v / accum for k, v in parts_sum.items()}, "skipped_clips": bad_here})
        bad_clips += round(parts.pop("skipped_clips") * world.size)   # all ranks' bad clips, the same on each
        log.step(step, parts, lr=engine.get_lr()[0], skipped_nonfinite=skipped, skipped_clips=bad_clips,
                 every=recipe.logging.every)
        last = step == recipe.schedule.steps
        if step % recipe.logging.checkpoint_every == 0 or last:
            save_checkpoint(run_dir, step, engine, world, recipe.distributed.zero_stage,
                            {"step": step, "consumed_micro_batches": consumed, "skipped_nonfinite": skipped,
                             "skipped_clips": bad_clips},
                            ema=ema, keep=recipe.logging.keep_checkpoints)
        if val_batch is not None and step % recipe.logging.validate_every == 0:
            result = validate(engine.module.dit, val_batch, recipe, step)   # every rank: ZeRO-3 forwards
            log.validation(result, step)
        if (recipe.logging.sample_every and step % recipe.logging.sample_every == 0) or last:
            path = write_sample_video(engine.module.dit, batch, recipe, run_dir, step, world)
            log.info(f"sample video: {path}")
    return log.finish(time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)   # fails before any compute
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stage and recipe.videogpa is None:
        print(f"error: --stage {args.stage}: recipe {recipe.name!r} has no videogpa section", file=sys.stderr)
        return 2
    world = init_world(recipe.device, args.local_rank)
    try:
        set_attention_backend(recipe.attention)
        run_dir = broadcast_object(resolve_run_dir(recipe, args.run_dir, args.resume) if world.is_main else None)
        if world.is_main:
            write_resolved_recipe(recipe, run_dir)
        try:
            if recipe.videogpa is not None:   # VideoGPA post-training: generate -> score -> pairs -> train (DPO)
                from engine.videogpa.pipeline import run_pipeline

                summary = run_pipeline(recipe, run_dir, world, stage=args.stage)
            else:
                summary = train(recipe, run_dir, args.resume, world)
        except NonFiniteLossError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if world.is_main:
            print(summary["text"])
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
