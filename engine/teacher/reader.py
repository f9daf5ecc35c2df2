"""Reading the GF teacher feature cache: :class:`TeacherCache`, the same call as the live teacher.

A cache is written by ``geoforge-teacher-cache`` (its docstring has the layout): shards of bf16
features keyed by window ``(dataset index, start frame, flip)`` and ``manifest.json``, written last.
:class:`TeacherCache` checks the manifest against the ``teacher`` and ``data`` sections and the seed,
refusing a mismatch with a message naming the recipe key; ``teacher.layers`` may be a subset of the
cached layers. In training, a window that is not in the cache is an error naming the clip and how to
rebuild.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from geoforge.engine.data.builder import clip_names
from geoforge.engine.teacher.spec import BATCH_PREFIX, TeacherConfig, teacher_identity

FORMAT = "geoforge-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
WINDOW_KEYS = ("window_index", "window_start", "window_flip")


class TeacherCacheError(ValueError):
    """A teacher cache is missing, incomplete, or does not match the recipe."""


# ----------------------------------------------------------------------------- what a cache must match
def clips_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def expected_manifest(teacher: TeacherConfig, data: Any, seed: int) -> dict[str, Any]:
    """The manifest fields a cache must have (teacher, frames, data) for the ``teacher`` and ``data``
    sections and the recipe's ``seed``, without loading any model."""
    clips = clip_names(data)
    return {
        "teacher": teacher_identity(teacher, (data.resolution, data.resolution)),
        "teacher_frames": teacher.aligned_frames(data.frames),
        "data": {"root": str(Path(data.root).resolve()), "split": data.split, "kind": data.kind,
                 "clips": len(clips), "clips_digest": clips_digest(clips),
                 "frames": data.frames, "frame_skip": data.frame_skip, "resolution": data.resolution,
                 "seed": seed, "hflip_prob": data.hflip_prob, "fixed_windows": data.fixed_windows},
    }


_RECIPE_KEYS = {"frames": "data.frames", "frame_skip": "data.frame_skip", "resolution": "data.resolution",
                "seed": "seed", "hflip_prob": "data.hflip_prob", "split": "data.split", "root": "data.root",
                "kind": "data.kind", "fixed_windows": "data.fixed_windows", "clips": "data.root (its clips)",
                "clips_digest": "data.root (its clips)"}


_ADDED_LATER = {"fixed_windows": False}   # data fields newer than some caches: their value in those caches


def check_manifest(manifest: Mapping[str, Any], teacher: TeacherConfig, data: Any, seed: int) -> list[str]:
    """Human-readable mismatches between a cache manifest and the recipe (empty: the cache fits)."""
    want = expected_manifest(teacher, data, seed)
    problems = []
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return [f"format {manifest.get('format')!r} v{manifest.get('version')} is not {FORMAT!r} v{VERSION}"]
    have_t, want_t = manifest["teacher"], want["teacher"]
    for name, key in (("id", "teacher.vggt"), ("size", "teacher.resolution")):
        if have_t["vggt"][name] != want_t["vggt"][name]:
            problems.append(f"{key}: the cache holds VGGT {name} {have_t['vggt'][name]!r}, the recipe gives "
                            f"{want_t['vggt'][name]!r}")
    missing = [layer for layer in want_t["vggt"]["layers"] if layer not in have_t["vggt"]["layers"]]
    if missing:
        problems.append(f"teacher.layers: layers {missing} are not in the cache (it holds "
                        f"{have_t['vggt']['layers']})")
    if "dino" in want_t:
        if "dino" not in have_t:
            problems.append("teacher.dino: the recipe aligns a DINOv2 teacher, the cache holds none")
        else:
            for name in ("id", "layer", "size"):
                if have_t["dino"][name] != want_t["dino"][name]:
                    problems.append(f"teacher.dino: the cache holds DINOv2 {name} {have_t['dino'][name]!r}, the "
                                    f"recipe gives {want_t['dino'][name]!r}")
    if manifest["teacher_frames"] != want["teacher_frames"]:
        problems.append(f"teacher.frames: the cache holds {manifest['teacher_frames']} teacher frames per window, "
                        f"the recipe aligns {want['teacher_frames']}")
    for name, value in want["data"].items():
        have = manifest["data"].get(name, _ADDED_LATER.get(name))
        if have != value:
            problems.append(f"{_RECIPE_KEYS[name]}: the cache was built with {name}={have!r}, the recipe has {value!r}")
    return problems


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise TeacherCacheError(f"teacher.cache: {directory} is not a complete teacher cache (no {MANIFEST}); "
                                f"build it with `geoforge-teacher-cache --recipe ... --out {directory}`")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- reading
