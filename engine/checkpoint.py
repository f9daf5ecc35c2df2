"""Atomic, resumable checkpoints: ``<run>/checkpoints/step_N/``.

A checkpoint directory holds

- ``deepspeed/``          the DeepSpeed engine state (model, optimizer, scheduler; ZeRO partitions per rank)
- ``model.safetensors``   the consolidated model weights (gathered under ZeRO-3)
- ``ema.safetensors``     the consolidated EMA weights (when EMA is on)
- ``trainer_state.json``  optimizer step, consumed micro-batches, counters, world size
- ``rng_rank{r}.pt``      each rank's torch RNG state (tensors only; loaded with ``weights_only=True``)
- ``COMPLETE``            written last

Everything is written into ``checkpoints/.tmp-step_N`` and renamed to ``step_N`` once every rank has
finished, so a run killed mid-write leaves only a ``.tmp-*`` directory, which is never picked up and
is removed by the next save.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from engine.atomic import TEMP_PREFIX, atomic_write_json, atomic_write_text, publish_dir, temp_path
from engine.distributed import World, barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def consolidated_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full model weights on CPU. Collective under ZeRO-3 (every rank must call it)."""
    if zero_stage == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@contextmanager
def atomic_checkpoint_dir(run_dir: Path, step: int, world: World, keep: int = 0) -> Iterator[Path]:
    """Yield ``checkpoints/.tmp-step_N`` to write into; on exit mark it COMPLETE, rename it to ``step_N``
    and keep only the newest ``keep`` complete checkpoints (0 keeps all). Collective: every rank enters."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = temp_path(final, unique=False)   # one path for every rank
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    yield tmp
    barrier()
    if world.is_main:
        atomic_write_text(tmp / "COMPLETE", f"step {step}\n")
        publish_dir(tmp, final)
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def write_checkpoint_files(directory: Path, world: World, trainer_state: dict, ema=None) -> None:
    """The trainer's own files of a checkpoint being written: each rank's RNG, the EMA (gathered:
    collective) and ``trainer_state.json``."""
    torch.save({"torch": torch.get_rng_state()}, directory / f"rng_rank{world.rank}.pt")
    ema_weights = ema.full_state_dict() if ema is not None else None
    if world.is_main:
        if ema_weights is not None:
            save_file(ema_weights, str(directory / "ema.safetensors"))
        atomic_write_json(directory / "trainer_state.json", {**trainer_state, "world_size": world.size})


def save_module_weights(directory: Path, module: torch.nn.Module, world: World, zero_stage: int,
                        name: str = "model.safetensors") -> None:
    """The consolidated weights of ``module`` as ``directory/name`` (gathered under ZeRO-3: collective)."""
    weights = consolidated_state_dict(module, zero_stage)
    if world.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / name))


def load_checkpoint(path: Path, engine, world: World, ema=None, strict: bool = True) -> dict:
    """Restore engine (model, optimizer, scheduler), EMA and RNG from ``path``; return the trainer state."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    state = json.loads((path / "trainer_state.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=strict)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {path / 'deepspeed'}")
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"{ema_file} is missing but the recipe has ema.enabled: true")
        ema.load_full_state_dict(load_file(str(ema_file)))
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():   # absent when resuming with more ranks than were saved
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    if dist.is_initialized():
        barrier()
    return state
