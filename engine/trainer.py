"""The one training loop of GeoForge, for diffusion training and for DPO: build -> train_step -> resume /
checkpoint / log.

A :class:`Task` says *what* is trained: the module DeepSpeed wraps, the stream of micro-batches, how one
micro-batch becomes the module's outputs, which weights a checkpoint exports and what to do after a
step (validation, sample videos). The :class:`Trainer` owns *how*, once for every task:

- **build**: a client ``torch.optim.AdamW`` over the trainable parameters, the recipe's warm-up +
  constant / cosine schedule (a warm-up longer than the run is allowed and named in a warning: the learning
  rate never reaches its peak), and ``deepspeed.initialize`` (the only call in the code base) with the
  recipe's ZeRO stage, gradient accumulation and clipping; activation checkpointing of the
  task's blocks (``distributed.activation_checkpointing``) and ``torch.compile`` of them (``distributed.compile``)
  are applied here, from outside the model;
- **random streams**: the task builds its module under the same seed on every rank (identical initial
  weights); once everything is built, the global torch RNG is reseeded per data-parallel rank
  (:func:`seed_data_parallel_stream`), so dropout and every other stochastic layer draw different masks on
  different DP ranks and the same on the ranks of one sequence-parallel group;
- **precision**: the process's (``engine.precision``, installed by the entry point): under bf16 the forward
  runs under autocast over fp32 weights, optimizer state and EMA - on CUDA, DeepSpeed's bf16 mode instead;
  fp16 (CUDA only) is DeepSpeed's fp16 mode with dynamic loss scaling and the forward under fp16 autocast, as
  GF's Lightning ``16-mixed`` trained (a step whose gradients overflow is skipped by DeepSpeed, which lowers
  the scale; the learning-rate schedule does not advance on it);
- **train_step**: ``grad_accum`` micro-batches through ``engine(...)``, ``backward``, ``step``; the
  sharded EMA after the optimizer step; loss parts averaged over micro-batches and ranks;
- **one non-finite policy**: a micro-batch whose loss is not finite on any rank is dropped on every rank
  (no backward, no optimizer step) and replaced by the next one, counted as ``skipped_nonfinite``;
  ``logging.max_nonfinite`` in a row raise :class:`NonFiniteLossError`;
- **one checkpoint writer** (:meth:`Trainer.save`): ``checkpoints/step_N`` written atomically
  (``engine.checkpoint.atomic_checkpoint_dir``) with the DeepSpeed state (frozen weights excluded),
  each rank's RNG (CPU and CUDA), the task's exported weights, the EMA and ``trainer_state.json``; **resume**
  (:meth:`Trainer.resume`) restores all of it and the data position, so a resumed run reproduces the
  uninterrupted one;
- **preemption**: SIGTERM / SIGUSR1 (``engine.preemption``) finish the current step on every rank, write a
  complete checkpoint and raise :class:`engine.preemption.Preempted` (``engine/train.py`` exits 75);
- **log**: ``metrics.jsonl``, tensorboard and the progress bar through :class:`engine.run_dir.RunLog`.

Phases of a micro-step can be timed from outside (``profiling/bench_train.py``) by passing ``timer``: an
object whose ``mark(phase)`` is called at the end of each phase - ``data`` and ``teacher`` by the task's
:meth:`Task.prepare`, then ``forward``, ``backward`` and ``optimizer`` here.
"""
from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from geoforge.engine import preemption
from geoforge.engine.checkpoint import atomic_checkpoint_dir, load_checkpoint, resume_checkpoint, write_checkpoint_files
from geoforge.engine.config import Recipe
from geoforge.engine.distributed import World, any_rank, deepspeed_config, mean_over_ranks, sum_over_ranks
from geoforge.engine.ema import ShardedEMA
from geoforge.engine.models.attention import attention_report
from geoforge.engine.models.checkpointing import enable_activation_checkpointing
from geoforge.engine.models.compiled import compile_blocks
from geoforge.engine.precision import FP32, autocast, check_fp16_device, current_precision
from geoforge.engine.run_dir import RunLog


class NonFiniteLossError(RuntimeError):
    pass


