"""Atomic, resumable checkpoints: ``<run>/checkpoints/step_N/``.

A checkpoint directory holds

- ``deepspeed/``          the DeepSpeed engine state (model, optimizer, scheduler; ZeRO partitions per rank)
- ``model.safetensors``   the consolidated model weights (gathered under ZeRO-3)
- ``ema.safetensors``     the consolidated EMA weights (when EMA is on)
- ``trainer_state.json``  optimizer step, consumed micro-batches, counters, world size
- ``rng_rank{r}.pt``      each rank's torch RNG states: the CPU's, and its CUDA device's on a GPU (dropout draws
                          there; tensors only, loaded with ``weights_only=True``)
- ``MANIFEST.json``       size and CRC-32 of every other file (see below)
- ``COMPLETE``            written last

Everything is written into ``checkpoints/.tmp-step_N`` and renamed to ``step_N`` once every rank has
finished, so a run killed mid-write leaves only a ``.tmp-*`` directory, which is never picked up and
is removed by the next save. A write that fails (disk full, I/O error) removes its ``.tmp-*`` directory,
leaves every earlier checkpoint as it was and raises :class:`CheckpointWriteError` naming the path.

Verification. ``MANIFEST.json`` records ``{relative path: {size, crc32}}`` of every file of the checkpoint
(hashed in parallel: each rank hashes a share). CRC-32 (``zlib``, ~3 GB/s on one core here; BLAKE2b
~0.8 GB/s, SHA-1 ~1.6 GB/s) detects truncation and damage from copies; it is no defence against
tampering. :func:`verify_checkpoint` lists every missing, resized or damaged file by name;
:func:`resume_checkpoint` (``--resume auto`` / ``--resume PATH``) and the weight loaders
(:func:`verify_file`) use it. Checkpoints written before manifests existed load unverified (a warning).
The run directory must be on storage every rank sees (each rank writes its ZeRO shards into it).
"""
from __future__ import annotations

import json
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from geoforge.engine.atomic import TEMP_PREFIX, atomic_write_json, atomic_write_text, publish_dir, temp_path
from geoforge.engine.distributed import World, barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"
_UNHASHED = {MANIFEST, "COMPLETE"}
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or fails verification; the message names the file."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, I/O error); earlier checkpoints are intact."""


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


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes, 8 hex digits (read in 8 MiB chunks)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _my_share(items: list, world: World | None) -> list:
    if world is None or not dist.is_initialized() or dist.get_world_size() < 2:
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def _gather(part: dict, world: World | None) -> dict:
    """Union of every rank's dict (collective when a process group is up and ``world`` is given)."""
    if world is None or not dist.is_initialized() or dist.get_world_size() < 2:
        return part
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def write_manifest(directory: Path, world: World | None = None) -> dict:
    """Hash every file under ``directory`` into ``MANIFEST.json``. With ``world``: collective, each rank
    hashes a share of the files and rank 0 writes the manifest."""
    from geoforge.engine.distributed import broadcast_object

    directory = Path(directory)
    names = None
    if world is None or world.is_main:
        names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                       if p.is_file() and p.name not in _UNHASHED)
    names = broadcast_object(names) if world is not None else names
    mine = {n: {"size": (directory / n).stat().st_size, "crc32": file_crc32(directory / n)}
            for n in _my_share(names, world)}
    files = _gather(mine, world)
    manifest = {"version": 1, "hash": "crc32", "files": {n: files[n] for n in names}}
    if world is None or world.is_main:
        atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a checkpoint directory, None if it has none; a malformed one raises CheckpointError."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("hash") != "crc32" or not isinstance(files, dict):
            raise ValueError(f"unsupported hash {manifest.get('hash')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from err
    return manifest


def _check_entry(directory: Path, name: str, entry: dict) -> str | None:
    path = directory / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path}: {size} bytes, the manifest records {entry['size']} (truncated or overwritten)"
    if file_crc32(path) != entry["crc32"]:
        return f"{path}: content differs from the manifest (CRC-32 mismatch: damaged)"
    return None


def verify_checkpoint(directory: Path, world: World | None = None, names: list[str] | None = None) -> list[str]:
    """Problems of checkpoint ``directory`` (each naming a file), [] if it verifies. ``names`` limits the
    check to these files (relative paths). With ``world``: collective, each rank checks a share.
    Raises CheckpointError if the directory has no manifest (see :func:`read_manifest`)."""
    directory = Path(directory)
    if not (directory / "COMPLETE").is_file():
        return [f"{directory / 'COMPLETE'}: missing (an incomplete checkpoint)"]
    manifest = read_manifest(directory)
    if manifest is None:
        raise CheckpointError(f"{directory / MANIFEST}: missing (a checkpoint written before manifests existed)")
    entries = manifest["files"]
    wanted = sorted(entries) if names is None else list(names)
    problems = {}
    for name in _my_share(wanted, world):
        entry = entries.get(name)
        problem = (f"{directory / name}: not in {directory / MANIFEST}" if entry is None
                   else _check_entry(directory, name, entry))
        if problem:
            problems[name] = problem
    problems = _gather(problems, world)
    return [problems[n] for n in wanted if n in problems]


