"""Conditioning inputs and the ``generate`` stage: K candidate videos per input, with recorded seeds.

Layout written into the run directory::

    candidates/<key>/condition.safetensors   first frame, cameras, prompt embeddings (what DPO conditions on)
    candidates/<key>/meta.json               key, input index, prompt, seeds, files, sampler settings
    candidates/<key>/cand_00.mp4 ...         the K candidates (uint8 RGB, lossless H.264 4:4:4)
    candidates/COMPLETE                      written last, once every input is done

Each input is written into ``candidates/.tmp-<key>`` and renamed when all its files exist, so a killed
stage leaves only complete inputs behind and resumes with the rest. Ranks split the inputs.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from geoforge.engine import preemption
from geoforge.engine.preemption import Preempted
from geoforge.engine.atomic import atomic_dir, atomic_write_text
from geoforge.engine.videogpa.io import read_jsonl, read_marker, write_marker
from geoforge.engine.videogpa.policy import Condition, VideoPolicy, seed_for

log = logging.getLogger("geoforge.videogpa")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[3, h, w]`` in [0, 1] -> centre crop to the aspect of ``height x width``, bicubic resize."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    ch, cw = min(h, round(height / scale)), min(w, round(width / scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    image = image[:, top:top + ch, left:left + cw]
    if (ch, cw) != (height, width):
        image = F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True,
                              align_corners=False)[0]
    return image.clamp(0, 1)


def load_inputs(recipe, policy: VideoPolicy) -> list[Condition]:
    """The first ``videogpa.inputs.count`` conditioning inputs (see ``InputsConfig``)."""
    cfg = recipe.videogpa.inputs
    if cfg.kind == "dataset":
        return _dataset_inputs(recipe, policy, cfg.count)
    return _image_inputs(cfg, policy)


def _dataset_inputs(recipe, policy: VideoPolicy, count: int) -> list[Condition]:
    from geoforge.engine.data.re10k import Re10KClips
    from geoforge.engine.data.synthetic import ensure_synthetic_dataset

    data = recipe.data
    if data.kind == "synthetic":
        ensure_synthetic_dataset(Path(data.root), clips=data.synthetic_clips, frames=data.synthetic_frames,
                                 resolution=data.resolution, seed=data.scene_seed(recipe.seed), split=data.split)
    clips = Re10KClips(data.root, split=data.split, num_frames=policy.frames, frame_skip=data.frame_skip,
                       resolution=data.resolution, seed=recipe.seed, load_depth=False)
    if len(clips) < count:
        raise ValueError(f"videogpa.inputs.count={count} but {data.root}/{data.split} holds {len(clips)} clips")
    out = []
    same_size = (policy.height, policy.width) == (data.resolution, data.resolution)
    for i in range(count):
        sample = clips[i]
        first = sample["frames"][0]
        cams = {"intrinsics": sample["intrinsics"], "extrinsics": sample["extrinsics"]} if same_size else {}
        out.append(Condition(key=f"{i:05d}", first_frame=first if same_size else _fit(first, policy.height, policy.width),
                             prompt="", **cams))
    return out


def _image_inputs(cfg, policy: VideoPolicy) -> list[Condition]:
    from geoforge.engine.data.video_io import read_image

    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"videogpa.inputs.root: {root} is not a folder")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    prompts: dict[str, str] = {}
    if cfg.prompts:
        for row in read_jsonl(Path(cfg.prompts)):
            if "image" not in row or "prompt" not in row:
                raise ValueError(f"videogpa.inputs.prompts {cfg.prompts}: every row needs 'image' and 'prompt'")
            prompts[row["image"]] = row["prompt"]
    if len(images) < cfg.count:
        raise ValueError(f"videogpa.inputs.count={cfg.count} but {root} holds {len(images)} images")
    out = []
    for i, path in enumerate(images[:cfg.count]):
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).float() / 255.0
        out.append(Condition(key=f"{i:05d}", first_frame=_fit(image, policy.height, policy.width),
                             prompt=prompts.get(path.name, "")))
    return out


def generate_input(policy: VideoPolicy, cond: Condition, index: int, cfg, folder: Path) -> dict[str, Any]:
    """Sample the K candidates of one input into ``folder`` (created); returns its meta.json content."""
    from geoforge.engine.data.video_io import encode_video

    folder.mkdir(parents=True, exist_ok=True)
    cond = policy.prepare_condition(cond)
    seeds = [seed_for(cfg.seed, index, k) for k in range(cfg.candidates)]
    began = time.perf_counter()
    videos = policy.sample(cond, seeds, cfg.steps, cfg.guidance)
    seconds = time.perf_counter() - began
    files = []
    for k, video in enumerate(videos):
        name = f"cand_{k:02d}.mp4"
        encode_video(folder / name, np.ascontiguousarray(video), fps=cfg.fps)
        files.append(name)
    save_file(cond.tensors(), str(folder / "condition.safetensors"))
    meta = {"key": cond.key, "index": index, "prompt": cond.prompt, "seeds": seeds, "files": files,
            "steps": cfg.steps, "guidance": cfg.guidance, "policy": policy.kind, "frames": policy.frames,
            "height": policy.height, "width": policy.width, "seconds": seconds}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1) + "\n")
    return meta


def run_generate_stage(recipe, run_dir: Path, world, policy: VideoPolicy, show_progress: bool = True) -> dict:
    """The ``generate`` stage (see the module docstring)."""
    from tqdm import tqdm

    from geoforge.engine.distributed import barrier

    root = Path(run_dir) / "candidates"
    marker = root / "COMPLETE"
    if marker.is_file():
        return {"skipped": True}
    cfg = recipe.videogpa.generate
    inputs = load_inputs(recipe, policy)
    root.mkdir(parents=True, exist_ok=True)
    mine = [(i, c) for i, c in enumerate(inputs) if i % world.size == world.rank and not (root / c.key).is_dir()]
    began = time.perf_counter()
    preempt = preemption.active()
    for i, cond in tqdm(mine, desc="generate", unit="input", disable=not (show_progress and world.is_main),
                        dynamic_ncols=True):
        if preempt.requested():   # preemption hook: keep the finished inputs, stop before the next
            break
        with atomic_dir(root / cond.key) as tmp:
            generate_input(policy, cond, i, cfg, tmp)
    seconds = time.perf_counter() - began
    if preempt.agreed():   # collective: every rank stops (the unsignalled ones after their share)
        kept = sum(1 for c in inputs if (root / c.key).is_dir())
        raise Preempted(None, None, preempt.signal_name,
                        f"videogpa generate stage ({kept} of {len(inputs)} inputs kept in {root})")
    barrier()
    info = {"inputs": len(inputs), "candidates": cfg.candidates, "generated_now": len(mine), "seconds": seconds}
    if world.is_main:
        missing = [c.key for c in inputs if not (root / c.key / "meta.json").is_file()]
        if missing:
            raise RuntimeError(f"generate stage: inputs {missing[:3]} are missing after every rank finished")
        write_marker(marker, {"inputs": [c.key for c in inputs], "candidates": cfg.candidates,
                              "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed})
        log.info(f"generate: {len(inputs)} inputs x {cfg.candidates} candidates in {root} "
                 f"({len(mine)} inputs generated now in {seconds:.1f} s)")
    barrier()
    return info


def candidate_items(run_dir: Path) -> list[dict[str, Any]]:
    """Every candidate of a complete ``generate`` stage: dicts(video = path relative to the run directory,
    input, candidate, seed), ordered by input then candidate."""
    root = Path(run_dir) / "candidates"
    marker = read_marker(root / "COMPLETE")
    if marker is None:
        raise FileNotFoundError(f"{root}/COMPLETE is missing: run the generate stage first")
    items = []
    for key in marker["inputs"]:
        meta = json.loads((root / key / "meta.json").read_text())
        for k, (name, seed) in enumerate(zip(meta["files"], meta["seeds"])):
            items.append({"video": f"candidates/{key}/{name}", "input": key, "candidate": k, "seed": seed})
    return items


def load_condition(run_dir: Path, key: str) -> Condition:
    """The stored conditioning input ``key`` of a run."""
    folder = Path(run_dir) / "candidates" / key
    meta = json.loads((folder / "meta.json").read_text())
    return Condition.from_tensors(key, load_file(str(folder / "condition.safetensors")), meta.get("prompt", ""))


__all__ = ["load_inputs", "generate_input", "run_generate_stage", "candidate_items", "load_condition"]
