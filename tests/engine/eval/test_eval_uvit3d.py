"""``geoforge-eval`` on DFoT's U-ViT3D (``model.arch: uvit3d``): a checkpoint shaped like the released
DFoT / Geometry Forcing files (a Lightning dict, random tensors under the real ``diffusion_model.model.`` keys,
EMA in ``optimizer_states[0]["ema"]``) loads through ``--checkpoint`` and the protocols run end to end on CPU
through the v-prediction adapter on DFoT's DDIM grid: short16 (CLI), a small long video (keyframes +
interpolation) under history guidance, and the rotation protocol, whose DFoT ``poses16`` follow the turned
cameras."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from processes import subprocess_env
from geoforge.engine.config import load_recipe
from geoforge.engine.eval.protocols import get_protocol
from geoforge.engine.eval.load import load_model
from geoforge.engine.eval.metrics import Networks
from geoforge.engine.eval.options import parse_args
from geoforge.engine.eval.run import protocol_item, run, sampler_config, time_grid_option
from geoforge.engine.eval.video_files import load_generated
from geoforge.engine.objectives.dfot_velocity import dfot_flow_times, dfot_level_time
from geoforge.engine.models.arch import build_model
from geoforge.engine.sampling import Guidance

REPO = Path(__file__).resolve().parents[3]
RECIPE = """
name: eval_uvit3d_tiny
seed: 0
backend: reference
model:
  arch: uvit3d
  uvit3d: {{channels: [32, 64], emb_channels: 32, block_types: [ResBlock, TransformerBlock],
           block_dropouts: [0.0, 0.0], num_updown_blocks: [1], num_mid_blocks: 1, num_heads: 2,
           use_checkpointing: [false, false], resolution: 32, max_frames: 4}}
objective: {{timestep_sampling: uniform, noise_level: independent, context_frames: 0}}
data: {{kind: synthetic, root: {root}, frames: 4, resolution: 32, batch_size: 2, synthetic_clips: 3,
        synthetic_frames: 12}}
