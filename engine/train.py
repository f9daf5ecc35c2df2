"""GeoForge training entry point.

    python engine/train.py --recipe dfot_tiny                       # one process
    torchrun --nproc_per_node 2 engine/train.py --recipe dfot_tiny  # N processes
    deepspeed --num_gpus 2 engine/train.py --recipe dfot_tiny       # DeepSpeed launcher (CPU: gloo)

The same loop runs under all three: recipe -> data -> model + objective -> DeepSpeed engine (ZeRO
stage, bf16, gradient accumulation and clipping, AdamW, warmup + constant/cosine schedule) -> steps,
with a sharded EMA, atomic checkpoints (``--resume auto`` continues exactly), tensorboard events,
``metrics.jsonl``, a progress bar and a sample video at the end.

Exit codes: 0 done, 1 error (non-finite losses, a damaged checkpoint, a failed checkpoint write, the run
directory in use), 2 bad recipe or arguments, 75 preempted by SIGTERM / SIGUSR1 with a complete checkpoint
(``engine/preemption.py``; continue with ``--resume auto``).
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

from engine.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, resume_checkpoint, save_checkpoint
from engine.config import ConfigError, Recipe, load_recipe
from engine.data.builder import build_loader
from engine.distributed import (World, any_rank, broadcast_object, deepspeed_config, init_world, mean_over_ranks,
                                parallel_layout, shutdown)
from engine.ema import ShardedEMA
from engine.eval.validate import validate, validation_batch
from engine.models.attention import attention_backend, set_attention_backend
from engine.models.dit import VideoDiT
from engine.models.sequence_parallel import SequenceParallel, set_sequence_parallel
from engine.models.teacher import build_teacher
from engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from engine.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption, active as active_preemption
from engine.run_dir import RunLog, resolve_run_dir, write_resolved_recipe
from engine.run_lock import RunDirLocked, acquire_run_lock
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
    module = VideoDiffusionLoss(VideoDiT(model_cfg), recipe.objective, recipe.gf, teacher_dims, recipe.backend)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.schedule.lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(recipe), dist_init_required=False)
    return engine


def train(recipe: Recipe, run_dir: Path, resume: str | None, world: World) -> dict:
    layout = parallel_layout(world, recipe.distributed.sequence_parallel)   # DP x SP (Ulysses) groups
    set_sequence_parallel(SequenceParallel(layout.sp_group, layout.sp_size, layout.sp_rank)
                          if layout.sp_size > 1 else None)
    teacher = build_teacher(recipe, world.device)   # frozen GF teacher (or its cache): outside the engine
    engine = build_engine(recipe, world, None if teacher is None else teacher.dims)
    ema = ShardedEMA(engine.module, recipe.ema.decay, world.rank, world.size) if recipe.ema.enabled else None
    log = RunLog(run_dir, world, total_steps=recipe.schedule.steps)
    trained = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    d = recipe.distributed
    log.info(f"GeoForge {recipe.name}: {world.size} rank(s) on {world.device.type} ({layout.describe()}) | "
             f"DeepSpeed ZeRO-{d.zero_stage}"
             f"{' bf16' if d.bf16 else ' fp32'} | {trained / 1e6:.2f}M trained parameters | "
             f"attention: {attention_backend()} | fused kernels: {recipe.backend} | run dir: {run_dir}")

    step, consumed, skipped, bad_clips = 0, 0, 0, 0
    checkpoint = resume_checkpoint(run_dir, resume, world, warn=lambda m: log.info(f"warning: {m}"))   # verified
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine, world, ema)
        step, consumed, skipped = state["step"], state["consumed_micro_batches"], state["skipped_nonfinite"]
        bad_clips = state.get("skipped_clips", 0)
        log.resume_from(step)
        log.info(f"resumed from {checkpoint} at step {step}")
    elif resume == "auto":
        log.info(f"--resume auto: no complete checkpoint in {run_dir}, starting from scratch")

    preempt = active_preemption()   # installed by main() before the DataLoader forks (engine/preemption.py)
    loader = build_loader(recipe, world, start=consumed, data_parallel=(layout.dp_rank, layout.dp_size))
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
        bad_clips += round(parts.pop("skipped_clips") * layout.dp_size)   # all DP groups' bad clips, same on each
        log.step(step, parts, lr=engine.get_lr()[0], skipped_nonfinite=skipped, skipped_clips=bad_clips,
                 every=recipe.logging.every)
        last = step == recipe.schedule.steps
        stop = preempt.agreed() and not last   # preemption hook: SIGTERM/SIGUSR1 on any rank -> save, exit 75
        if step % recipe.logging.checkpoint_every == 0 or last or stop:
            saved = save_checkpoint(run_dir, step, engine, world, recipe.distributed.zero_stage,
                                    {"step": step, "consumed_micro_batches": consumed, "skipped_nonfinite": skipped,
                                     "skipped_clips": bad_clips},
                                    ema=ema, keep=recipe.logging.keep_checkpoints)
        if stop:
            raise Preempted(step, saved, preempt.signal_name)
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
    sp = recipe.distributed.sequence_parallel
    if world.size % sp:   # the one recipe check that needs the world size
        if world.is_main:
            print(f"error: distributed.sequence_parallel: {sp} does not divide the world of {world.size} ranks "
                  f"(launch a multiple of {sp} processes)", file=sys.stderr)
        shutdown()
        return 2
    lock = None
    preempt = Preemption().install()   # SIGTERM / SIGUSR1: finish the step, checkpoint, exit 75
    try:
        set_attention_backend(recipe.attention)
        run_dir = broadcast_object(resolve_run_dir(recipe, args.run_dir, args.resume) if world.is_main else None)
        try:   # one writer per run directory (engine/run_lock.py); released in `finally`
            lock = acquire_run_lock(run_dir, world)
        except RunDirLocked as err:
            if world.is_main:
                print(f"error: {err}", file=sys.stderr)
            return 1
        if world.is_main:
            write_resolved_recipe(recipe, run_dir)
        try:
            if recipe.videogpa is not None:   # VideoGPA post-training: generate -> score -> pairs -> train (DPO)
                from engine.videogpa.pipeline import run_pipeline

                summary = run_pipeline(recipe, run_dir, world, stage=args.stage)
            else:
                summary = train(recipe, run_dir, args.resume, world)
        except (NonFiniteLossError, CheckpointError, CheckpointWriteError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except Preempted as err:   # every rank: the checkpoint is complete
            print(f"rank {world.rank}: {err}", file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
        if world.is_main:
            print(summary["text"])
    finally:
        if lock is not None:
            lock.release()
        preempt.uninstall()
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