def data_parallel_stream_seed(seed: int, dp_rank: int) -> int:
    """The seed of data-parallel rank ``dp_rank``'s stream of a run seeded ``seed`` (63 bits, any ints)."""
    digest = hashlib.sha256(f"geoforge.dp_stream:{seed}:{dp_rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_data_parallel_stream(seed: int, dp_rank: int) -> int:
    """Reseed the global torch RNG (CPU and every CUDA device) with :func:`data_parallel_stream_seed`; returns it.

    Called by the trainer once the task's module, the optimizer, DeepSpeed's engine and the EMA are built.
    Before: every rank seeds ``torch.manual_seed(seed)`` and builds its module from that one stream, so initial
    weights are identical on every rank (DeepSpeed also broadcasts rank 0's). Left there, the ranks would go on
    drawing the same numbers, and ``nn.Dropout`` (the U-ViT3D's ``block_dropouts``, DFoT's RE10K model: 0.1)
    would drop the same positions on every DP rank, on different clips. After: one stream per *data-parallel*
    rank, derived from ``(seed, dp_rank)``, so the ranks of one sequence-parallel group (same ``dp_rank``, other
    ``sp_rank``) keep sharing one stream, as their replicated computation needs (``engine.models.sequence_parallel``;
    the U-ViT3D forks each slice's dropout off it by ``sp_rank``). A one-rank run draws DP rank 0's stream.

    Why reseeding the global RNG, and why it leaves a model without dropout exactly as it was: nothing else of
    a training step draws from the global RNG. The per-frame times, the context frames, the Gaussian noise and
    the conditioning drop come from a generator per sample seeded by ``(seed, step, dataset index)``
    (``engine.objectives.video_loss.sample_noise``; DPO: ``pair_noise``), the clip windows and flips from
    ``(seed, epoch, index)`` (``engine.data``), the data order from ``(seed, epoch)`` (``ResumableBatchSampler``),
    validation and sample videos from their own generators; the DataLoader's one draw for its workers' base seed
    is taken outside the stream (:meth:`Trainer._next_micro_batch`). So those streams are the same as before
    and the losses of a run without stochastic layers do not change (``tests/engine/test_dp_stream.py`` trains
    both ways and compares). A separate ``torch.Generator`` would not do instead: ``nn.Dropout`` /
    ``F.dropout`` and the fused attention's dropout take none, they draw from the global (device) RNG.
    Resume restores each rank's saved CPU and CUDA states over this seed (``engine.checkpoint``)."""
    value = data_parallel_stream_seed(seed, dp_rank)
    torch.manual_seed(value)   # the CPU generator and every CUDA device's
    return value


@dataclass
class MicroBatch:
    """One micro-batch as the task prepared it: the engine's call arguments plus host-side counts and metrics."""

    args: tuple[Any, ...]
    counts: dict[str, int] = field(default_factory=dict)   # cumulative counters (e.g. skipped_clips)
    metrics: dict[str, float] = field(default_factory=dict)   # logged means (e.g. winner_score)


class Task(ABC):
    """What the trainer trains. Subclasses: :class:`engine.diffusion_task.DiffusionTask` (flow matching or DFoT's
    diffusion, + GF) and :class:`engine.videogpa.train_dpo.DPOTask` (Diffusion-DPO)."""

    module: nn.Module           # what DeepSpeed wraps
    use_ema: bool = False
    # (dp_rank, dp_size) when the ranks of a sequence-parallel group share clips; None: (world.rank, world.size)
    data_parallel: tuple[int, int] | None = None
    counters: tuple[str, ...] = ()   # names of MicroBatch.counts, kept cumulative in checkpoints

    def repeated_blocks(self) -> list[nn.Module]:
        """The repeated blocks that ``distributed.activation_checkpointing`` recomputes in backward and
        ``distributed.compile`` compiles."""
        return []

    def enable_activation_checkpointing(self) -> None:
        """Default: recompute each of :meth:`repeated_blocks` in backward."""
        blocks = self.repeated_blocks()
        if not blocks:
            raise NotImplementedError(f"{type(self).__name__}: no blocks to checkpoint")
        enable_activation_checkpointing(blocks)

    def compile_blocks(self) -> int:
        """Default: ``torch.compile`` each of :meth:`repeated_blocks` in place (``engine.models.compiled``)."""
        blocks = self.repeated_blocks()
        if not blocks:
            raise NotImplementedError(f"{type(self).__name__}: no blocks to compile (distributed.compile)")
        return compile_blocks(blocks)

    @abstractmethod
    def micro_batches(self, start: int) -> Iterator[Any]:
        """An endless stream of this rank's raw micro-batches, after ``start`` consumed ones."""

    @abstractmethod
    def prepare(self, raw: Any, step: int, timer) -> MicroBatch:
        """Move a raw micro-batch to the device, draw its noise (and teacher features); ``timer.mark`` the
        ``data`` phase (and ``teacher``)."""

    def export(self, directory: Path, world: World, zero_stage: int) -> None:
        """Write the trained weights into a checkpoint directory (collective). Default: nothing."""

    def after_step(self, trainer: Trainer, step: int, last: bool) -> None:
        """Hook after each optimizer step (validation, samples). Default: nothing."""


class _NoTimer:
    def mark(self, phase: str) -> None:
        pass


class Trainer:
    def __init__(self, recipe: Recipe, task: Task, run_dir: Path, world: World, timer=None):
        self.recipe, self.task, self.world = recipe, task, world
        self.run_dir = Path(run_dir)
        self.timer = timer or _NoTimer()
        self.precision = current_precision()
        if self.precision.fp16:
            check_fp16_device(world.device)   # one line naming distributed.precision: fp16 is CUDA's
        # bf16 on CUDA is DeepSpeed's bf16 mode (engine.precision says why); elsewhere autocast around the forward.
        # fp16 (CUDA) is DeepSpeed's fp16 mode + dynamic loss scaling, its forward under fp16 autocast
        self.deepspeed_mode = (self.precision.name if world.device.type == "cuda" and self.precision.name in
                               ("bf16", "fp16") else "fp32")
        self.deepspeed_bf16 = self.deepspeed_mode == "bf16"
        self.engine = self._build()
        self.ema = (ShardedEMA(self.engine.module, recipe.ema.decay, world.rank, world.size, recipe.ema.warmup)
                    if task.use_ema and recipe.ema.enabled else None)
        self.log = RunLog(self.run_dir, world, total_steps=recipe.schedule.steps)
        # everything is built, from the seed every rank shares: from here one stream per DP rank (dropout)
        self.dp_rank = task.data_parallel[0] if task.data_parallel is not None else world.rank
        self.stream_seed = seed_data_parallel_stream(recipe.seed, self.dp_rank)
        never_peaks = recipe.schedule.never_peaks(recipe.optimizer.lr)
        if never_peaks:
            self.log.info(f"warning: {never_peaks}")
        self.step = 0
        self.consumed = 0
        self.counts: dict[str, int] = {"skipped_nonfinite": 0, **{k: 0 for k in task.counters}}
        self._in_a_row = 0
        self._batches: Iterator[Any] | None = None

    # --------------------------------------------------------------------------------------- build
    def _build(self):
        import deepspeed

        d = self.recipe.distributed
        if d.activation_checkpointing:
            self.task.enable_activation_checkpointing()
        if d.compile:   # after checkpointing: a checkpointed block is compiled as one region
            self.task.compile_blocks()
        params = [p for p in self.task.module.parameters() if p.requires_grad]
        opt = self.recipe.optimizer
        optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.recipe.schedule.lr_factor)
        engine, _, _, _ = deepspeed.initialize(model=self.task.module, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(self.recipe, self.deepspeed_mode),
                                               dist_init_required=False)
        return engine

    def describe_precision(self) -> str:
        """The banner's words: which precision trains, how, and why."""
        if self.precision.fp16:
            how = "DeepSpeed fp16 mode, dynamic loss scaling, fp16 autocast"
        elif self.precision.bf16:
            how = "DeepSpeed bf16 mode" if self.deepspeed_bf16 else "autocast over fp32 weights"
        else:
            how = "fp32"
        return f"precision {self.precision.name} ({how}; {self.precision.reason})"

    @property
    def trained_parameters(self) -> int:
        # ZeRO-3 partitions parameters (their numel() is then 0 here): ds_numel is the full size
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters() if p.requires_grad)

    # -------------------------------------------------------------------------------------- resume
    def resume(self, resume: str | None) -> Path | None:
        """Restore from ``resume``: 'auto' = the newest complete checkpoint of the run that verifies against its
        manifest (damaged newer ones are named in a warning and skipped), or a path, which must verify."""
        checkpoint = resume_checkpoint(self.run_dir, resume, self.world,
                                       warn=lambda m: self.log.info(f"warning: {m}"))
        if checkpoint is None:
            if resume == "auto":
                self.log.info(f"--resume auto: no complete checkpoint in {self.run_dir}, starting from scratch")
            return None
        frozen = any(not p.requires_grad for p in self.engine.module.parameters())
        state = load_checkpoint(checkpoint, self.engine, self.world, self.ema, strict=not frozen)
        self.step, self.consumed = state["step"], state["consumed_micro_batches"]
        for k in self.counts:
            self.counts[k] = state.get(k, 0)
        self.log.resume_from(self.step)
        self.log.info(f"resumed from {checkpoint} at step {self.step}")
        return checkpoint

    # ------------------------------------------------------------------------------------ training
    def _next_micro_batch(self) -> MicroBatch:
        if self._batches is None:
            # outside the RNG stream: a DataLoader draws its workers' base seed from the global RNG when its
            # iterator is made, at the first step of a run and again after a resume (it would shift the dropout
            # masks of a resumed run by one draw)
            with torch.random.fork_rng(devices=[]):
                self._batches = iter(self.task.micro_batches(self.consumed))
        raw = next(self._batches)
        self.consumed += 1
        return self.task.prepare(raw, self.step, self.timer)

    def _skip_nonfinite(self) -> None:
        self.counts["skipped_nonfinite"] += 1
        self._in_a_row += 1
        self.log.warn_once("nonfinite", f"non-finite loss at step {self.step}: the micro-batch is skipped "
                                        f"(counted in metrics as skipped_nonfinite)")
        limit = self.recipe.logging.max_nonfinite
        if self._in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self._in_a_row} non-finite losses in a row (logging.max_nonfinite={limit}) at step "
                f"{self.step}: stopping. Lower optimizer.lr, check the data, or resume from the last checkpoint.")

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` good micro-batches; returns the rank-mean loss parts."""
        accum = self.recipe.distributed.grad_accum
        sums: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        counts = {k: 0 for k in self.task.counters}
        began = time.perf_counter()
        micro = 0
        while micro < accum:
            batch = self._next_micro_batch()
            for k, v in batch.counts.items():
                counts[k] += v
            with autocast(self.world.device, FP32 if self.deepspeed_bf16 else self.precision):
                out = self.engine(*batch.args)
            self.timer.mark("forward")
            if any_rank(not torch.isfinite(out["loss"]).item()):
                self._skip_nonfinite()
                continue
            self._in_a_row = 0
            self.engine.backward(out["loss"])
            self.timer.mark("backward")
            self.engine.step()
            self.timer.mark("optimizer")
            micro += 1
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0) + v.detach().float()
            for k, v in batch.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        keys = sorted(sums)
        local = torch.stack([sums[k] for k in keys]).cpu().tolist() if keys else []   # one host sync
        parts = mean_over_ranks({**{k: v / accum for k, v in zip(keys, local)},
                                 **{k: v / accum for k, v in metrics.items()}})
        for k, v in sum_over_ranks(counts).items():
            self.counts[k] += int(round(v))
        parts["step_seconds"] = time.perf_counter() - began
        return parts

    def save(self) -> Path:
        """Checkpoint ``step`` atomically (collective): DeepSpeed state, RNG, exported weights, EMA, state."""
        d = self.recipe.distributed
        state = {"step": self.step, "consumed_micro_batches": self.consumed, **self.counts}
        with atomic_checkpoint_dir(self.run_dir, self.step, self.world, self.recipe.logging.keep_checkpoints) as tmp:
            self.engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
            self.task.export(tmp, self.world, d.zero_stage)
            write_checkpoint_files(tmp, self.world, state, self.ema)
        return self.run_dir / "checkpoints" / f"step_{self.step}"

    def close(self) -> None:
        """Release the data stream now: a DataLoader iterator left for interpreter exit would be joined there
        while its workers ignore SIGTERM (they must survive a preemption signal to the process group)."""
        self._batches = None

    def release(self) -> None:
        """Remove DeepSpeed's hooks (``DeepSpeedEngine.destroy``) so the engine, the model and the process groups
        they hold can be freed: the hooks live on tensors and modules in C++, where Python's collector cannot
        break the cycles through them, so without this they live until the interpreter exits (and a gloo
        group's threads with them: ``engine.distributed.shutdown``). Enough under ZeRO 0-2; ZeRO-3 keeps more
        references of its own (its ``zero.Init`` state in closures on the parameters), which ``shutdown``
        outlasts. The trainer is unusable afterwards."""
        self.close()
        self.engine.destroy()

    def fit(self) -> dict[str, Any]:
        """Train from the current step to ``schedule.steps``; returns the run summary (``text`` + last values)."""
        steps, logging = self.recipe.schedule.steps, self.recipe.logging
        preempt = preemption.active()   # installed by engine/train.py before the DataLoader forks
        began = time.perf_counter()
        self.log.start_progress(self.step)
        try:
            reported = False
            while self.step < steps:
                parts = self.train_step()
                if not reported:   # after this process's first step: the attention kernel each call site ran
                    reported = True
                    kernels = "; ".join(f"{site}: {kernel}" for site, kernel in sorted(attention_report().items()))
                    self.log.info(f"attention kernels: {kernels or 'none called'}")
                self.log.step(self.step, parts, lr=self.engine.get_lr()[0], **self.counts, every=logging.every)
                last = self.step == steps
                stop = preempt.agreed() and not last   # SIGTERM / SIGUSR1 on any rank: checkpoint, exit 75
                if self.step % logging.checkpoint_every == 0 or last or stop:
                    saved = self.save()
                if stop:
                    raise preemption.Preempted(self.step, saved, preempt.signal_name)
                self.task.after_step(self, self.step, last)
        finally:
            self.close()
        return self.log.finish(time.perf_counter() - began)


__all__ = ["MicroBatch", "NonFiniteLossError", "Task", "Trainer", "data_parallel_stream_seed",
           "seed_data_parallel_stream"]
