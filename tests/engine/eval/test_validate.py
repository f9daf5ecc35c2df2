"""Periodic validation: an oracle model reproduces its clip (high PSNR), an untrained DiT does not; the
fixed validation batch and the tensorboard logging."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from geoforge.engine.config import load_recipe
from geoforge.engine.eval.validate import frame_strip, validate, validation_batch, write_sample_video, write_validation
from geoforge.engine.models.dit import DiTConfig, VideoDiT

T, HW = 4, 16


def _clip() -> torch.Tensor:
    """[2, T, 3, HW, HW] in [0, 1], distinct per video and frame."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 3, HW, HW, generator=g) * 0.5 + torch.linspace(0, 0.4, T)[None, :, None, None, None]


class ClipOracle(torch.nn.Module):
    """Optimal prediction of the known clip (the frame index is read from ``actions``): the velocity towards
    it, or (``prediction="x0"``) the clip itself."""

    def __init__(self, clip01: torch.Tensor, prediction: str = "velocity"):
        super().__init__()
        self.register_buffer("target", clip01 * 2 - 1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.prediction = prediction

    def forward(self, x, t, actions=None, **_):
        idx = actions[..., 0].round().long()
        x0 = torch.stack([self.target[b][idx[b]] for b in range(x.shape[0])])
        if self.prediction == "x0":
            return x0
        return torch.where(t[..., None, None, None] > 0, (x - x0) / t.clamp_min(1e-6)[..., None, None, None], 0 * x)


def _batch(clip: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"frames": clip, "actions": torch.arange(T, dtype=torch.float32)[None, :, None].expand(2, T, 1)}


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_validate_scores_an_oracle_far_above_an_untrained_model(prediction: str) -> None:
    """The recipe's objective.prediction says how validation reads the model's output."""
    recipe = load_recipe("dfot_tiny", ["logging.sample_steps=4", f"objective.prediction={prediction}"])
    clip = _clip()
    result = validate(ClipOracle(clip, prediction), _batch(clip), recipe, step=10)
    assert set(result.metrics) == {"val/psnr", "val/ssim", "val/psnr_first"}
    assert result.metrics["val/psnr"] > 60 and result.metrics["val/ssim"] > 0.999
    assert result.samples.shape == clip.shape and torch.equal(result.samples[:, :1], clip[:, :1])
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=1, num_heads=2, patch_size=4, action_dim=1))
    untrained = validate(dit, _batch(clip), recipe, step=10)
    assert untrained.metrics["val/psnr"] < 15
    again = validate(dit, _batch(clip), recipe, step=20)
    assert again.metrics == untrained.metrics  # the same noise at every validation


def test_validation_batch_and_tensorboard_logging(tmp_path) -> None:
    recipe = load_recipe("dfot_tiny", [f"data.root={tmp_path / 'data'}", "data.synthetic_clips=2",
                                       "data.synthetic_frames=4", "data.frames=4", "data.resolution=32",
                                       "logging.sample_steps=2"])
    batch = validation_batch(recipe, 2)
    assert batch["frames"].shape == (2, 4, 3, 32, 32)
    assert batch["intrinsics"].shape == (2, 4, 3, 3) and batch["extrinsics"].shape == (2, 4, 3, 4)
    assert torch.equal(validation_batch(recipe, 2)["frames"], batch["frames"])  # fixed clips
    with pytest.raises(ValueError, match="validate_videos"):
        validation_batch(recipe, 3)
    torch.manual_seed(0)
    dit = VideoDiT(recipe.model)
    result = validate(dit, batch, recipe, step=5)
    strip = frame_strip(result)
    assert strip.shape == (3, 2 * 2 * 32, 4 * 32)
    writer = SummaryWriter(str(tmp_path / "tb"))
    write_validation(writer, result, step=5)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "val/psnr" in events.Tags()["scalars"] and "val/frames" in events.Tags()["images"]
    assert events.Scalars("val/psnr")[0].value == pytest.approx(result.metrics["val/psnr"], rel=1e-6)
    # the videos: an animated GIF of every frame, GT | sample per row, decodable back to the frames
    assert "val/videos" in events.Tags()["images"]
    (video,) = events.Images("val/videos")
    assert video.step == 5 and (video.height, video.width) == (2 * 32, 2 * 32)
    gif = Image.open(io.BytesIO(video.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 4
    expected = (torch.cat([result.ground_truth, result.samples], dim=-1)[1] * 255).round()
    for t in range(4):
        gif.seek(t)
        frame = torch.from_numpy(np.array(gif.convert("RGB"))).permute(2, 0, 1).float()
        bottom = frame[:, 32:]   # video 1's row: GIF palettes quantise, so compare on average
        assert (bottom - expected[t]).abs().mean() < 12, t


def test_uvit3d_sample_video_runs_the_model_in_eval_mode(tmp_path) -> None:
    """The U-ViT3D's end-of-run sample (DFoT's DDIM) runs with dropout off (and so whole clips under sequence
    parallelism), and leaves the model training."""
    from geoforge.engine.distributed import World
    from geoforge.engine.models.arch import build_model

    recipe = load_recipe("uvit3d_tiny", ["model.uvit3d.block_dropouts=[0.0, 0.0, 0.5, 0.5]", "logging.sample_steps=2",
                                         "data.frames=2"])
    model = build_model(recipe.model).train()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    res = recipe.data.resolution
    batch = {"frames": torch.rand(1, 2, 3, res, res),
             "intrinsics": torch.tensor([[30.0, 0, res / 2], [0, 30.0, res / 2], [0, 0, 1]]).expand(1, 2, 3, 3),
             "extrinsics": torch.eye(3, 4).expand(1, 2, 3, 4)}
    world = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))
    path = write_sample_video(model, batch, recipe, tmp_path, 1, world)
    assert path.stat().st_size > 0
    assert modes and not any(modes) and model.training
