"""Periodic validation during training: context-conditioned samples of a few fixed clips, cheap metrics.

The training loop calls, every ``logging.validate_every`` steps::

    result = validate(dit, val_batch, recipe, step)       # every rank under ZeRO-3, rank 0 otherwise
    if world.is_main:
        write_validation(tb_writer, result, step)         # scalars, a GT / sample frame strip, GIF videos

:func:`validation_batch` builds the fixed batch once (the first ``logging.validate_videos`` clips of
the recipe's dataset). A sample keeps the first ``max(1, objective.context_frames)`` frames of its
clip as clean context and generates the rest with the clip's cameras / actions
(``logging.sample_steps`` Euler steps, conditional, the noise drawn from ``recipe.seed``, so every
validation of a run sees the same noise and its metrics are comparable across steps). DFoT's U-ViT3D
(``model.arch: uvit3d``) samples through the v-prediction adapter
(``engine.objectives.dfot_velocity``) in DFoT's normalised pixel space on DFoT's DDIM grid, which makes
these Euler steps DFoT's own DDIM sampler. Metrics over
the generated frames: ``val/psnr`` and ``val/ssim`` (mean over frames and videos), and
``val/psnr_first`` (the first generated frame, the one closest to the context).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from geoforge.engine import pixels
from geoforge.engine.eval.image_metrics import psnr, ssim
from geoforge.engine.models.arch import condition_keys
from geoforge.engine.objectives.dfot_velocity import default_times, from_model_space, recipe_velocity_model, to_model_space
from geoforge.engine.sampling import COND_KEYS, SamplerConfig, generate, sample_clip


@dataclass
class ValidationResult:
    """Scalar metrics and the videos behind them (float [N, T, 3, H, W] in [0, 1], on the CPU)."""

    metrics: dict[str, float]
    samples: torch.Tensor
    ground_truth: torch.Tensor
    context: int


def validation_batch(recipe, num_videos: int, world=None) -> dict[str, torch.Tensor]:
    """The first ``num_videos`` clips of the recipe's dataset as one batch (fixed start frames, no flips)."""
    from geoforge.engine.data.builder import build_dataset
    from geoforge.engine.distributed import World

    if num_videos < 1:
        raise ValueError(f"validation needs num_videos >= 1, got {num_videos}")
    world = world or World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))
    recipe = replace(recipe, data=replace(recipe.data, hflip_prob=0.0))
    dataset = build_dataset(recipe.data, world, recipe.seed)
    if len(dataset) < num_videos:
        raise ValueError(f"logging.validate_videos={num_videos} but the dataset has {len(dataset)} clips")
    items = [dataset[i] for i in range(num_videos)]
    return {k: torch.stack([it[k] for it in items]) for k in ("frames", *COND_KEYS) if k in items[0]}


@torch.no_grad()
def validate(dit: torch.nn.Module, batch: dict[str, torch.Tensor], recipe, step: int,
             steps: int | None = None) -> ValidationResult:
    """Sample ``batch`` (``frames [N, T, 3, H, W]`` in [0, 1] + per-frame cameras / actions) from its
    context frames and score the generated frames against the clip (module docstring)."""
    device = next(dit.parameters()).device
    frames = batch["frames"].to(device).float()
    n, t = frames.shape[:2]
    context = max(1, recipe.objective.context_frames)
    if context >= t:
        raise ValueError(f"validation clips have {t} frames; {context} context frames leave none to generate")
    cond = {k: batch[k].to(device).float() for k in condition_keys(recipe.model.arch) if k in batch}
    model = recipe_velocity_model(dit, recipe)
    steps = steps or recipe.logging.sample_steps
    sampler = SamplerConfig(steps=steps, window=t, progress=False, times=default_times(model, steps))
    g = torch.Generator().manual_seed(recipe.seed)
    sample = generate(model, to_model_space(model, pixels.to_signed(frames[:, :context])), t, cond, sampler,
                      generator=g)
    sample = pixels.to_unit(from_model_space(model, sample)).cpu()
    gt = frames.cpu()
    gen, ref = sample[:, context:], gt[:, context:]
    metrics = {"val/psnr": float(psnr(gen, ref).mean()), "val/ssim": float(ssim(gen, ref).mean()),
               "val/psnr_first": float(psnr(gen[:, 0], ref[:, 0]).mean())}
    return ValidationResult(metrics=metrics, samples=sample, ground_truth=gt, context=context)


