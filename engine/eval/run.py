"""``geoforge-eval``: generate videos for a protocol, compute the metrics, write the report (the command and its
options: :mod:`geoforge.engine.eval.options`).

The run: the recipe's model with the checkpoint's weights (:mod:`geoforge.engine.eval.load`) samples the protocol's
videos in aligned batches into ``videos/NNNNN.npz`` (:mod:`geoforge.engine.eval.video_files`), or reads them from
``--videos-dir``; then the metrics (:mod:`geoforge.engine.eval.metrics`), cached per video, and the report
(:mod:`geoforge.engine.eval.report`). Resumable per video.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from geoforge.engine import pixels
from geoforge.engine.atomic import TEMP_PREFIX
from geoforge.engine.distributed import resolve_device
from geoforge.engine.eval.load import load_model
from geoforge.engine.eval.metrics import Networks, aggregate, set_metrics, video_metrics
from geoforge.engine.eval.options import GRIDS, EvalOptions, guidance_option, parse_args
from geoforge.engine.eval.protocols import Protocol, get_protocol, rotation_extrinsics
from geoforge.engine.eval.report import frame_grid, write_report
from geoforge.engine.eval.video_files import load_generated, save_video, to_uint8, to_unit, video_path
from geoforge.engine.models.arch import condition_keys
from geoforge.engine.objectives.dfot_velocity import from_model_space, recipe_velocity_model, to_model_space
from geoforge.engine.precision import Precision, resolve_precision, use_precision
from geoforge.engine.sampling import SamplerConfig, generate


def log(text: str) -> None:
    print(f"[eval] {text}", file=sys.stderr, flush=True)


def build_eval_dataset(recipe, opts: EvalOptions, frames: int, num_videos: int):
    """The clips of the evaluation split (the synthetic one is rendered on first use from the training scenes' seed
    + 1: ``data.synthetic_seed``, else the recipe's seed)."""
    from geoforge.engine.data.re10k import Re10KClips
    from geoforge.engine.data.synthetic import ensure_synthetic_dataset

    data = recipe.data
    root = Path(opts.data_root or data.root)
    span = (frames - 1) * 1 + 1
    if data.kind == "synthetic" and not (root / opts.split).exists():
        clips = max(data.synthetic_clips, num_videos)
        log(f"rendering the synthetic {opts.split!r} split: {clips} clips of {max(data.synthetic_frames, span)} "
            f"frames into {root / opts.split}")
        ensure_synthetic_dataset(root, clips=clips, frames=max(data.synthetic_frames, span),
                                 resolution=data.resolution, seed=data.scene_seed(recipe.seed) + 1,
                                 split=opts.split)
    dataset = Re10KClips(root, split=opts.split, num_frames=frames, frame_skip=1, resolution=data.resolution,
                         seed=opts.seed, load_depth=False)
    if len(dataset) < num_videos:
        raise ValueError(f"--num-videos {num_videos}: the {opts.split!r} split of {root} has only {len(dataset)} clips")
    return dataset


def protocol_item(dataset, index: int, protocol: Protocol, frames: int, keys: tuple[str, ...]
                  ) -> dict[str, torch.Tensor]:
    """Ground truth and the conditioning ``keys`` of video ``index`` (rotation: the first camera turned 360
    degrees; DFoT's ``poses16`` follow: the first frame's normalised intrinsics + the turned extrinsics)."""
    item = dataset[index]
    cond = {k: item[k] for k in keys if k in item}
    if protocol.rotation:
        cond["extrinsics"] = rotation_extrinsics(item["extrinsics"][0], frames)
        cond["intrinsics"] = item["intrinsics"][:1].expand(frames, 3, 3).clone()
        cond.pop("actions", None)
        if "poses16" in cond:
            cond["poses16"] = torch.cat([cond["poses16"][:1, :4].expand(frames, 4), cond["extrinsics"].flatten(-2)], -1)
    return {"frames": item["frames"], **cond}


def time_grid_option(opts: EvalOptions, recipe) -> tuple[float, ...] | None:
    """The flow-time grid of ``--grid`` (None: the sampler's uniform ``time_grid``); ``dfot`` (``auto`` for the
    U-ViT3D): DFoT's DDIM levels of ``--steps`` steps, on which Euler is DFoT's DDIM sampler."""
    if opts.grid not in GRIDS:
        raise ValueError(f"--grid must be one of {GRIDS}, got {opts.grid!r}")
    if opts.grid == "uniform" or (opts.grid == "auto" and recipe.model.arch != "uvit3d"):
        return None
    from geoforge.engine.objectives.dfot_velocity import dfot_flow_times

    return dfot_flow_times(recipe.dfot, opts.steps)


def sampler_config(protocol: Protocol, opts: EvalOptions, window: int, frames: int,
                   times: tuple[float, ...] | None = None, recipe=None) -> SamplerConfig:
    """The sampler of a run: the guidance (``--guidance ...`` or the protocol's) with its levels, DFoT's units
    on every architecture, as flow times on ``recipe.dfot``'s schedule (:meth:`GuidanceSpec.to_guidance`;
    DFoT's RE10K schedule without a recipe)."""
    dfot = recipe.dfot if recipe is not None else None
    guidance = guidance_option(opts, protocol.guidance).to_guidance(dfot)
    interpolation = protocol.interpolation_guidance.to_guidance(dfot)
    return SamplerConfig(method=opts.method, steps=opts.steps, times=times, window=window,
                         sliding_context=opts.sliding_context,
                         keyframe_density=protocol.keyframe_density if frames > window else None,
                         guidance=guidance, interpolation_guidance=interpolation,
                         progress=opts.progress)


def generate_videos(opts: EvalOptions, recipe, protocol: Protocol, dataset, out: Path, num_videos: int,
                    frames: int, context: int, sampler: SamplerConfig, device: torch.device) -> None:
    """Write ``videos/NNNNN.npz`` for every video not there yet (sampled, or read from ``--videos-dir``).

    Videos go in aligned batches ``[k B, (k + 1) B)`` with noise from ``(seed, k B)``; a batch with a
    missing video is regenerated whole (same result) and only the missing files are written.
    """
    for stale in [*out.glob(f"videos/{TEMP_PREFIX}*"), *out.glob(f"per_video/{TEMP_PREFIX}*")]:  # left by a killed run
        stale.unlink()
    done = {i for i in range(num_videos) if video_path(out, i).is_file()}
    pending = [i for i in range(num_videos) if i not in done]
    if done:
        log(f"resuming: {len(done)} of {num_videos} videos already in {out / 'videos'}")
    model = None
    keys = condition_keys(recipe.model.arch)
    for batch_id in sorted({i // opts.batch_size for i in pending}):
        indices = [i for i in range(batch_id * opts.batch_size, (batch_id + 1) * opts.batch_size) if i < num_videos]
        items = [protocol_item(dataset, i, protocol, frames, keys) for i in indices]
        gt = torch.stack([it["frames"] for it in items])
        cond = {k: torch.stack([it[k] for it in items]) for k in keys if k in items[0]}
        if opts.videos_dir:
            generated = torch.stack([to_unit(load_generated(_external_video(Path(opts.videos_dir), i))["generated"])
                                     for i in indices])
            if generated.shape != gt.shape:
                raise ValueError(f"--videos-dir videos are {tuple(generated.shape[1:])}, the protocol needs "
                                 f"{tuple(gt.shape[1:])}")
        else:
            if model is None:
                model = recipe_velocity_model(load_model(recipe, opts.checkpoint, opts.weights, device), recipe)
            g = torch.Generator(device=device).manual_seed(opts.seed * 1_000_003 + indices[0])
            sample = generate(model, to_model_space(model, pixels.to_signed(gt[:, :context])), frames, cond, sampler,
                              generator=g, desc=f"videos {indices[0]}-{indices[-1]}")
            generated = pixels.to_unit(from_model_space(model, sample).cpu())
            generated[:, :context] = gt[:, :context]
        for j, i in enumerate(indices):
            if i not in done:
                record = {"generated": to_uint8(generated[j]), "context": context,
                          **{k: v[j].cpu().numpy() for k, v in cond.items()}}
                if not protocol.rotation:
                    record["gt"] = to_uint8(gt[j])
                save_video(video_path(out, i), record)
        log(f"videos {indices[0]}-{indices[-1]} written")


def _external_video(folder: Path, index: int) -> Path:
    for suffix in (".npz", ".mp4"):
        if (folder / f"{index:05d}{suffix}").is_file():
            return folder / f"{index:05d}{suffix}"
    raise FileNotFoundError(f"--videos-dir {folder}: no {index:05d}.npz or {index:05d}.mp4")




def output_dir(opts: EvalOptions, protocol: Protocol) -> Path:
    """``--out``, else ``<checkpoint or videos dir>/eval/<protocol>`` (a file's folder; for an ``hf://``
    reference ``eval/<file stem>/<protocol>`` in the working directory)."""
    if opts.out:
        return Path(opts.out)
    source = str(opts.checkpoint or opts.videos_dir)
    if source.startswith("hf://"):
        return Path("eval") / Path(source).stem / protocol.name
    base = Path(source)
    return (base.parent if base.is_file() else base) / "eval" / protocol.name


def run(opts: EvalOptions, networks: Networks | None = None) -> dict:
    """Evaluate (see the module docstring); ``networks`` replaces the ones built from the options (tests)."""
    from geoforge.engine.config import load_recipe

    recipe = load_recipe(opts.recipe, opts.overrides)
    protocol = get_protocol(opts.protocol)
    frames = opts.frames or protocol.frames
    context = opts.context if opts.context is not None else protocol.context
    num_videos = opts.num_videos or protocol.num_videos
    if num_videos < 1 or opts.batch_size < 1 or not 0 < context < frames:
        raise ValueError(f"need --num-videos >= 1, --batch-size >= 1 and 0 < context ({context}) < frames ({frames})")
    if opts.checkpoint is None and opts.videos_dir is None:
        raise ValueError("give --checkpoint (to sample) or --videos-dir (to evaluate existing videos)")
    out = output_dir(opts, protocol)
    device = resolve_device(opts.device)
    with use_precision(resolve_precision(opts.precision or recipe.distributed.precision, device)) as precision:
        log(f"precision: {precision.describe()}")
        return _run(opts, networks, recipe, protocol, frames, context, num_videos, out, device, precision)


def _run(opts: EvalOptions, networks: Networks | None, recipe, protocol, frames: int, context: int, num_videos: int,
         out: Path, device: torch.device, precision: Precision) -> dict:
    window = min(opts.window or recipe.data.frames, frames)
    sampler = sampler_config(protocol, opts, window, frames, time_grid_option(opts, recipe), recipe)
    dataset = build_eval_dataset(recipe, opts, frames, num_videos)
    log(f"{protocol.name}: {num_videos} videos of {frames} frames ({context} context), window {window}, "
        f"{opts.steps} {opts.method} steps on the {'dfot' if sampler.times else 'uniform'} grid, output {out}")

    generate_videos(opts, recipe, protocol, dataset, out, num_videos, frames, context, sampler, device)
    nets = networks if networks is not None else Networks.from_options(opts, device, recipe.backend)
    skipped = dict(nets.skipped)
    for name, reason in skipped.items():
        log(f"skipped {name}: {reason}")
    per_video = [video_metrics(out, i, nets, context) for i in range(num_videos)]
    metrics, curves = aggregate(per_video, context)
    metrics.update(set_metrics(lambda i: load_generated(video_path(out, i)), num_videos, nets, context, skipped))
    rows = []
    for i in range(min(4, num_videos)):
        record = load_generated(video_path(out, i))
        rows += [record["gt"], record["generated"]] if "gt" in record else [record["generated"]]
    has_gt = not protocol.rotation
    summary = {
        "protocol": protocol.name, "recipe": recipe.name, "checkpoint": str(opts.checkpoint or opts.videos_dir),
        "weights": opts.weights, "num_videos": num_videos, "frames": frames, "context": context,
        "precision": precision.describe(),
        "sampler": {k: v for k, v in asdict(sampler).items() if k not in ("progress",)},
        "guidance": {"prediction": asdict(guidance_option(opts, protocol.guidance)),   # the user's units
                     "interpolation": asdict(protocol.interpolation_guidance)},
        "metrics": dict(sorted(metrics.items())), "skipped": skipped,
        "grid_caption": ("Rows alternate ground truth / generated" if has_gt else "Generated rotation videos")
                        + f" (first {min(4, num_videos)} videos, evenly spaced frames).",
    }
    report = write_report(out, summary, curves if frames > 1 else None, frame_grid(rows))
    log(f"report: {report}")
    for name, value in summary["metrics"].items():
        log(f"  {name:>14s}: {value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"  {name:>14s}: {value}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from geoforge.engine.checkpoint import CheckpointError
    from geoforge.engine.errors import UserError

    opts = parse_args(argv)
    try:
        run(opts)
    except (UserError, ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
