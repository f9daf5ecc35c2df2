"""Sample videos written during training: the model's generation beside the clip it was conditioned on."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine.config import Recipe
from engine.distributed import World
from engine.objectives.dfot_diffusion import DiscreteSchedule, ddim_sample
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
    x0 = frames * 2 - 1
    cond = {k: batch[k][:1].to(dtype) for k in ("intrinsics", "extrinsics", "actions") if k in batch}
    context = max(1, recipe.objective.context_frames)
    g = torch.Generator(device="cpu").manual_seed(recipe.seed + step)
    if recipe.model.arch == "uvit3d":   # DFoT's diffusion: DDIM on its discrete schedule, data mean/std space
        schedule = DiscreteSchedule(replace(recipe.dfot, sampling_timesteps=min(recipe.logging.sample_steps,
                                                                                 recipe.dfot.timesteps)))
        cams = ({"poses16": batch["poses16"][:1].float()} if "poses16" in batch   # DFoT's raw poses (re10k data)
                else {k: v for k, v in cond.items() if k != "actions"})
        x = ddim_sample(lambda xt, n: dit(xt, n, **cams), frames.shape, schedule,
                        context=recipe.dfot.normalize(frames[:, :context]), generator=g, device=frames.device)
        sample = recipe.dfot.unnormalize(x) * 2 - 1
    else:
        sample = euler_sample(dit, x0.shape, recipe.logging.sample_steps, cond, generator=g,
                              context=x0[:, :context])
    dit.train(was_training)
    path = Path(run_dir) / "samples" / f"step_{step}.mp4"
    if world.is_main:
        video = torch.cat([frames[0].float(), (sample[0].float().clamp(-1, 1) + 1) / 2], dim=-1)  # [T,3,H,2W]
        pixels = (video * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        encode_video(tmp, pixels, fps=8)
        tmp.replace(path)
    return path
