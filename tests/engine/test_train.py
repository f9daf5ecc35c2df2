"""End-to-end training runs on CPU: launchers, ZeRO stages vs one rank, kill-and-resume, non-finite stop.

Every run is a real subprocess of ``engine/train.py`` on a tiny DiT and a small synthetic set generated
once per session; losses are read back from ``metrics.jsonl`` (the all-rank mean, logged every step).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import subprocess_env
from geoforge.engine.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = [
    "model.hidden_dim=64", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    "data.resolution=32", "data.frames=4", "data.synthetic_clips=16", "data.synthetic_frames=6",
    "logging.every=1", "logging.sample_steps=2", "schedule.warmup=2", "ema.decay=0.9",
    "distributed.precision=fp32",   # runs compared across launchers / layouts / resumes: fp32, explicitly
]


def _command(launcher: str, run_dir: Path, data_root: Path, overrides: list[str], extra: list[str] = ()) -> list[str]:
    args = ["engine/train.py", "--recipe", "dfot_tiny", "--run-dir", str(run_dir), *extra]
    for o in [*TINY, f"data.root={data_root}", *overrides]:
        args += ["--set", o]
    if launcher == "python":
        return [sys.executable, *args]
    if launcher == "deepspeed2":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(29500 + os.getpid() % 1000), *args]
    if launcher == "torchrun2":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(30500 + os.getpid() % 1000), *args]
    raise ValueError(launcher)


def _train(launcher: str, run_dir: Path, data_root: Path, overrides: list[str], extra: list[str] = ()):
    proc = subprocess.run(_command(launcher, run_dir, data_root, overrides, extra), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic") / "set"


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory, data_root) -> dict[int, float]:
    """One rank, micro-batch 4: the reference curve."""
    run = tmp_path_factory.mktemp("single") / "run"
    proc = _train("python", run, data_root, ["data.batch_size=4", "schedule.steps=5", "distributed.zero_stage=0",
                                             "logging.validate_every=5", "logging.validate_videos=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 5 steps" in proc.stdout
    # the kernel each attention call site actually ran, after the first step (issue 16 item 3)
    assert "attention kernels: geoforge.engine.models.dit:DiTBlock.attend: sdpa" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr" in r]
    assert len(val) == 1 and val[0]["step"] == 5 and 0 < val[0]["val/psnr"] < 60
    # the run directory has what the README promises
    assert (run / "recipe.yaml").is_file() and (run / "samples" / "step_5.mp4").is_file()
    assert any((run / "tensorboard").iterdir())
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and {"model.safetensors", "ema.safetensors", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}
    return _losses(run)


def test_loss_falls_and_is_finite(single_rank):
    assert sorted(single_rank) == [1, 2, 3, 4, 5]
    assert all(v == v and v < 10 for v in single_rank.values())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(tmp_path, data_root, single_rank, stage):
    """deepspeed --num_gpus 2 (CPU accelerator, gloo), micro-batch 2 = the same global batch of 4."""
    proc = _train("deepspeed2", tmp_path / "run", data_root,
                  ["data.batch_size=2", "schedule.steps=5", f"distributed.zero_stage={stage}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = _losses(tmp_path / "run")
    assert sorted(two) == sorted(single_rank)
    for step, loss in single_rank.items():
        assert two[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), (step, two, single_rank)


def test_torchrun_launcher(tmp_path, data_root, single_rank):
    proc = _train("torchrun2", tmp_path / "run", data_root,
                  ["data.batch_size=2", "schedule.steps=2", "distributed.zero_stage=2", "distributed.grad_accum=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _losses(tmp_path / "run")
    assert two[1] == pytest.approx(single_rank[1], rel=1e-4) and two[2] == pytest.approx(single_rank[2], rel=1e-4)


def test_grad_accumulation_matches_larger_micro_batch(tmp_path, data_root, single_rank):
    """Micro-batch 2 x 2 accumulation steps = micro-batch 4 (one rank)."""
    proc = _train("python", tmp_path / "run", data_root,
                  ["data.batch_size=2", "distributed.grad_accum=2", "schedule.steps=3", "distributed.zero_stage=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = _losses(tmp_path / "run")
    for step in (1, 2, 3):
        assert acc[step] == pytest.approx(single_rank[step], rel=1e-4, abs=1e-6)


def test_kill_and_resume_reproduces_losses(tmp_path, data_root):
    """A run killed (SIGKILL) after its step-3 checkpoint and resumed with --resume auto logs the same
    losses at steps 4..8 as an uninterrupted run (fp32, CPU)."""
    common = ["data.batch_size=2", "schedule.steps=8", "logging.checkpoint_every=3", "distributed.zero_stage=1",
              "data.num_workers=1"]
    full = tmp_path / "full"
    proc = _train("python", full, data_root, common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _losses(full)

    killed = tmp_path / "killed"
    p = subprocess.Popen(_command("python", killed, data_root, common), cwd=ROOT, env=subprocess_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while latest_checkpoint(killed) is None and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    ckpt = latest_checkpoint(killed)
    assert ckpt is not None and ckpt.name == "step_3", ckpt
    proc = _train("python", killed, data_root, common, ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(4, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)


def test_half_written_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_2").mkdir(parents=True)
    (root / "step_2" / "COMPLETE").write_text("step 2\n")
    (root / "step_4").mkdir()            # renamed but incomplete: cannot happen by rename, still refused
    (root / ".tmp-step_6").mkdir()       # killed mid-write
    assert latest_checkpoint(tmp_path) == root / "step_2"


def test_nonfinite_losses_stop_the_run_with_a_message(tmp_path, data_root):
    proc = _train("python", tmp_path / "run", data_root,
                  ["data.batch_size=2", "schedule.steps=20", "optimizer.lr=1e30", "optimizer.grad_clip=0.0",
                   "schedule.warmup=0", "logging.max_nonfinite=3", "distributed.zero_stage=0"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 non-finite losses in a row (logging.max_nonfinite=3)" in proc.stderr
    assert "non-finite loss at step" in proc.stdout + proc.stderr


def test_misspelt_key_fails_before_any_compute(tmp_path, data_root):
    start = time.time()
    proc = _train("python", tmp_path / "run", data_root, ["optimizer.lrr=1e-4"])
    assert proc.returncode == 2
    assert ": optimizer.lrr: unknown key (did you mean 'lr'?)" in proc.stderr
    assert not (tmp_path / "run").exists() and not data_root.joinpath("never").exists()
    assert time.time() - start < 60


def _re10k_clip(folder: Path, name: str, frames: int = 6, size: int = 32, seed: int = 0) -> None:
    import numpy as np
    import torch

    from geoforge.engine.data.re10k import write_pose_file
    from geoforge.engine.data.video_io import encode_video

    folder.mkdir(parents=True, exist_ok=True)
    w2c = torch.eye(3, 4, dtype=torch.float64).repeat(frames, 1, 1)
    w2c[:, 2, 3] = torch.arange(frames, dtype=torch.float64)
    intrinsics = torch.tensor([[0.6, 0.8, 0.5, 0.5]], dtype=torch.float64).repeat(frames, 1)
    write_pose_file(folder / f"{name}.txt", "https://www.youtube.com/watch?v=test", torch.arange(frames) * 100_000,
                    intrinsics, w2c)
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    encode_video(folder / f"{name}.mp4", pixels, fps=10)


def test_skipped_bad_clips_are_counted_in_metrics_and_checkpoints(tmp_path):
    """data.on_error=skip on 2 ranks: every bad clip drawn is counted once over all ranks in metrics.jsonl
    (``skipped_clips``, cumulative) and in the checkpoint, and the count continues after --resume auto."""
    root = tmp_path / "re10k"
    for n in range(4):
        _re10k_clip(root / "training", f"clip_{n}", seed=n)
    bad = root / "training" / "clip_1.mp4"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])   # truncated
    common = ["data.kind=re10k", "data.on_error=skip", "data.batch_size=1", "distributed.zero_stage=0",
              "logging.checkpoint_every=2"]
    run = tmp_path / "run"
    # global batch 2 of 4 clips: 2 steps per epoch, clip_1 drawn once per epoch
    proc = _train("deepspeed2", run, root, [*common, "schedule.steps=4"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("skipping a bad clip") <= 2   # once per rank process at most
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    counts = {r["step"]: r["skipped_clips"] for r in rows if "skipped_clips" in r}
    assert counts[2] == 1 and counts[4] == 2, counts
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["skipped_clips"] == 2
    proc = _train("deepspeed2", run, root, [*common, "schedule.steps=6"], ["--resume", "auto"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert {r["step"]: r["skipped_clips"] for r in rows}[6] == 3
