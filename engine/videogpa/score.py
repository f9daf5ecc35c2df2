"""The 3D-consistency score (VideoGPA), the ``score`` stage, and a standalone scorer.

Score of one video (lower is better):

1. T frames sampled uniformly (``round(linspace(0, N - 1, T))``), centre-cropped to a square and resized to
   the teacher resolution R (bicubic, antialiased);
2. a geometry teacher (VGGT) gives cameras, depth and confidence per frame;
3. every pixel with confidence above ``conf_threshold`` is unprojected into one coloured cloud, which is
   z-buffer splatted into every frame's camera (``kernels.reproject.reprojection_error``, background 0);
4. ``score = mean_frames MSE(frame, render) + λ_lpips · mean_frames LPIPS_VGG(frame, render)``;
5. ``motion = mean ‖t_{i+1} − t_i‖ + w_rot · mean angle(R_{i+1} R_iᵀ)`` (radians) over consecutive
   teacher extrinsics (VideoGPA's measure, used to drop static videos).

``score.kind: oracle`` (:class:`OracleScorer`) replaces step 2 for data with known geometry: each video's
cameras and depth are the true ones of the scene it continues (the true depth of the input's dataset clip, the
cameras the video was generated along, :class:`InputGeometry`), and its frames are scored at their own
resolution (no resize: the geometry is the clip's). Steps 3-5 are the same code.

Standalone use (any folder of videos; resumable, progress bar, summary table with the stage breakdown):

    geoforge-score --videos DIR_OR_GLOB --out scores.jsonl [--teacher facebook/VGGT-1B]
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from geoforge.engine import preemption
from geoforge.engine.preemption import Preempted
from geoforge.engine.atomic import atomic_write_text
from geoforge.engine.distributed import resolve_device
from geoforge.engine.errors import MissingInput
from geoforge.engine.precision import PRECISIONS, autocast, resolve_precision, use_precision
from geoforge.engine.videogpa.io import AppendLog, atomic_write_jsonl
from geoforge.engine.videogpa.teacher import FixedGeometryTeacher, Geometry, VGGTTeacher

log = logging.getLogger("geoforge.videogpa")
STAGES = ("decode", "teacher", "reprojection", "lpips")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif")


class StageTimer:
    """Wall-clock seconds per named stage (CUDA work is synchronised at the stage boundaries)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {name: 0.0 for name in STAGES}

    @contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - began


