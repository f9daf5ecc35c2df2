"""Verified checkpoints: manifests, damaged-file fallback on ``--resume auto``, explicit ``--resume PATH``
errors, the eval / weight loaders, and a failing checkpoint write (disk full / I/O error).

The end-to-end tests run ``engine/train.py`` on the tiny DiT of ``test_train`` (real subprocesses).
"""
from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from geoforge.engine.checkpoint import (MANIFEST, CheckpointError, CheckpointWriteError, atomic_checkpoint_dir,
                               checkpoint_dirs, newest_verified_checkpoint, resume_checkpoint, verify_checkpoint,
                               verify_file)
from geoforge.engine.distributed import World
from processes import subprocess_env
from test_train import ROOT, _command, _losses, _train

WORLD1 = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))


def _fake_checkpoint(run_dir, step, payload=b"x" * 1000):
    with atomic_checkpoint_dir(run_dir, step, WORLD1) as tmp:
        (tmp / "deepspeed").mkdir()
        (tmp / "deepspeed" / "state.pt").write_bytes(payload)
        save_file({"w": torch.arange(6.0)}, str(tmp / "model.safetensors"))
    return run_dir / "checkpoints" / f"step_{step}"


def test_manifest_records_every_file_and_detects_damage(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 2)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert set(manifest["files"]) == {"deepspeed/state.pt", "model.safetensors"}
    assert manifest["files"]["deepspeed/state.pt"]["size"] == 1000
    assert verify_checkpoint(ckpt) == []
    # same size, one byte flipped -> CRC mismatch named
    data = bytearray((ckpt / "deepspeed" / "state.pt").read_bytes())
    data[500] ^= 1
    (ckpt / "deepspeed" / "state.pt").write_bytes(bytes(data))
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and "deepspeed/state.pt" in problems[0] and "CRC-32" in problems[0]
    # truncated and missing files are named too
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "deepspeed" / "state.pt").unlink()
    problems = verify_checkpoint(ckpt)
    assert any("state.pt: missing" in p for p in problems)
    assert any("model.safetensors: 0 bytes" in p and "truncated" in p for p in problems)
    with pytest.raises(CheckpointError, match="model.safetensors: 0 bytes"):
        verify_file(ckpt / "model.safetensors")


def test_resume_auto_falls_back_and_explicit_path_fails(tmp_path):
    old, new = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    (new / "model.safetensors").write_bytes((new / "model.safetensors").read_bytes()[:-10])
    warnings: list[str] = []
    assert resume_checkpoint(tmp_path, "auto", warn=warnings.append) == old
    assert len(warnings) == 1 and str(new / "model.safetensors") in warnings[0]
    with pytest.raises(CheckpointError, match=r"step_4/model.safetensors: \d+ bytes"):
        resume_checkpoint(tmp_path, str(new))
    assert resume_checkpoint(tmp_path, str(old)) == old
    (old / "deepspeed" / "state.pt").unlink()
    assert newest_verified_checkpoint(tmp_path, warn=warnings.append) is None
    assert "step_2/deepspeed/state.pt: missing" in warnings[-1]


def test_failing_write_keeps_earlier_checkpoints_and_names_the_path(tmp_path):
    good = _fake_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointWriteError) as info:
        with atomic_checkpoint_dir(tmp_path, 4, WORLD1, keep=1) as tmp:
            (tmp / "half").write_bytes(b"123")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    text = str(info.value)
    assert "checkpoints/step_4" in text and "model.safetensors" in text and "No space left" in text
    assert "earlier checkpoints are intact (step_2)" in text
    assert checkpoint_dirs(tmp_path) == [good] and verify_checkpoint(good) == []
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


COMMON = ["data.batch_size=2", "logging.checkpoint_every=3", "logging.keep_checkpoints=0", "distributed.zero_stage=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic") / "set"


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_previous(tmp_path, data_root):
    """A real run (8 steps, checkpoints 3, 6, 8); a file of step_8 is truncated; ``--resume auto`` warns
    naming it, resumes from step_6 and logs the same losses at steps 7, 8 as the first run. The eval
    loader refuses the damaged checkpoint's weights file by name and falls back in a run directory."""
    run = tmp_path / "run"
    proc = _train("python", run, data_root, [*COMMON, "schedule.steps=8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _losses(run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_3", "step_6", "step_8"]
    assert all(verify_checkpoint(p) == [] for p in checkpoint_dirs(run))
    bad = run / "checkpoints" / "step_8" / "deepspeed" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])

    from geoforge.engine.eval.load import resolve_checkpoint

    with pytest.raises(CheckpointError, match="step_8/ema.safetensors"):
        ema = run / "checkpoints" / "step_8" / "ema.safetensors"
        ema.write_bytes(ema.read_bytes()[:-4])
        resolve_checkpoint(run / "checkpoints" / "step_8", "ema")
    assert resolve_checkpoint(run, "ema") == run / "checkpoints" / "step_6" / "ema.safetensors"

    proc = _train("python", run, data_root, [*COMMON, "schedule.steps=8"], ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"{bad}: " in out and "fails verification" in out, out[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_6'} at step 6" in out
    again = _losses(run)
    assert sorted(again) == list(range(1, 9))
    for step in (7, 8):
        assert again[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7)
    # explicit --resume of a damaged checkpoint stops, naming the file
    bad.write_bytes(b"")
    proc = _train("python", run, data_root, [*COMMON, "schedule.steps=8"],
                  ["--resume", str(run / "checkpoints" / "step_8")])
    assert proc.returncode == 1 and "mp_rank_00_model_states.pt: 0 bytes" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_checkpoint_write_failure_stops_with_the_path(tmp_path, data_root):
    """A resumed run whose files may not exceed 64 KiB (RLIMIT_FSIZE: writes fail with EFBIG, a real I/O
    error from the kernel) cannot write its step-6 checkpoint: it stops with exit code 1 and a message
    naming the checkpoint; step_3 stays complete and verifies; a later resume without the limit finishes."""
    run = tmp_path / "run"
    proc = _train("python", run, data_root, [*COMMON, "schedule.steps=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    cmd = _command("python", run, data_root, [*COMMON, "schedule.steps=6"], ["--resume", "auto"])
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"writing checkpoint {run / 'checkpoints' / 'step_6'} failed" in proc.stderr, proc.stderr[-2000:]
    assert "earlier checkpoints are intact (step_3)" in proc.stderr
    assert [p.name for p in checkpoint_dirs(run)] == ["step_3"] and verify_checkpoint(checkpoint_dirs(run)[0]) == []
    assert not list((run / "checkpoints").glob(".tmp-*"))
    proc = _train("python", run, data_root, [*COMMON, "schedule.steps=6"], ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_3", "step_6"]
