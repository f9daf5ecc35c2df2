"""gf_tiny end to end: real ``engine/train.py`` runs under 1 rank and 2 DeepSpeed ranks (CPU, gloo) agree,
log every loss part, keep the teacher out of the trained weights, and the teacher-cache run reproduces the
live run's first step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

from processes import subprocess_env
from geoforge.engine.checkpoint import latest_checkpoint
from geoforge.engine.config import load_recipe
from geoforge.engine.teacher.cache import build_cache

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = ["model.hidden_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
        "data.resolution=32", "data.frames=4", "data.synthetic_clips=8", "data.synthetic_frames=6",
        "gf.dit_block=1", "gf.projector_hidden=32", "gf.scale_hidden=16", "teacher.resolution=28",
        "teacher.vggt.config.aggregator.embed_dim=32", "teacher.vggt.config.aggregator.img_size=28",
        "logging.every=1", "logging.sample_steps=1", "schedule.warmup=1", "schedule.steps=3", "ema.decay=0.9"]


def _run(run_dir: Path, data_root: Path, overrides: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    args = ["engine/train.py", "--recipe", "gf_tiny", "--run-dir", str(run_dir)]
    for o in [*TINY, f"data.root={data_root}", *overrides]:
        args += ["--set", o]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(31500 + os.getpid() % 1000), *args]
    env = subprocess_env()
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, filter(None, lines))}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gf_synthetic") / "set"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, data_root) -> tuple[Path, dict[int, dict]]:
    run = tmp_path_factory.mktemp("gf_one") / "run"
    proc = _run(run, data_root, ["data.batch_size=2", "distributed.zero_stage=0"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "done: 3 steps" in proc.stdout
    return run, _rows(run)


def test_one_rank_logs_every_part_and_keeps_the_teacher_out(one_rank):
    run, rows = one_rank
    w_ang, w_scale = load_recipe("gf_tiny").gf.weights()
    assert sorted(rows) == [1, 2, 3]
    for r in rows.values():
        assert {"loss", "fm", "gf_angular", "gf_scale"} <= set(r)
        assert r["loss"] == pytest.approx(r["fm"] + w_ang * r["gf_angular"] + w_scale * r["gf_scale"], rel=1e-5)
        assert 0.0 < r["gf_angular"] < 2.0 and r["gf_scale"] > 0
    weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert any(k.startswith("gf.vggt.align.vggt_L1.projector") for k in weights)
    assert not any("aggregator" in k or "camera_token" in k for k in weights)   # the teacher is not trained
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["teacher"]["layers"] == [0, 1] and "teacher_layers" not in recipe["gf"]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_deepspeed_ranks_match_one_rank(tmp_path, data_root, one_rank, stage):
    """deepspeed --num_gpus 2, ZeRO-2 (the recipes' stage) and ZeRO-3 (the projectors partitioned too; the
    teacher stays outside the engine), micro-batch 1 per rank = the 1-rank run's global batch of 2."""
    _, single = one_rank
    proc = _run(tmp_path / "run", data_root, ["data.batch_size=1", f"distributed.zero_stage={stage}"], ranks=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = _rows(tmp_path / "run")
    assert sorted(two) == sorted(single)
    for step in single:
        for key in ("loss", "fm", "gf_angular", "gf_scale"):
            assert two[step][key] == pytest.approx(single[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_compiled_blocks_train_like_eager_ones(tmp_path, data_root, one_rank):
    """``distributed.compile``: the same run with its DiT blocks under ``torch.compile`` (GF's feature tap on a
    compiled block) logs the same losses up to the recipe's bf16 rounding, and its checkpoint has the eager
    run's keys (no ``_orig_mod``)."""
    eager_run, eager = one_rank
    proc = _run(tmp_path / "run", data_root, ["data.batch_size=2", "distributed.zero_stage=0",
                                             "distributed.compile=true"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torch.compile: blocks" in proc.stdout
    compiled = _rows(tmp_path / "run")
    assert sorted(compiled) == sorted(eager)
    for step in eager:
        for key in ("fm", "gf_angular", "gf_scale"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=2e-2), (step, key)
    keys = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors")).keys()
    assert sorted(keys) == sorted(load_file(str(latest_checkpoint(eager_run) / "model.safetensors")).keys())


def test_cached_teacher_run_reproduces_the_live_run(tmp_path, data_root, one_rank):
    """A run reading the teacher cache sees the same first batch and, at step 1 (same initial weights),
    the same flow-matching loss and alignment losses up to the cache's bf16 rounding."""
    _, live = one_rank
    recipe = load_recipe("gf_tiny", [*TINY, f"data.root={data_root}", "data.batch_size=2"])
    build_cache(recipe, tmp_path / "cache", world_size=1, log=lambda s: None)
    proc = _run(tmp_path / "run", data_root, ["data.batch_size=2", "distributed.zero_stage=0",
                                             f"teacher.cache={tmp_path / 'cache'}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cached = _rows(tmp_path / "run")
    assert cached[1]["fm"] == live[1]["fm"]
    for key in ("gf_angular", "gf_scale", "loss"):
        assert cached[1][key] == pytest.approx(live[1][key], rel=5e-3), key
    assert torch.isfinite(torch.tensor([r["loss"] for r in cached.values()])).all()


# ----------------------------------------------------------------------------- GPU lane
@pytest.mark.gpu
def test_cuda_bf16_gf_run_with_triton_flash_attn_and_sample_step(tmp_path, data_root):
    """A short real GF run on one GPU: bf16 (DeepSpeed), the fused alignment forced to compiled Triton, the
    attention backend auto (flash-attn when installed), a sample video at step 2 and at the end (the step
    that crashed on ``.numpy()`` of a CUDA tensor), a checkpoint, finite losses."""
    run = tmp_path / "run"
    args = ["engine/train.py", "--recipe", "gf_tiny", "--run-dir", str(run)]
    overrides = [*TINY, f"data.root={data_root}", "device=cuda", "distributed.precision=bf16", "backend=triton",
                 "attention=auto", "distributed.zero_stage=1", "data.batch_size=2", "logging.sample_every=2",
                 "logging.sample_steps=2", "schedule.steps=3"]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "done: 3 steps" in proc.stdout
    assert (run / "samples" / "step_2.mp4").is_file() and (run / "samples" / "step_3.mp4").is_file()
    rows = _rows(run)
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in (1, 2, 3))
    assert {"loss", "fm", "gf_angular", "gf_scale"} <= set(rows[1]), rows[1]
    try:
        import flash_attn  # noqa: F401
        expected = "geoforge.engine.models.dit:DiTBlock.attend: flash_attn"
    except Exception:
        expected = "geoforge.engine.models.dit:DiTBlock.attend: sdpa"
    assert "attention kernels: " in out and expected in out, out[-3000:]