def sample_indices(num_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread uniformly over ``num_frames`` (repeats when the video is shorter)."""
    if num_frames < 1:
        raise ValueError("sample_indices: the video has no frames")
    return np.linspace(0, num_frames - 1, count).round().astype(int).tolist()


def crop_resize(frames: np.ndarray | Tensor, resolution: int) -> Tensor:
    """uint8 ``[T, H, W, 3]`` (or float ``[T, 3, H, W]`` in [0, 1]) -> centre square crop resized to
    ``[T, 3, R, R]`` float32 in [0, 1] (bicubic with antialiasing, clamped)."""
    x = torch.as_tensor(frames)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0
    x = x.float()
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side]
    if side != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0).contiguous()


def motion_measure(extrinsics: Tensor, rotation_weight: float = 0.1) -> dict[str, float]:
    """VideoGPA's motion: mean ‖Δt‖ of consecutive camera-from-world translations + ``rotation_weight`` ×
    mean relative rotation angle (radians). NaN (degenerate cameras) counts as no motion."""
    e = extrinsics.double()
    rot, trans = e[:, :, :3], e[:, :, 3]
    translation = (trans[1:] - trans[:-1]).norm(dim=-1).mean()
    rel = rot[1:] @ rot[:-1].transpose(-1, -2)
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    rotation = torch.acos(cos).mean()
    motion = translation + rotation_weight * rotation
    values = {"motion": float(motion), "translation": float(translation), "rotation": float(rotation)}
    return {k: (0.0 if math.isnan(v) else v) for k, v in values.items()}


def build_lpips(backbone: str = "", lin: str = "", random: bool = False, device: torch.device | str = "cpu",
                seed: int = 0):
    """LPIPS(VGG) from weight files, or (``random``) a seeded random VGG with non-negative lin layers: a
    deterministic perceptual distance for CPU smoke tests, not LPIPS."""
    from geoforge.engine.eval.lpips import LPIPS

    if random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LPIPS()
            for lin_layer in model.lins:
                weight = lin_layer.model[1].weight
                weight.data = weight.data.abs()
        return model.to(device).eval()
    if not (backbone and lin):
        raise ValueError("build_lpips: give the VGG16 backbone and the LPIPS lin weights (paths or hf://...)")
    return LPIPS.from_pretrained(backbone, lin).to(device).eval()


class ConsistencyScorer:
    """Scores videos with a geometry teacher; see the module docstring."""

    def __init__(self, teacher: Callable[[Tensor], Geometry], lpips=None, frames: int = 10, resolution: int = 518,
                 conf_threshold: float = 0.0, lpips_weight: float = 1.0, rotation_weight: float = 0.1,
                 backend: str = "auto"):
        if lpips_weight > 0 and lpips is None:
            raise ValueError("ConsistencyScorer: lpips_weight > 0 needs an LPIPS network")
        self.teacher, self.lpips = teacher, lpips
        self.frames, self.resolution, self.conf_threshold = frames, resolution, conf_threshold
        self.lpips_weight, self.rotation_weight, self.backend = lpips_weight, rotation_weight, backend
        self.device = torch.device(getattr(teacher, "device", "cpu"))
        self.timer = StageTimer(self.device)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu", backend: str = "auto",
                    geometry: Callable[[dict[str, Any]], Geometry] | None = None) -> ConsistencyScorer:
        """From a :class:`engine.videogpa.config.ScoreConfig`: VGGT (``kind: vggt``), or an
        :class:`OracleScorer` over ``geometry`` (``kind: oracle``; e.g. :class:`InputGeometry` of a run)."""
        lpips = None
        if cfg.lpips_weight > 0:
            lpips = build_lpips(cfg.lpips_backbone, cfg.lpips_lin, cfg.lpips_random, device)
        if cfg.kind == "oracle":
            if geometry is None:
                raise ValueError("score.kind 'oracle' scores videos with their true geometry: give the geometry of "
                                 "their inputs (engine.videogpa.score.InputGeometry of a run)")
            return OracleScorer(geometry, lpips, cfg.frames, cfg.conf_threshold, cfg.lpips_weight,
                                cfg.rotation_weight, backend, device)
        teacher = VGGTTeacher.load(cfg.teacher, cfg.teacher_config, device)
        return cls(teacher, lpips, cfg.frames, cfg.resolution, cfg.conf_threshold, cfg.lpips_weight,
                   cfg.rotation_weight, backend)

    def load_frames(self, path: str | Path) -> tuple[Tensor, int]:
        """Decode ``path``, sample T frames, crop + resize: ``([T, 3, R, R], frames in the video)``."""
        from geoforge.engine.data.video_io import decode_video

        with self.timer("decode"):
            video = decode_video(path)
            picked = video[sample_indices(len(video), self.frames)]
            return crop_resize(picked, self.resolution).to(self.device), len(video)

    @torch.inference_mode()
    def score_frames(self, frames: Tensor) -> dict[str, Any]:
        """Score T preprocessed frames ``[T, 3, R, R]`` in [0, 1] (already sampled and resized)."""
        from geoforge.kernels.reproject import reprojection_error

        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"score_frames: frames must be [T, 3, H, W], got {tuple(frames.shape)}")
        frames = frames.to(self.device, torch.float32)
        s, _, h, w = frames.shape
        with self.timer("teacher"):
            geo = self.teacher(frames)
            geo.check(s, h, w, "teacher output")
        with self.timer("reprojection"):
            conf = torch.where(torch.isfinite(geo.depth), geo.conf, torch.full_like(geo.conf, -math.inf))
            depth = torch.nan_to_num(geo.depth, nan=0.0, posinf=0.0, neginf=0.0)
            rep = reprojection_error(frames, depth.to(self.device), conf.to(self.device),
                                     geo.extrinsics.to(self.device), geo.intrinsics.to(self.device),
                                     conf_threshold=self.conf_threshold, backend=self.backend)
        mse = rep["per_frame_mse"].double()
        row: dict[str, Any] = {}
        lpips_mean = 0.0
        if self.lpips is not None and self.lpips_weight > 0:
            with self.timer("lpips"), autocast(self.device):   # the process precision (engine/precision.py)
                lp = self.lpips(frames, rep["rendered"].clamp(0, 1)).double()
                lpips_mean = float(lp.mean())
        score = float(mse.mean()) + self.lpips_weight * lpips_mean
        row.update(score=score, mse=float(mse.mean()), lpips=lpips_mean,
                   **motion_measure(geo.extrinsics, self.rotation_weight),
                   coverage=float(rep["coverage"].double().mean()),
                   per_frame_mse=[float(v) for v in mse.tolist()])
        if not math.isfinite(score):
            raise ValueError(f"non-finite 3D-consistency score {score} (mse {row['mse']}, lpips {lpips_mean})")
        return row

    def score_video(self, path: str | Path) -> dict[str, Any]:
        frames, count = self.load_frames(path)
        return {**self.score_frames(frames), "num_frames": count}

    def score_item(self, item: dict[str, Any], path: Path) -> dict[str, Any]:
        """Score the video of a stage item (``path``: its file); VGGT needs only the frames."""
        return self.score_video(path)


def select_frames(geometry: Geometry, indices: Sequence[int]) -> Geometry:
    """The geometry of frames ``indices`` (repeats allowed, as :func:`sample_indices` makes)."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    return Geometry(geometry.extrinsics[idx], geometry.intrinsics[idx], geometry.depth[idx], geometry.conf[idx])


class OracleScorer(ConsistencyScorer):
    """The 3D-consistency score with known geometry (``score.kind: oracle``).

    ``geometry(item) -> Geometry`` gives the true cameras and depth of every frame of an item's video (confidence
    1 everywhere); the T sampled frames are scored, at the video's own resolution, through the same
    :meth:`ConsistencyScorer.score_frames` (reprojection, LPIPS, motion) with a :class:`FixedGeometryTeacher` of
    those frames' geometry in place of VGGT. Lower is better; the ground truth's own score is the floor (not 0:
    antialiased pixels, occlusion edges, surfaces seen at a grazing angle).
    """

    def __init__(self, geometry: Callable[[dict[str, Any]], Geometry], lpips=None, frames: int = 10,
                 conf_threshold: float = 0.0, lpips_weight: float = 1.0, rotation_weight: float = 0.1,
                 backend: str = "auto", device: torch.device | str = "cpu"):
        super().__init__(None, lpips, frames, 0, conf_threshold, lpips_weight, rotation_weight, backend)
        self.geometry = geometry
        self.device = torch.device(device)
        self.timer = StageTimer(self.device)

    def score_clip(self, video: Tensor, geometry: Geometry) -> dict[str, Any]:
        """Score a whole video ``[N, 3, H, W]`` in [0, 1] with the geometry of its N frames."""
        if video.dim() != 4 or video.shape[1] != 3:
            raise ValueError(f"score_clip: video must be [N, 3, H, W], got {tuple(video.shape)}")
        n, _, h, w = video.shape
        try:
            geometry.check(n, h, w, "the true geometry")
        except ValueError as err:
            raise ValueError(f"oracle score: the video is {n} frames of {h}x{w}, which its geometry does not "
                             f"fit: {err}") from err
        indices = sample_indices(n, self.frames)
        self.teacher = FixedGeometryTeacher(select_frames(geometry, indices))
        return self.score_frames(video[indices])

    def score_video(self, path: str | Path) -> dict[str, Any]:
        raise TypeError("OracleScorer: a video's geometry comes from its input; use score_item(item, path)")

    def score_item(self, item: dict[str, Any], path: Path) -> dict[str, Any]:
        from geoforge.engine.data.video_io import decode_video

        with self.timer("decode"):
            video = decode_video(path)
            frames = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float().div_(255.0)
        with self.timer("teacher"):
            geometry = self.geometry(item)
        return {**self.score_clip(frames, geometry), "num_frames": len(video)}


class InputGeometry:
    """``item -> Geometry`` for :class:`OracleScorer` in a run whose inputs are dataset clips (``inputs.kind:
    dataset``): the cameras stored with the item's input (``candidates/<key>/condition.safetensors``: what its
    videos were generated along) and the true depth of the dataset clip the input was taken from, read as the
    generate stage read the clip (the recipe's ``data`` section and seed, the input's index, the policy's frames),
    with a check that the clip's cameras are the stored ones. One geometry per input, cached."""

    def __init__(self, recipe, run_dir: Path):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self._datasets: dict[int, Any] = {}
        self._cache: dict[str, Geometry] = {}

    def dataset(self, frames: int):
        """The clips of the recipe's data as the generate stage reads them (``frames`` per clip), with depth."""
        from geoforge.engine.data.re10k import Re10KClips

        if frames not in self._datasets:
            data = self.recipe.data
            self._datasets[frames] = Re10KClips(data.root, split=data.split, num_frames=frames,
                                                frame_skip=data.frame_skip, resolution=data.resolution,
                                                seed=self.recipe.seed, load_depth=True)
        return self._datasets[frames]

    def __call__(self, item: dict[str, Any]) -> Geometry:
        key = item["input"]
        if key not in self._cache:
            self._cache[key] = self._load(key)
        return self._cache[key]

    def _load(self, key: str) -> Geometry:
        from geoforge.engine.videogpa.generate import load_condition

        meta = json.loads((self.run_dir / "candidates" / key / "meta.json").read_text())
        cond = load_condition(self.run_dir, key)
        data = self.recipe.data
        if cond.intrinsics is None or cond.extrinsics is None:
            raise ValueError(f"score.kind 'oracle': input {key} has no cameras (the policy's {meta['height']}x"
                             f"{meta['width']} videos differ from data.resolution={data.resolution}, so the "
                             f"generate stage stored none); the oracle needs the cameras the videos follow")
        clips = self.dataset(int(meta["frames"]))
        sample = clips[int(meta["index"])]
        if "depth" not in sample:
            clip = clips.clips[int(meta["index"])]
            raise MissingInput(f"videogpa.score.kind 'oracle' needs the true depth of the inputs' clips, but clip "
                               f"{clip.name} of {data.root}/{data.split} has none (no {clip.name}.depth.npz): "
                               f"the oracle is for data with known geometry (data.kind synthetic renders it); for "
                               f"real video use --set videogpa.score.kind=vggt")
        for name in ("intrinsics", "extrinsics"):
            stored, true = getattr(cond, name).float(), sample[name].float()
            if stored.shape != true.shape or not torch.allclose(stored, true, atol=1e-4, rtol=1e-4):
                raise ValueError(f"score.kind 'oracle': the {name} stored with input {key} differ from those of "
                                 f"clip {int(meta['index'])} of {data.root}/{data.split}: the recipe's data section "
                                 f"or seed changed since the generate stage")
        depth = sample["depth"].float()
        return Geometry(cond.extrinsics.float(), cond.intrinsics.float(), depth, torch.ones_like(depth))


def score_items(scorer: ConsistencyScorer, items: Sequence[dict[str, Any]], progress: AppendLog,
                root: Path | None = None, show_progress: bool = True, desc: str = "score") -> list[dict[str, Any]]:
    """Score ``items`` (dicts with ``video`` = a path, relative to ``root`` when given, plus fields copied
    into the row) not yet in ``progress``; every finished row is appended to ``progress`` at once, so a
    killed run continues where it stopped. Returns the rows of ``items`` (old and new); a preemption
    signal (``engine.preemption``) stops it after the current video, returning the rows scored so far."""
    from tqdm import tqdm

    done = {row["video"]: row for row in progress.repair()}
    todo = [it for it in items if it["video"] not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="video", dynamic_ncols=True,
               disable=not show_progress)
    try:
        preempt = preemption.active()
        for item in todo:
            if preempt.requested():   # preemption hook: the rows so far are in ``progress``
                break
            path = Path(item["video"]) if root is None else Path(root) / item["video"]
            try:
                scored = scorer.score_item(item, path)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
            row = {**item, **scored}
            progress.append(row)
            done[item["video"]] = row
            bar.update(1)
            bar.set_postfix(score=f"{row['score']:.4f}", refresh=False)
    finally:
        bar.close()
    return [done[it["video"]] for it in items if it["video"] in done]


def summary(rows: Sequence[dict[str, Any]], timer: StageTimer, seconds: float, scored_now: int) -> dict[str, Any]:
    """Numbers of a scoring run: videos/s of the videos scored now, per-stage seconds, score statistics."""
    scores = np.array([r["score"] for r in rows], dtype=np.float64) if rows else np.zeros(0)
    stage_total = sum(timer.seconds.values())
    return {
        "videos": len(rows), "scored_now": scored_now, "seconds": seconds,
        "videos_per_s": scored_now / seconds if seconds > 0 and scored_now else 0.0,
        "stage_seconds": dict(timer.seconds), "stage_total_seconds": stage_total,
        "score_mean": float(scores.mean()) if len(scores) else float("nan"),
        "score_min": float(scores.min()) if len(scores) else float("nan"),
        "score_max": float(scores.max()) if len(scores) else float("nan"),
        "motion_mean": float(np.mean([r["motion"] for r in rows])) if rows else float("nan"),
    }


def summary_table(info: dict[str, Any]) -> str:
    """A plain-text table of :func:`summary`."""
    lines = [f"3D-consistency scores: {info['videos']} videos ({info['scored_now']} scored now in "
             f"{info['seconds']:.1f} s, {info['videos_per_s']:.3f} videos/s)",
             f"  score mean {info['score_mean']:.5f}  min {info['score_min']:.5f}  max {info['score_max']:.5f}  "
             f"motion mean {info['motion_mean']:.5f}",
             f"  {'stage':<14}{'seconds':>10}{'share':>9}{'ms/video':>11}"]
    total = info["stage_total_seconds"] or 1e-12
    n = max(info["scored_now"], 1)
    for name, sec in info["stage_seconds"].items():
        lines.append(f"  {name:<14}{sec:>10.2f}{100 * sec / total:>8.1f}%{1000 * sec / n:>11.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- stage
def run_score_stage(recipe, run_dir: Path, world, show_progress: bool = True) -> dict[str, Any]:
    """The ``score`` stage: every candidate of ``candidates/`` -> ``scores.jsonl`` (atomic, sorted).

    Ranks split the videos; each appends finished rows to ``scores.partial.rank{r}.jsonl``, so a killed
    stage resumes with the videos not yet scored (any world size). Rank 0 merges the rows once all are
    scored and writes ``score_summary.json`` (timings, throughput).
    """
    from geoforge.engine.distributed import barrier
    from geoforge.engine.videogpa.generate import candidate_items

    run_dir = Path(run_dir)
    out = run_dir / "scores.jsonl"
    if out.is_file():
        return {"skipped": True}
    items = candidate_items(run_dir)
    cfg = recipe.videogpa.score
    geometry = InputGeometry(recipe, run_dir) if cfg.kind == "oracle" else None
    scorer = ConsistencyScorer.from_config(cfg, world.device, recipe.backend, geometry)
    mine = [it for i, it in enumerate(items) if i % world.size == world.rank]
    began = time.perf_counter()
    progress = AppendLog(run_dir / f"scores.partial.rank{world.rank}.jsonl")
    before = {r["video"] for r in progress.rows()}
    score_items(scorer, mine, progress, root=run_dir, show_progress=show_progress and world.is_main)
    seconds = time.perf_counter() - began
    scored_now = sum(1 for it in mine if it["video"] not in before)
    if preemption.active().agreed():   # collective: every rank stops; finished rows stay in the partial files
        raise Preempted(None, None, preemption.active().signal_name,
                        f"videogpa score stage ({len(progress.rows())} of {len(mine)} videos of rank {world.rank} "
                        f"kept in {progress.path})")
    barrier()
    info: dict[str, Any] = {}
    if world.is_main:
        rows: dict[str, dict] = {}
        for part in sorted(run_dir.glob("scores.partial.rank*.jsonl")):
            for row in AppendLog(part).rows():
                rows.setdefault(row["video"], row)
        missing = [it["video"] for it in items if it["video"] not in rows]
        if missing:
            raise RuntimeError(f"score stage: {len(missing)} videos have no score after every rank finished, "
                               f"e.g. {missing[:3]}")
        info = summary([rows[it["video"]] for it in items], scorer.timer, seconds, scored_now)
        atomic_write_text(run_dir / "score_summary.json", json.dumps(info, indent=1) + "\n")
        atomic_write_jsonl(out, [rows[it["video"]] for it in sorted(items, key=lambda it: it["video"])])
        for part in run_dir.glob("scores.partial.rank*.jsonl"):
            part.unlink()
        log.info(summary_table(info))
    barrier()
    return info


# ------------------------------------------------------------------------------------------------- CLI
def find_videos(spec: str) -> list[Path]:
    """A folder (its videos, recursively) or a glob pattern; sorted."""
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]
    else:
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    if not found:
        raise FileNotFoundError(f"--videos {spec!r}: no video files found")
    return sorted(found)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Score the 3D consistency of videos (VideoGPA: VGGT + reprojection "
                                            "+ LPIPS; lower is better).")
    p.add_argument("--videos", required=True, help="a folder (searched recursively) or a glob pattern")
    p.add_argument("--out", required=True, type=Path, help="scores.jsonl to write (resumes from OUT.partial)")
    p.add_argument("--teacher", default="facebook/VGGT-1B", help="VGGT hub id or local path, or 'random'")
    p.add_argument("--teacher-config", default=None, help="JSON file with a VGGT config (for --teacher random)")
    p.add_argument("--frames", type=int, default=10, help="frames sampled uniformly per video")
    p.add_argument("--resolution", type=int, default=518, help="square teacher resolution (multiple of 14)")
    p.add_argument("--conf-threshold", type=float, default=0.0)
    p.add_argument("--lpips-weight", type=float, default=1.0)
    p.add_argument("--lpips-backbone", default="", help="torchvision VGG16 weights (path or hf://...)")
    p.add_argument("--lpips-lin", default="", help="LPIPS v0.1 vgg lin weights (path or hf://...)")
    p.add_argument("--lpips-random", action="store_true", help="random LPIPS network (smoke tests only)")
    p.add_argument("--rotation-weight", type=float, default=0.1)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="VGGT's and LPIPS's precision (auto: bf16 where native; engine/precision.py)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cpu", "reference"),
                   help="reprojection kernel backend")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from geoforge.engine.schema import ConfigError, build
    from geoforge.engine.videogpa.config import ScoreConfig

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = json.loads(Path(args.teacher_config).read_text()) if args.teacher_config else None
        cfg = build(ScoreConfig, dict(
            teacher=args.teacher, teacher_config=config, frames=args.frames, resolution=args.resolution,
            conf_threshold=args.conf_threshold, lpips_weight=args.lpips_weight, lpips_backbone=args.lpips_backbone,
            lpips_lin=args.lpips_lin, lpips_random=args.lpips_random, rotation_weight=args.rotation_weight), "score")
        videos = find_videos(args.videos)
    except (ConfigError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    with use_precision(resolve_precision(args.precision, device)) as precision:
        print(f"score: networks in {precision.describe()}", file=sys.stderr)
        scorer = ConsistencyScorer.from_config(cfg, device, args.backend)
        progress = AppendLog(args.out.with_name(args.out.name + ".partial"))
        before = {r["video"] for r in progress.rows()}
        items = [{"video": str(v)} for v in videos]
        began = time.perf_counter()
        with preemption.Preemption() as preempt:   # SIGTERM / SIGUSR1: keep the finished rows, exit 75
            rows = score_items(scorer, items, progress, show_progress=not args.no_progress)
        seconds = time.perf_counter() - began
        if preempt.requested():
            print(f"preempted by {preempt.signal_name}: {len(rows)} of {len(items)} videos scored, kept in "
                  f"{progress.path}; run the same command again to continue", file=sys.stderr)
            return preemption.PREEMPTED_EXIT_CODE
        atomic_write_jsonl(args.out, rows)
        progress.path.unlink(missing_ok=True)
        info = summary(rows, scorer.timer, seconds, sum(1 for it in items if it["video"] not in before))
        print(summary_table(info))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