def verify_file(path: Path) -> None:
    """Check one weights file against the manifest of its folder (if it has one); raise CheckpointError
    naming the file if it is missing, resized or damaged. Files outside checkpoints pass unchecked."""
    path = Path(path)
    manifest = read_manifest(path.parent) if (path.parent / MANIFEST).is_file() else None
    if manifest is None or path.name not in manifest["files"]:
        return
    problem = _check_entry(path.parent, path.name, manifest["files"][path.name])
    if problem:
        raise CheckpointError(f"{problem}; the checkpoint {path.parent} is damaged: use an older one")


def newest_verified_checkpoint(run_dir: Path, world: World | None = None,
                               warn: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` that verifies; every newer one that does not is
    reported through ``warn``, naming its bad files. Collective with ``world``."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            problems = verify_checkpoint(path, world)
        except CheckpointError as err:   # no manifest: a checkpoint of an older GeoForge, used unverified
            warn(f"{err}; resuming from it unverified")
            return path
        if not problems:
            return path
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} files)" if len(problems) > 4 else "")
        warn(f"checkpoint {path} fails verification: {shown}. Falling back to the previous checkpoint.")
    return None


def resume_checkpoint(run_dir: Path, resume: str | None, world: World | None = None,
                      warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint ``--resume`` means: ``auto`` -> the newest that verifies (None if there is none);
    a path -> that checkpoint, which must verify (CheckpointError naming the file otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        return newest_verified_checkpoint(run_dir, world, warn)
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise CheckpointError(f"--resume {path}: not a complete checkpoint ({path / 'COMPLETE'} is missing)")
    try:
        problems = verify_checkpoint(path, world)
    except CheckpointError as err:
        warn(f"{err}; resuming from it unverified")
        return path
    if problems:
        raise CheckpointError(f"--resume {path}: the checkpoint fails verification: " + "; ".join(problems))
    return path


def _is_write_error(err: BaseException) -> bool:
    """An I/O failure of a writer: OSError (ENOSPC, EIO, EFBIG ...), safetensors' SafetensorError, or the
    RuntimeError torch.save raises when its stream writer fails (it does not chain the OSError)."""
    if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
        return True
    return isinstance(err, RuntimeError) and bool(_TORCH_WRITE_ERROR.search(str(err)))


_TORCH_WRITE_ERROR = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


@contextmanager
def atomic_checkpoint_dir(run_dir: Path, step: int, world: World, keep: int = 0) -> Iterator[Path]:
    """Yield ``checkpoints/.tmp-step_N`` to write into; on exit hash its files into ``MANIFEST.json``, mark
    it COMPLETE, rename it to ``step_N`` and keep only the newest ``keep`` complete checkpoints (0 keeps
    all). Collective: every rank enters. A failing write (see :func:`_is_write_error`) removes the temporary
    directory and raises :class:`CheckpointWriteError` naming the path; earlier checkpoints are untouched
    (pruning happens only after a successful rename)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = temp_path(final, unique=False)   # one path for every rank
    try:
        if world.is_main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f"{TEMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        yield tmp
        barrier()
        write_manifest(tmp, world)
        if world.is_main:
            atomic_write_text(tmp / "COMPLETE", f"step {step}\n")
            publish_dir(tmp, final)
    except Exception as err:
        if isinstance(err, CheckpointWriteError) or not _is_write_error(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        intact = ", ".join(p.name for p in checkpoint_dirs(run_dir)) or "none"
        where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
        raise CheckpointWriteError(
            f"writing checkpoint {final} failed{where}: {type(err).__name__}: {err}. The partial {tmp} was "
            f"removed; earlier checkpoints are intact ({intact}). Free space / fix the storage, then "
            f"--resume auto.") from err
    if world.is_main and keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def write_checkpoint_files(directory: Path, world: World, trainer_state: dict, ema=None) -> None:
    """The trainer's own files of a checkpoint being written: each rank's RNG, the EMA (gathered:
    collective) and ``trainer_state.json``."""
    rng = {"torch": torch.get_rng_state()}
    if world.device.type == "cuda":   # the stream dropout draws from on a GPU (engine.trainer.seed_data_parallel_stream)
        rng["cuda"] = torch.cuda.get_rng_state(world.device)
    torch.save(rng, directory / f"rng_rank{world.rank}.pt")
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
    try:
        load_path, _ = engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=strict)
    except (OSError, RuntimeError, ValueError) as err:   # e.g. a damaged zip in an unverified checkpoint
        raise CheckpointError(f"{path / 'deepspeed'}: DeepSpeed could not read the engine state "
                              f"({type(err).__name__}: {err})") from err
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {path / 'deepspeed'}")
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"{ema_file} is missing but the recipe has ema.enabled: true")
        ema.load_full_state_dict(load_file(str(ema_file)))
    rng_file = path / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():   # absent when resuming with more ranks than were saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and world.device.type == "cuda":   # absent in checkpoints of CPU runs and older ones
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    if dist.is_initialized():
        barrier()
    return state