def frame_strip(result: ValidationResult, max_videos: int = 4, max_frames: int = 8) -> torch.Tensor:
    """An image [3, H', W'] in [0, 1]: per video a ground-truth row above a sample row."""
    rows = []
    t = result.samples.shape[1]
    pick = torch.linspace(0, t - 1, min(t, max_frames)).round().long()
    for gt, sample in zip(result.ground_truth[:max_videos], result.samples[:max_videos]):
        for video in (gt, sample):
            rows.append(torch.cat(list(video[pick]), dim=-1))
    return torch.cat(rows, dim=-2)


def video_grid(result: ValidationResult, max_videos: int = 4) -> torch.Tensor:
    """uint8 [T, H', W', 3]: per video a row of ground truth | sample, videos stacked top to bottom."""
    rows = [torch.cat([gt, sample], dim=-1) for gt, sample in
            zip(result.ground_truth[:max_videos], result.samples[:max_videos])]   # [T, 3, H, 2W] each
    grid = torch.cat(rows, dim=-2)
    return pixels.to_uint8(grid).permute(0, 2, 3, 1).contiguous()


def gif_bytes(frames: torch.Tensor, fps: float = 4.0) -> bytes:
    """An animated GIF (looping) of uint8 frames [T, H, W, 3]."""
    import io

    from PIL import Image

    images = [Image.fromarray(f.cpu().numpy()) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


@torch.no_grad()
def write_sample_video(dit: torch.nn.Module, batch: dict[str, torch.Tensor], recipe, run_dir: Path, step: int,
                       world) -> Path:
    """Generate the first clip of ``batch`` (its cameras / actions, its first ``max(1, context_frames)``
    frames as clean context; ``logging.sample_steps`` Euler steps - DFoT's DDIM for the U-ViT3D, see the
    module docstring - noise from ``seed + step``) and write
    ``samples/step_N.mp4``: ground truth left, sample right (:func:`video_grid`). Every rank runs the
    sampler (ZeRO-3 needs the forward in lock-step); rank 0 writes, atomically."""
    from geoforge.engine.atomic import atomic_save
    from geoforge.engine.data.video_io import encode_video

    frames = batch["frames"][:1].float()   # float32 context, cameras and flow times whatever the model's dtype
    model = recipe_velocity_model(dit, recipe)
    x0 = to_model_space(model, pixels.to_signed(frames))
    cond = {k: batch[k][:1].float() for k in condition_keys(recipe.model.arch) if k in batch}
    context = max(1, recipe.objective.context_frames)
    steps = recipe.logging.sample_steps
    g = torch.Generator(device="cpu").manual_seed(recipe.seed + step)
    sample = sample_clip(model, x0.shape, steps, cond, generator=g, context=x0[:, :context],
                         times=default_times(model, steps))
    sample = from_model_space(model, sample)
    path = Path(run_dir) / "samples" / f"step_{step}.mp4"
    if world.is_main:
        result = ValidationResult({}, pixels.to_unit(sample.float()).cpu(), frames.float().cpu(), context)
        rgb = video_grid(result, max_videos=1).cpu().numpy()
        atomic_save(path, lambda tmp: encode_video(tmp, rgb, fps=8))
    return path


def write_validation(writer, result: ValidationResult, step: int, fps: float = 4.0) -> None:
    """Log ``result`` to a tensorboard ``SummaryWriter``: the scalars, a frame strip image, and the videos
    (GT | sample) as an animated GIF image summary - the summary ``add_video`` writes, encoded here with
    Pillow instead of moviepy, shown animated in tensorboard's Images tab."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    for name, value in result.metrics.items():
        writer.add_scalar(name, value, step)
    writer.add_image("val/frames", frame_strip(result), step)
    grid = video_grid(result)
    image = Summary.Image(height=grid.shape[1], width=grid.shape[2], colorspace=3,
                          encoded_image_string=gif_bytes(grid, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="val/videos", image=image)]), step)
