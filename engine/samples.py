"""Sample videos written during training: the model's generation beside the clip it was conditioned on."""
from __future__ import annotations

from pathlib import Path

import torch

from engine import pixels
from engine.atomic import atomic_save
from engine.config import Recipe
from engine.distributed import World
from engine.objectives.flow_matching import euler_sample
from engine.data.video_io import encode_video


@torch.no_grad()
def write_sample_video(dit: torch.nn.Module, batch: dict[str, torch.Tensor], recipe: Recipe, run_dir: Path,
                       step: int, world: World) -> Path:
    """Generate the first clip of ``batch`` (its cameras, its first frame as clean context) and write
    ``samples/step_N.mp4``: ground truth left, sample right. Every rank runs the sampler (ZeRO-3 needs
    the forward in lock-step); rank 0 writes."""
    was_training = dit.training
    dit.eval()
    dtype = next(dit.parameters()).dtype
    frames = batch["frames"][:1].to(dtype)
    x0 = pixels.to_signed(frames)
    cond = {k: batch[k][:1].to(dtype) for k in ("intrinsics", "extrinsics", "actions") if k in batch}
    context = max(1, recipe.objective.context_frames)
    g = torch.Generator(device="cpu").manual_seed(recipe.seed + step)
    sample = euler_sample(dit, x0.shape, recipe.logging.sample_steps, cond, generator=g,
                          context=x0[:, :context])
    dit.train(was_training)
    path = Path(run_dir) / "samples" / f"step_{step}.mp4"
    if world.is_main:
        video = torch.cat([frames[0].float(), pixels.to_unit(sample[0].float())], dim=-1)  # [T,3,H,2W]
        rgb = pixels.to_uint8(video).permute(0, 2, 3, 1).numpy()
        atomic_save(path, lambda tmp: encode_video(tmp, rgb, fps=8))
    return path
