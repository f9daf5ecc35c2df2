"""``geoforge-eval`` on a tiny checkpoint: report files, named skipped metrics, resume, all metrics
with tiny networks, evaluating existing videos, and the rotation protocol."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from processes import SUBPROCESS_THREADS, subprocess_env, torch_threads
from geoforge.engine.eval.geometry import VGGTGeometry
from geoforge.engine.eval.lpips import LPIPS
from geoforge.engine.eval.metrics import Networks
from geoforge.engine.eval.options import parse_args
from geoforge.engine.eval.run import run
from geoforge.engine.eval.video_files import load_generated
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from tiny_nets import tiny_vggt

REPO = Path(__file__).resolve().parents[3]
RECIPE = """
name: eval_tiny
seed: 0
backend: reference
model: {{size: tiny, hidden_dim: 32, depth: 1, num_heads: 2, patch_size: 8, camera: rays, camera_freqs: 2}}
objective: {{prediction: x0}}   # a pixel-space DiT with 8x8 patches under width 32: x-prediction (engine.config guard)
data: {{kind: synthetic, root: {root}, frames: 4, resolution: 32, batch_size: 2, synthetic_clips: 3,
        synthetic_frames: 8}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A recipe YAML, a checkpoint dir (``step_1/ema.safetensors``, training-module keys) and a tiny VGGT."""
    tmp = tmp_path_factory.mktemp("evalcli")
    recipe = tmp / "eval_tiny.yaml"
    recipe.write_text(RECIPE.format(root=tmp / "data"))
    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(size="tiny", hidden_dim=32, depth=1, num_heads=2, patch_size=8, camera="rays",
                             camera_freqs=2))
    with torch.no_grad():  # non-zero output layers: the untrained DiT would otherwise predict 0
        for p in (dit.final.linear.weight, dit.final.ada.weight, dit.blocks[0].ada.weight):
            p.normal_(0, 0.05)
    ckpt = tmp / "run" / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    save_file({f"dit.{k}": v.contiguous() for k, v in dit.state_dict().items()}, str(ckpt / "ema.safetensors"))
    (ckpt / "COMPLETE").write_text("step 1\n")
    vggt = tmp / "vggt"
    tiny_vggt().save_pretrained(vggt)
    return {"tmp": tmp, "recipe": str(recipe), "ckpt": str(ckpt), "run": str(tmp / "run"), "vggt": str(vggt)}


def _args(setup: dict, out: Path, num_videos: int, *extra: str) -> list[str]:
    return ["--recipe", setup["recipe"], "--checkpoint", setup["ckpt"], "--protocol", "short16", "--frames", "6",
            "--num-videos", str(num_videos), "--steps", "2", "--batch-size", "2", "--out", str(out),
            "--no-progress", *extra]


class StatsFeatures(torch.nn.Module):
    """Stand-in for I3D / Inception: per-channel mean and std of a video [B, T, 3, H, W] or images [N, 3, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # images [N, 3, H, W]
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        per_video = x.transpose(1, 2).flatten(2)  # [B, 3, T*H*W]
        return torch.cat([per_video.mean(-1), per_video.std(-1)], dim=1)


def tiny_networks(setup: dict) -> Networks:
    torch.manual_seed(0)
    lpips = LPIPS()
    for lin in lpips.lins:  # LPIPS' learned weights are non-negative
        lin.model[1].weight.data.abs_()
    return Networks(fvd=StatsFeatures(), fid=StatsFeatures(), lpips=lpips,
                    geometry=VGGTGeometry.from_pretrained(setup["vggt"], resolution=28, backend="reference"))


def test_cli_report_skips_and_resume(setup) -> None:
    out = setup["tmp"] / "short"
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "geoforge.engine.eval", *_args(setup, out, 2, "--vggt", setup["vggt"],
                                                                          "--vggt-resolution", "28")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, flag in (("fvd", "--i3d"), ("fid", "--inception"), ("lpips", "--lpips-backbone")):
        assert f"skipped {name}: no " in proc.stderr and flag in proc.stderr, proc.stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["skipped"]) == {"fvd", "fid", "lpips"}
    assert {"psnr", "ssim", "reproj_gen", "reproj_gt", "reproj_ratio", "rot_err", "cammc"} <= set(summary["metrics"])
    assert summary["num_videos"] == 2 and len(summary["per_frame"]["psnr"]) == 6
    assert summary["per_frame"]["psnr"][0] is None  # the context frame
    report = (out / "report.md").read_text()
    assert "| psnr |" in report and "## Skipped metrics" in report and "**fvd**" in report
    assert (out / "per_frame.png").stat().st_size > 0 and (out / "samples.png").stat().st_size > 0
    first = {i: (out / "videos" / f"{i:05d}.npz").stat().st_mtime_ns for i in range(2)}

    # "Killed" after two videos: a rerun on the full set keeps them and adds the third. The videos are compared
    # bit for bit with the CLI's below: rendered here on the CLI process's thread count (tests/processes.py).
    (out / "videos" / ".tmp-999-00002.npz").write_bytes(b"partial write of a killed run")
    with torch_threads(SUBPROCESS_THREADS):
        summary = run(parse_args(_args(setup, out, 3, "--vggt", setup["vggt"], "--vggt-resolution", "28")))
    assert {i: (out / "videos" / f"{i:05d}.npz").stat().st_mtime_ns for i in range(2)} == first
    assert not list((out / "videos").glob(".tmp-*"))  # the killed run's partial file is gone
    assert summary["num_videos"] == 3 and len(list((out / "per_video").glob("*.json"))) == 3
    record = load_generated(out / "videos" / "00002.npz")
    assert record["generated"].shape == (6, 3, 32, 32) and record["gt"].shape == (6, 3, 32, 32)
    assert np.array_equal(record["generated"][0], record["gt"][0])  # the context frame

    # A fresh run of all three videos reproduces the resumed one (aligned batches, seeded per batch).
    fresh = setup["tmp"] / "fresh"
    with torch_threads(SUBPROCESS_THREADS):
        run(parse_args(_args(setup, fresh, 3)))
    for i in range(3):
        a, b = load_generated(out / "videos" / f"{i:05d}.npz"), load_generated(fresh / "videos" / f"{i:05d}.npz")
        assert np.array_equal(a["generated"], b["generated"]) and np.array_equal(a["gt"], b["gt"])


def test_all_metrics_with_tiny_networks_on_existing_videos(setup) -> None:
    source = setup["tmp"] / "source"
    base = run(parse_args(_args(setup, source, 3)))
    out = setup["tmp"] / "all"
    opts = parse_args(["--recipe", setup["recipe"], "--videos-dir", str(source / "videos"), "--protocol", "short16",
                       "--frames", "6", "--num-videos", "3", "--out", str(out), "--no-progress"])
    summary = run(opts, networks=tiny_networks(setup))
    metrics = summary["metrics"]
    assert summary["skipped"] == {}
    for key in ("fvd", "fid", "lpips", "psnr", "ssim", "reproj_gen", "reproj_gt", "reproj_ratio", "rot_err",
                "trans_err", "cammc", "rot_err_gt"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["fvd"] > 0 and metrics["fid"] > 0 and metrics["lpips"] > 0
    assert metrics["psnr"] == pytest.approx(base["metrics"]["psnr"], rel=1e-9)  # the same videos
    assert metrics["reproj_ratio"] == pytest.approx(metrics["reproj_gen"] / metrics["reproj_gt"])


def test_rotation_protocol_revisit_metrics(setup) -> None:
    out = setup["tmp"] / "rot"
    opts = parse_args(["--recipe", setup["recipe"], "--checkpoint", setup["run"], "--protocol", "rotation360",
                       "--frames", "5", "--num-videos", "2", "--steps", "2", "--out", str(out), "--no-progress"])
    summary = run(opts, networks=tiny_networks(setup))
    metrics = summary["metrics"]
    for key in ("revisit_psnr", "revisit_ssim", "revisit_lpips", "revisit_fid", "reproj_gen", "rot_err"):
        assert key in metrics, key
    assert "psnr" not in metrics and "reproj_gt" not in metrics
    record = load_generated(out / "videos" / "00000.npz")
    assert "gt" not in record
    torch.testing.assert_close(torch.from_numpy(record["extrinsics"][-1]), torch.from_numpy(record["extrinsics"][0]),
                               atol=1e-5, rtol=0)  # a full turn


def test_cli_errors_are_named(setup, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        run(parse_args(_args(setup, tmp_path, 1, "--weights", "model")))
    with pytest.raises(ValueError, match="--checkpoint"):
        run(parse_args(["--recipe", setup["recipe"], "--protocol", "short16", "--out", str(tmp_path)]))


def test_guidance_flags_choose_the_prediction_scheme() -> None:
    """--guidance replaces the protocol's prediction guidance (HG-f / HG-t included); malformed flags are
    named; without it the protocol's scheme stays."""
    from geoforge.engine.eval.protocols import get_protocol
    from geoforge.engine.eval.run import sampler_config
    from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig
    from geoforge.engine.objectives.dfot_velocity import dfot_level_time
    from geoforge.engine.sampling import Guidance

    base = ["--recipe", "dfot_tiny", "--protocol", "long256", "--videos-dir", "unused"]
    protocol = get_protocol("long256")
    default = sampler_config(protocol, parse_args(base), window=8, frames=256)
    assert default.guidance == protocol.guidance.to_guidance()
    assert default.interpolation_guidance == protocol.interpolation_guidance.to_guidance() == Guidance("vanilla", 1.5)
    opts = parse_args([*base, "--guidance", "stabilized_fractional", "--guidance-scale", "4",
                       "--stabilization-level", "0.02", "--freq-scale", "0.4"])
    cfg = DFoTDiffusionConfig()   # levels in DFoT's units -> flow times (tests/engine/eval/test_guidance_levels.py)
    assert sampler_config(protocol, opts, 8, 256).guidance == Guidance(
        history="fractional", scale=4.0, stabilization=dfot_level_time(cfg, 0.02), fraction=dfot_level_time(cfg, 0.4))
    opts = parse_args([*base, "--guidance", "temporal", "--subsets", "0,1;-1", "--subset-weights", "2,1.5"])
    guidance = sampler_config(protocol, opts, 8, 256).guidance
    assert guidance.history == "temporal" and guidance.subsets == [[0, 1], [-1]] and guidance.subset_weights == [2, 1.5]
    with pytest.raises(ValueError, match="--subsets"):
        sampler_config(protocol, parse_args([*base, "--guidance", "temporal", "--subsets", "0,a"]), 8, 256)
    with pytest.raises(ValueError, match="guidance.subset_weights"):
        sampler_config(protocol, parse_args([*base, "--guidance", "temporal", "--subsets", "0"]), 8, 256)
