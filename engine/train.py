"""GeoForge training entry point.

    python engine/train.py --recipe dfot_tiny                       # one process
    torchrun --nproc_per_node 2 engine/train.py --recipe dfot_tiny  # N processes
    deepspeed --num_gpus 2 engine/train.py --recipe dfot_tiny       # DeepSpeed launcher (CPU: gloo)

The same code runs under all three: recipe (``engine.config``) -> the diffusion task
(``engine.diffusion_task``: data, teacher, DiT + flow matching + Geometry Forcing) -> the one trainer
(``engine.trainer``: DeepSpeed engine with the ZeRO stage, bf16, gradient accumulation and clipping,
AdamW, warmup + constant/cosine schedule; sharded EMA, atomic checkpoints that ``--resume auto``
continues exactly, tensorboard events, ``metrics.jsonl``, a progress bar) -> a sample video at the end.
VideoGPA recipes run their stages (``engine.videogpa.pipeline``), whose DPO stage uses the same trainer.

Exit codes: 0 done, 1 error (non-finite losses, a damaged checkpoint, a failed checkpoint write, the run
directory in use), 2 a user error (``engine.errors``: bad recipe or arguments, a missing input or capability; one
``error:`` line), 75 preempted by SIGTERM / SIGUSR1 with a complete checkpoint (``engine/preemption.py``; continue
with ``--resume auto``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a script: engine/ must not shadow top-level modules
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]


from geoforge.engine.checkpoint import CheckpointError, CheckpointWriteError
from geoforge.engine.config import ConfigError, Recipe, load_recipe, toy_twin
from geoforge.engine.diffusion_task import DiffusionTask
from geoforge.engine.distributed import World, broadcast_object, init_world, parallel_layout, shutdown
from geoforge.engine.errors import UserError
from geoforge.engine.eval.run_report import write_run_report
from geoforge.engine.models.attention import attention_backend, set_attention_backend
from geoforge.engine.models.sequence_parallel import SequenceParallel, set_sequence_parallel
from geoforge.engine.precision import resolve_precision, use_precision
from geoforge.engine.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption
from geoforge.engine.run_dir import resolve_run_dir, write_resolved_recipe
from geoforge.engine.run_lock import RunDirLocked, acquire_run_lock
from geoforge.engine.trainer import NonFiniteLossError, Trainer


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


def train(recipe: Recipe, run_dir: Path, resume: str | None, world: World) -> dict:
    """Diffusion training (flow matching, + Geometry Forcing when ``gf.enabled``) through the one trainer."""
    layout = parallel_layout(world, recipe.distributed.sequence_parallel)   # DP x SP (Ulysses) groups
    set_sequence_parallel(SequenceParallel(layout.sp_group, layout.sp_size, layout.sp_rank)
                          if layout.sp_size > 1 else None)
    trainer = Trainer(recipe, DiffusionTask(recipe, world, layout), run_dir, world)
    d = recipe.distributed
    trainer.log.info(f"GeoForge {recipe.name}: {world.size} rank(s) on {world.device.type} ({layout.describe()}) | "
                     f"DeepSpeed ZeRO-{d.zero_stage} | {trainer.describe_precision()} | "
                     f"{trainer.trained_parameters / 1e6:.2f}M trained parameters | attention: "
                     f"{attention_backend()} | fused kernels: {recipe.backend}"
                     f"{' | torch.compile: blocks' if d.compile else ''}"
                     f"{f' | threads: {world.threads}' if world.threads else ''} | run dir: {run_dir}")
    trainer.resume(resume)
    summary = trainer.fit()
    trainer.release()
    write_run_report(recipe, run_dir, world)   # report.md: loss curves, frame strips, PSNR/SSIM vs trivial baselines
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run, and report a user error (``engine.errors``: a bad key, a missing input, a missing capability) as one
    ``error:`` line on rank 0 with what to do next, exit 2; a bug keeps its traceback."""
    args = parse_args(argv)
    recipe = None
    try:
        recipe = load_recipe(args.recipe, args.overrides)   # fails before any compute
        return run(args, recipe)
    except UserError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}{what_next(err, recipe)}", file=sys.stderr)
        return 2


def what_next(err: UserError, recipe: Recipe | None) -> str:
    """The hint after a user error: what the recipe needs and its toy twin, for errors of the machine or inputs."""
    if recipe is None or isinstance(err, ConfigError):
        return ""
    needs = f"; {recipe.name} needs {recipe.needs}" if recipe.needs else ""
    twin = toy_twin(recipe)
    toy = f"; on this machine try its toy twin: deepspeed engine/train.py --recipe {twin}" if twin != recipe.name else ""
    return needs + toy


def run(args: argparse.Namespace, recipe: Recipe) -> int:
    """One run of a loaded recipe; returns the exit code (user errors propagate to :func:`main`)."""
    if args.stage and recipe.videogpa is None:
        raise ConfigError(f"--stage {args.stage}: recipe {recipe.name!r} has no videogpa section")
    if recipe.needs and int(os.environ.get("RANK", "0")) == 0:
        print(f"{recipe.name} needs {recipe.needs}", flush=True)
    world = init_world(recipe.device, args.local_rank, recipe.distributed.threads)
    lock = None
    preempt = Preemption().install()   # SIGTERM / SIGUSR1: finish the step, checkpoint, exit 75
    try:
        sp = recipe.distributed.sequence_parallel
        if world.size % sp:   # the one recipe check that needs the world size
            raise ConfigError(f"distributed.sequence_parallel: {sp} does not divide the world of {world.size} ranks "
                              f"(launch a multiple of {sp} processes)")
        # every network of this process runs in the recipe's precision (engine/precision.py)
        with use_precision(resolve_precision(recipe.distributed.precision, world.device)):
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
                    from geoforge.engine.videogpa.pipeline import run_pipeline

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