gf: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The recipe and a released-format Lightning checkpoint (raw weights in ``state_dict``, different EMA
    weights in ``optimizer_states[0]["ema"]``, parameter order)."""
    tmp = tmp_path_factory.mktemp("evaluvit")
    recipe_path = tmp / "eval_uvit3d_tiny.yaml"
    recipe_path.write_text(RECIPE.format(root=tmp / "data"))
    recipe = load_recipe(str(recipe_path))
    backbone = build_model(recipe.model)
    names = [n for n, _ in backbone.named_parameters()]
    g = torch.Generator().manual_seed(0)
    raw = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
           for k, v in backbone.state_dict().items()}
    ema = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in raw.items()}
    ckpt = tmp / "geometry_forcing_state_dict.ckpt"
    torch.save({"state_dict": {"diffusion_model.model." + k: v for k, v in raw.items()},
                "optimizer_states": [{"ema": [ema[n] for n in names], "decay": 0.9999}], "lr_schedulers": [],
                "epoch": 0, "global_step": 10, "pretrained_ema": False}, ckpt)
    return {"tmp": tmp, "recipe": str(recipe_path), "ckpt": str(ckpt), "raw": raw, "ema": ema, "names": names}


def test_released_checkpoint_loads_through_the_one_weights_path(setup, tmp_path) -> None:
    recipe = load_recipe(setup["recipe"])
    model = load_model(recipe, setup["ckpt"], "ema")
    for name, value in model.state_dict().items():   # EMA for parameters, the file's state_dict for buffers
        expected = setup["ema"][name] if name in setup["names"] else setup["raw"][name]
        assert torch.equal(value, expected), name
    raw = load_model(recipe, setup["ckpt"], "model")
    assert all(torch.equal(v, setup["raw"][k]) for k, v in raw.state_dict().items())
    step = tmp_path / "checkpoints" / "step_3"   # GeoForge's own checkpoint of a U-ViT3D run, as today
    step.mkdir(parents=True)
    save_file({f"dit.{k}": v.contiguous() for k, v in setup["raw"].items()}, str(step / "ema.safetensors"))
    (step / "COMPLETE").write_text("step 3\n")
    mine = load_model(recipe, tmp_path, "ema")
    assert all(torch.equal(v, setup["raw"][k]) for k, v in mine.state_dict().items())
    # the trainer's EMA file holds parameters only: the Fourier buffers come from model.safetensors beside it
    save_file({f"dit.{k}": setup["ema"][k].contiguous() for k in setup["names"]}, str(step / "ema.safetensors"))
    save_file({f"dit.{k}": v.contiguous() for k, v in setup["raw"].items()}, str(step / "model.safetensors"))
    mine = load_model(recipe, step, "ema")
    assert all(torch.equal(v, setup["ema"][k] if k in setup["names"] else setup["raw"][k])
               for k, v in mine.state_dict().items())


def test_cli_short16_on_a_released_format_checkpoint(setup) -> None:
    out = setup["tmp"] / "short16"
    args = ["--recipe", setup["recipe"], "--checkpoint", setup["ckpt"], "--protocol", "short16", "--frames", "6",
            "--num-videos", "2", "--steps", "3", "--batch-size", "2", "--out", str(out), "--no-progress"]
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "geoforge.engine.eval", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(optimizer_states[0]['ema']" in proc.stderr and "on the dfot grid" in proc.stderr, proc.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_videos"] == 2 and len(summary["sampler"]["times"]) == 4
    assert summary["sampler"]["guidance"]["history"] == "vanilla"   # the protocol's stabilized HG-v
    assert torch.isfinite(torch.tensor(summary["metrics"]["psnr"]))
    assert (out / "report.md").is_file() and (out / "samples.png").stat().st_size > 0
    record = load_generated(out / "videos" / "00000.npz")
    assert record["generated"].shape == (6, 3, 32, 32) and (record["generated"] != record["gt"]).any()


@pytest.mark.parametrize("guidance", [["--guidance", "stabilized_fractional", "--guidance-scale", "2",
                                       "--stabilization-level", "0.02"],
                                      ["--guidance", "temporal", "--subsets=-1;0", "--subset-weights", "1.5,1"]])
def test_long_video_protocol_with_history_guidance(setup, guidance) -> None:
    """long256 cut to 12 frames in 4-frame windows: keyframes (autoregressive, the chosen HG) then
    interpolation (the protocol's HG-v 1.5), every frame generated and finite."""
    out = setup["tmp"] / f"long_{guidance[1]}"
    opts = parse_args(["--recipe", setup["recipe"], "--checkpoint", setup["ckpt"], "--protocol", "long256",
                       "--frames", "12", "--num-videos", "1", "--steps", "2", "--out", str(out), "--no-progress",
                       *guidance])
    summary = run(opts, networks=Networks())
    assert summary["frames"] == 12
    assert summary["sampler"]["keyframe_density"] == get_protocol("long256").keyframe_density
    assert summary["sampler"]["guidance"]["history"] == guidance[1].removeprefix("stabilized_")
    record = load_generated(out / "videos" / "00000.npz")
    assert record["generated"].shape == (12, 3, 32, 32)
    curve = json.loads((out / "metrics.json").read_text())["per_frame"]["psnr"]
    assert len(curve) == 12 and curve[0] is None and all(v is not None for v in curve[1:])
    assert (out / "report.md").is_file()


def test_rotation_protocol_runs_and_turns_dfot_poses(setup) -> None:
    out = setup["tmp"] / "rot"
    summary = run(parse_args(["--recipe", setup["recipe"], "--checkpoint", setup["ckpt"], "--protocol", "rotation360",
                              "--frames", "5", "--num-videos", "2", "--steps", "2", "--out", str(out),
                              "--no-progress"]), networks=Networks())
    assert "revisit_psnr" in summary["metrics"] and "psnr" not in summary["metrics"]

    class WithPoses:   # a RealEstate10K-like item: DFoT's poses16 next to the cameras
        def __getitem__(self, index):
            ext = torch.cat([torch.eye(3), torch.tensor([[0.1], [0.2], [0.3]])], 1).expand(5, 3, 4).clone()
            k = torch.tensor([[20.0, 0, 15.5], [0, 20.0, 15.5], [0, 0, 1]]).expand(5, 3, 3).clone()
            p16 = torch.cat([torch.tensor([0.7, 0.8, 0.5, 0.5]).expand(5, 4), ext.flatten(-2)], -1)
            return {"frames": torch.zeros(5, 3, 32, 32), "intrinsics": k, "extrinsics": ext, "poses16": p16}

    item = protocol_item(WithPoses(), 0, get_protocol("rotation360"), 5, ("poses16", "intrinsics", "extrinsics"))
    torch.testing.assert_close(item["poses16"][:, 4:], item["extrinsics"].flatten(-2))   # the turned cameras
    torch.testing.assert_close(item["poses16"][:, :4], torch.tensor([0.7, 0.8, 0.5, 0.5]).expand(5, 4))
    assert not torch.allclose(item["extrinsics"][2], item["extrinsics"][0])


def test_uvit3d_sampler_defaults_are_dfots(setup) -> None:
    """For the U-ViT3D: DFoT's DDIM grid (--grid auto) and the guidance levels read in DFoT's units (GF's
    stabilized HG-v 4 / 0.02 -> generated history at DFoT's level 19); --grid uniform gives the linear grid."""
    recipe = load_recipe(setup["recipe"])
    opts = parse_args(["--recipe", setup["recipe"], "--protocol", "long256", "--videos-dir", "unused"])
    protocol = get_protocol("long256")
    sampler = sampler_config(protocol, opts, 4, 256, time_grid_option(opts, recipe), recipe)
    assert sampler.times == dfot_flow_times(recipe.dfot, 50)
    assert sampler.guidance.history == "vanilla" and sampler.guidance.scale == 4.0
    assert sampler.guidance.stabilization == dfot_level_time(recipe.dfot, 0.02)
    assert sampler.interpolation_guidance == Guidance("vanilla", 1.5)   # HG-v 1.5: no levels to convert
    opts = parse_args(["--recipe", setup["recipe"], "--protocol", "long256", "--videos-dir", "unused",
                       "--grid", "uniform", "--guidance", "fractional", "--guidance-scale", "2", "--freq-scale", "0.5"])
    sampler = sampler_config(protocol, opts, 4, 256, time_grid_option(opts, recipe), recipe)
    assert sampler.times is None and sampler.guidance.fraction == dfot_level_time(recipe.dfot, 0.5)