class TeacherCache:
    """Teacher features read from a cache instead of running the teacher. Same call as ``LiveTeacher``:
    ``cache(batch) -> {"teacher.<key>": [B, Tt, h, w, C] float32}`` for the batch's windows, and ``dims``."""

    def __init__(self, directory: str | Path, teacher: TeacherConfig, data: Any, seed: int,
                 device: torch.device | str = "cpu"):
        """``teacher``, ``data``: the recipe's sections; ``seed``: the recipe's seed (windows depend on it)."""
        self.directory = Path(directory)
        self.device = torch.device(device)
        self.manifest = read_manifest(self.directory)
        problems = check_manifest(self.manifest, teacher, data, seed)
        if problems:
            raise TeacherCacheError(f"teacher.cache: {self.directory} does not match the recipe:\n  - "
                                    + "\n  - ".join(problems)
                                    + "\nrebuild it: geoforge-teacher-cache --recipe ... --out DIR")
        self.keys = teacher.feature_keys()
        self.dims = {k: int(self.manifest["keys"][k]["shape"][-1]) for k in self.keys}
        self.hflip = self.manifest["data"]["hflip_prob"] > 0
        self.frame_skip = self.manifest["data"]["frame_skip"]
        self._handles: dict[int, Any] = {}
        self._rows: dict[tuple[int, int, int], tuple[int, int]] = {}
        for shard_id, name in enumerate(self.manifest["shards"]):
            with safe_open(str(self.directory / name), framework="pt") as f:
                index, start, flip = (f.get_tensor(k).tolist() for k in WINDOW_KEYS)
            for row, key in enumerate(zip(index, start, flip)):
                self._rows[key] = (shard_id, row)

    def __len__(self) -> int:
        return len(self._rows)

    def _handle(self, shard_id: int):
        if shard_id not in self._handles:
            self._handles[shard_id] = safe_open(str(self.directory / self.manifest["shards"][shard_id]),
                                                framework="pt")
        return self._handles[shard_id]

    def window_keys(self, batch: Mapping[str, torch.Tensor]) -> list[tuple[int, int, int]]:
        """``(dataset index, start frame, flip)`` of each sample of a batch."""
        index = batch["index"].reshape(-1).tolist()
        fi = batch["frame_indices"]
        start = fi[:, 0].tolist()
        if fi.shape[1] > 1 and not bool((fi[:, 1] - fi[:, 0] == self.frame_skip).all()):
            raise TeacherCacheError(f"teacher.cache: batch frame indices {fi.tolist()} do not follow the cached "
                                    f"frame_skip={self.frame_skip}")
        if "flip" in batch:
            flip = [int(v) for v in batch["flip"].reshape(-1).tolist()]
        elif self.hflip:
            raise TeacherCacheError("teacher.cache: data.hflip_prob > 0, but the batch does not say which samples "
                                    "are flipped (no 'flip' key); use the live teacher or hflip_prob 0")
        else:
            flip = [0] * len(index)
        return list(zip(index, start, flip))

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = []
        for key in self.window_keys(batch):
            if key not in self._rows:
                data = self.manifest["data"]
                raise TeacherCacheError(
                    f"teacher.cache: {self.directory} has no window for dataset index {key[0]}, start frame "
                    f"{key[1]}, flip {key[2]} (it holds {len(self._rows)} windows, the ones drawn in epochs "
                    f"0..{self.manifest['windows']['epochs'] - 1} of {data['root']}); rebuild with more --epochs "
                    f"or --world-size, or use the live teacher")
            rows.append(self._rows[key])
        out = {}
        for k in self.keys:
            parts = [self._handle(shard).get_slice(k)[row:row + 1] for shard, row in rows]
            out[BATCH_PREFIX + k] = torch.cat(parts).to(self.device, torch.float32)
        return out


__all__ = ["FORMAT", "VERSION", "MANIFEST", "WINDOW_KEYS", "TeacherCacheError", "TeacherCache", "clips_digest",
           "expected_manifest", "check_manifest", "read_manifest"]
