"""Teacher feature cache for Geometry Forcing: precompute the frozen teacher once (the writer command).

    geoforge-teacher-cache --recipe gf_tiny --out data/gf_tiny_cache [--set KEY=VALUE ...]
    deepspeed engine/train.py --recipe gf_tiny --set teacher.cache=data/gf_tiny_cache

**Windows.** The teacher sees a clip *window* (the sampled frames), so the cache holds features per
window, keyed by ``(dataset index, start frame, flip)``. ``Re10KClips`` and ``MinecraftClips`` draw a
sample's start frame (and flip) from ``(seed, epoch, index)``, so the windows a run sees are fixed by
the recipe: this tool walks exactly the windows the data pipeline draws in epochs ``0 .. E-1``
(``--epochs E``; by default the epochs that ``schedule.steps`` consumes at ``--world-size`` ranks) and
stores each distinct window once.
In training, a window that is not in the cache is an error naming the clip and how to rebuild. With
``data.fixed_windows: true`` (every epoch draws epoch 0's window of each clip) the default is one epoch,
one window per clip, and it covers any run length. Flips: a sample must carry its ``flip`` flag when
``data.hflip_prob > 0``.

**Files.** ``DIR/shard_NNNNN.safetensors``: per feature key (``vggt_L4``, ..., ``dino``) a bf16 tensor
``[n, Tt, h, w, C]`` - patch tokens on the teacher's own grid, exactly what the live teacher returns,
rounded to bf16 - and the window keys ``window_index``, ``window_start``, ``window_flip`` (int64 [n]).
``DIR/manifest.json`` is written last (so a cache without one is incomplete): the teacher identity
(weights id, layers, input size), the aligned frames, the data settings the windows depend on (root,
split, clip list digest, frames, frame skip, resolution, seed, flip probability), the keys with their
shapes and the shards. ``engine.teacher.reader.TeacherCache`` checks it against the recipe and refuses
a mismatch with a message naming the recipe key; the recipe's ``teacher.layers`` may be a subset of the
cached ones.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from geoforge.engine.config import ConfigError, load_recipe
from geoforge.engine.data.builder import build_dataset
from geoforge.engine.data.sampler import EpochIndexed
from geoforge.engine.atomic import TEMP_PREFIX, atomic_save, atomic_write_json
from geoforge.engine.distributed import World, resolve_device
from geoforge.engine.errors import UserError
from geoforge.engine.precision import resolve_precision, use_precision
from geoforge.engine.teacher.live import LiveTeacher
from geoforge.engine.teacher.reader import FORMAT, MANIFEST, VERSION, WINDOW_KEYS, expected_manifest


# ----------------------------------------------------------------------------- writing
def epochs_for_run(recipe: Any, dataset_len: int, world_size: int = 1) -> int:
    """Epochs of the sampler that a run of ``schedule.steps`` optimizer steps touches at ``world_size`` ranks
    (1 with ``data.fixed_windows``: every epoch draws epoch 0's windows)."""
    if recipe.data.fixed_windows:
        return 1
    global_batch = recipe.data.batch_size * recipe.distributed.grad_accum * world_size
    steps_per_epoch = dataset_len // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{dataset_len} clips are fewer than one global batch of {global_batch}")
    return math.ceil(recipe.schedule.steps / steps_per_epoch)


class _ShardWriter:
    """Buffers windows and writes ``shard_NNNNN.safetensors`` files of ``shard_size`` windows."""

    def __init__(self, directory: Path, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.windows: list[tuple[int, int, int]] = []
        self.shards: list[str] = []

    def add(self, key: tuple[int, int, int], features: Mapping[str, torch.Tensor]) -> None:
        self.windows.append(key)
        for k, v in features.items():
            self.buffer.setdefault(k, []).append(v.to(torch.bfloat16).cpu())
        if len(self.windows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.windows:
            return
        tensors = {k: torch.stack(v).contiguous() for k, v in self.buffer.items()}
        for i, name in enumerate(WINDOW_KEYS):
            tensors[name] = torch.tensor([w[i] for w in self.windows], dtype=torch.int64)
        name = f"shard_{len(self.shards):05d}.safetensors"
        atomic_save(self.directory / name, lambda tmp: save_file(tensors, str(tmp)))
        self.shards.append(name)
        self.buffer, self.windows = {}, []


def _window_batches(dataset: Any, epochs: int, batch_size: int, num_workers: int) -> Iterator[dict]:
    keys = [(i, e) for e in range(epochs) for i in range(len(dataset))]
    chunks = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=chunks, num_workers=num_workers)
    yield from loader


def build_cache(recipe: Any, out: str | Path, *, epochs: int | None = None, world_size: int = 1,
                shard_size: int = 256, batch_size: int | None = None, max_windows: int | None = None,
                num_workers: int = 0, device: torch.device | str = "cpu", overwrite: bool = False, log=print) -> dict[str, Any]:
    """Compute and write the teacher cache of ``recipe`` into ``out``; returns the manifest."""
    if not recipe.gf.enabled:
        raise ValueError("teacher cache: the recipe has gf.enabled: false (nothing to cache)")
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"teacher cache: {out} already holds a teacher cache (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("shard_*.safetensors"), *out.glob(f"{TEMP_PREFIX}*shard_*"), out / MANIFEST]:
        old.unlink(missing_ok=True)
    world = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device(device))
    dataset = build_dataset(recipe.data, world, recipe.seed)
    epochs = epochs or epochs_for_run(recipe, len(dataset), world_size)
    teacher = LiveTeacher(recipe.teacher, device)
    writer = _ShardWriter(out, shard_size)
    seen: set[tuple[int, int, int]] = set()
    started, loaded = time.perf_counter(), 0
    hflip = recipe.data.hflip_prob > 0
    for batch in _window_batches(dataset, epochs, batch_size or recipe.data.batch_size, num_workers):
        loaded += len(batch["index"])
        if hflip and "flip" not in batch:
            raise ValueError("teacher cache: data.hflip_prob > 0 but the dataset's samples carry no 'flip' flag, "
                             "so cached windows could not be matched to flipped samples; set data.hflip_prob=0")
        flips = batch["flip"].tolist() if "flip" in batch else [0] * len(batch["index"])
        keys = [(int(i), int(fi[0]), int(f)) for i, fi, f in zip(batch["index"], batch["frame_indices"], flips)]
        new, fresh = [], set()
        for j, k in enumerate(keys):   # windows not cached yet, each once
            if k not in seen and k not in fresh:
                new.append(j)
                fresh.add(k)
        if max_windows is not None:
            new = new[:max(0, max_windows - len(seen))]
        if new:
            feats = teacher.features(batch["frames"][new])
            for n, j in enumerate(new):
                seen.add(keys[j])
                writer.add(keys[j], {k: v[n] for k, v in feats.items()})
        if max_windows is not None and len(seen) >= max_windows:
            break
    writer.flush()
    if not writer.shards:
        raise ValueError("teacher cache: no window was cached")
    first = writer.directory / writer.shards[0]
    with safe_open(str(first), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()[1:]) for k in f.keys() if k not in WINDOW_KEYS}
    manifest = {"format": FORMAT, "version": VERSION, **expected_manifest(recipe.teacher, recipe.data, recipe.seed),
                "keys": {k: {"shape": s, "dtype": "bfloat16"} for k, s in shapes.items()},
                "windows": {"count": len(seen), "epochs": epochs, "samples_read": loaded},
                "shards": writer.shards, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(out / MANIFEST, manifest)
    log(f"teacher cache: {len(seen)} windows ({loaded} samples of {epochs} epoch(s)) in {len(writer.shards)} "
        f"shard(s) -> {out} ({time.perf_counter() - started:.1f} s)")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe name in recipes/ or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="cache directory (default: the recipe's teacher.cache)")
    p.add_argument("--epochs", type=int, default=None, help="cache the windows of epochs 0..N-1 (default: the "
                   "epochs schedule.steps consumes at --world-size ranks)")
    p.add_argument("--world-size", type=int, default=1, help="largest number of ranks the cache must serve")
    p.add_argument("--shard-size", type=int, default=256, help="windows per safetensors shard")
    p.add_argument("--batch-size", type=int, default=None, help="clips per teacher call (default data.batch_size)")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows (tests, benchmarks)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding clips")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or recipe.teacher.cache
    if not out:
        print("error: give --out DIR (or set teacher.cache in the recipe)", file=sys.stderr)
        return 2
    device = str(resolve_device(args.device))
    try:
        with use_precision(resolve_precision(recipe.distributed.precision, device)) as precision:
            print(f"teacher cache: the teacher runs in {precision.describe()}")
            build_cache(recipe, out, epochs=args.epochs, world_size=args.world_size, shard_size=args.shard_size,
                        batch_size=args.batch_size, max_windows=args.max_windows, num_workers=args.num_workers,
                        device=device, overwrite=args.overwrite)
    except (UserError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
