"""uvit3d_tiny end to end: the real ``engine/train.py`` trains DFoT's U-ViT3D with DFoT's diffusion and Geometry
Forcing at feature map 3 (the level-2 map) on synthetic data, starting from a DFoT-shaped Lightning checkpoint
given as ``model.pretrained`` (EMA weights in ``optimizer_states[0]["ema"]``); periodic validation, the sample
video and the run report sample it through the v-prediction adapter (``engine.objectives.dfot_velocity``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from processes import subprocess_env
from geoforge.engine.checkpoint import latest_checkpoint
from geoforge.engine.config import load_recipe
from geoforge.engine.models.arch import build_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = ["model.uvit3d.channels=[32, 32, 16, 32]", "model.uvit3d.emb_channels=32", "model.uvit3d.num_heads=1",
        "model.uvit3d.num_updown_blocks=[1, 1, 1]", "model.uvit3d.num_mid_blocks=1", "data.frames=4",
        "data.synthetic_clips=4", "data.synthetic_frames=6", "data.batch_size=2", "distributed.zero_stage=0",
        "gf.projector_hidden=32", "gf.scale_hidden=16", "teacher.vggt.config.aggregator.embed_dim=32",
        "logging.every=1", "logging.sample_steps=2", "schedule.warmup=0", "schedule.steps=2", "ema.decay=0.9",
        "optimizer.lr=1e-12"]


def test_uvit3d_tiny_trains_from_a_lightning_checkpoint(tmp_path):
    recipe = load_recipe("uvit3d_tiny", TINY)
    backbone = build_model(recipe.model)
    names = [n for n, _ in backbone.named_parameters()]
    g = torch.Generator().manual_seed(0)
    raw = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in backbone.state_dict().items()}
    ema = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in raw.items()}
    ckpt = tmp_path / "DFoT_16f_state_dict.ckpt"
    torch.save({"state_dict": {"diffusion_model.model." + k: v for k, v in raw.items()},
                "optimizer_states": [{"ema": [ema[n] for n in names], "decay": 0.9999}], "lr_schedulers": [],
                "epoch": 0, "global_step": 10}, ckpt)

    run = tmp_path / "run"
    args = [sys.executable, "engine/train.py", "--recipe", "uvit3d_tiny", "--run-dir", str(run)]
    for o in [*TINY, f"data.root={tmp_path / 'data'}", f"model.pretrained={ckpt}", "logging.validate_every=2",
              "logging.validate_videos=2", "logging.report_videos=2"]:
        args += ["--set", o]
    env = subprocess_env()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "done: 2 steps" in proc.stdout
    assert f"model.pretrained: loaded {ckpt} (ema" in proc.stdout

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    val = [r for r in rows if "val/psnr" in r]   # periodic validation through the v-prediction adapter
    assert len(val) == 1 and val[0]["step"] == 2 and 0 < val[0]["val/psnr"] < 60
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:   # DFoT diffusion loss + GF alignment of the level-2 map, all finite
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "fm", "gf_angular", "gf_scale"))
        assert r["loss"] > r["fm"] > 0
    # lr 1e-12: the trained weights are still the file's EMA weights (buffers from its state_dict)
    state = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    for k in raw:
        expected = raw[k] if "timesteps." in k else ema[k]
        torch.testing.assert_close(state["dit." + k], expected, rtol=0, atol=1e-6, msg=k)
    assert any(k.startswith("gf.vggt.align.") for k in state)
    assert (run / "samples" / "step_2.mp4").stat().st_size > 0
    report = (run / "report.md").read_text()   # the run report, sampled with DFoT's DDIM through the adapter
    assert "2 DFoT DDIM steps" in report and "| repeated context |" in report


def test_uvit3d_tiny_trains_with_the_released_alignment_form(tmp_path):
    """``gf.alignment_form: as_released`` (GF's published loss) trains on the same tiny setup; its parts are logged."""
    run = tmp_path / "run"
    args = [sys.executable, "engine/train.py", "--recipe", "uvit3d_tiny", "--run-dir", str(run)]
    for o in [*TINY, f"data.root={tmp_path / 'data'}", "optimizer.lr=1e-3", "gf.alignment_form=as_released",
              "gf.released_size=16", "gf.released_mid_channels=16", "gf.angular_weight=0.1", "gf.scale_weight=0.1"]:
        args += ["--set", o]
    env = subprocess_env()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2
    for r in rows:   # plane-normalised angular: |L_ang| <= frames / S^2 per layer-mean; total = fm + 0.1 (ang + scale)
        assert abs(r["gf_angular"]) <= 2 * 4 / 16 ** 2 + 1e-6
        assert abs(r["loss"] - (r["fm"] + 0.1 * (r["gf_angular"] + r["gf_scale"]))) < 1e-5
    state = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert "gf.vggt.align.projector.channel_reducer.weight" in state
