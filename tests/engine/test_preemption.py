"""Preemption (engine/preemption.py): real training runs signalled mid-way stop after the current step with
a complete checkpoint and exit code 75 on every rank; ``--resume auto`` then logs the uninterrupted run's
losses. Also: a second run on a directory in use is refused naming the holder (engine/run_lock.py), and
the VideoGPA generate / score stages keep what they finished."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoforge.engine.checkpoint import checkpoint_dirs, verify_checkpoint
from geoforge.engine.preemption import PREEMPTED_EXIT_CODE
from processes import subprocess_env
from test_train import ROOT, _command, _losses, _train

pytestmark = pytest.mark.slow
COMMON = ["data.batch_size=2", "schedule.steps=30", "logging.checkpoint_every=50", "distributed.zero_stage=1",
          "data.num_workers=1"]
HANG_GUARD = 300   # seconds: a run that does not stop by then has hung (the assertion, not a timing)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic") / "set"


def _rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_rows(proc: subprocess.Popen, run: Path, rows: int) -> None:
    deadline = time.time() + HANG_GUARD
    while _rows(run) < rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and _rows(run) >= rows, "the run ended before it could be signalled"


def _wait_group_gone(proc: subprocess.Popen) -> None:
    """Until no process of ``proc``'s group is left (launcher, ranks, DataLoader workers)."""
    pgid = proc.pid
    deadline = time.time() + HANG_GUARD
    while time.time() < deadline:
        proc.poll()   # reap the launcher itself (a zombie still counts as a group member)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError("processes of the signalled run were still alive (hang)")


def test_sigterm_single_rank_checkpoints_exits_75_and_resumes_exactly(tmp_path, data_root):
    ref = tmp_path / "reference"
    proc = _train("python", ref, data_root, COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _losses(ref)

    run = tmp_path / "run"
    p = subprocess.Popen(_command("python", run, data_root, COMMON), cwd=ROOT, env=subprocess_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_rows(p, run, 3)
        os.killpg(p.pid, signal.SIGSTOP)   # hold it mid-run while a second run tries the same directory
        try:
            second = _train("python", run, data_root, COMMON)
        finally:
            os.killpg(p.pid, signal.SIGCONT)
        assert second.returncode == 1
        assert (f"run directory {run} is in use by another run (host {socket.gethostname()!r}, pid {p.pid}"
                in second.stderr), second.stderr[-2000:]
        os.killpg(p.pid, signal.SIGTERM)   # the whole group, as SLURM does: DataLoader workers too
        out, err = p.communicate(timeout=HANG_GUARD)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "run preempted by SIGTERM at step" in err
    ckpts = checkpoint_dirs(run)
    assert len(ckpts) == 1 and verify_checkpoint(ckpts[0]) == []
    stopped = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped < 30 and f"at step {stopped}; checkpoint {ckpts[0]}" in err
    assert max(_losses(run)) == stopped   # it finished the step it was in, and no more
    assert not (run / ".lock").exists()

    proc = _train("python", run, data_root, COMMON, ["--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpts[0]} at step {stopped}" in proc.stdout
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)


def test_sigterm_to_deepspeed_launcher_group_two_ranks(tmp_path, data_root):
    """``deepspeed --num_gpus 2`` on CPU: SIGTERM to the launcher's whole process group (SLURM's way).
    Both ranks stop after the same step, the checkpoint is complete, nothing hangs, and the resumed run
    logs the uninterrupted 2-rank run's losses."""
    ref = tmp_path / "reference"
    proc = _train("deepspeed2", ref, data_root, COMMON)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reference = _losses(ref)

    run = tmp_path / "run"
    log = open(tmp_path / "log.txt", "w+")
    p = subprocess.Popen(_command("deepspeed2", run, data_root, COMMON), cwd=ROOT, env=subprocess_env(), text=True,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_rows(p, run, 3)
        os.killpg(p.pid, signal.SIGTERM)
        _wait_group_gone(p)
    finally:
        if p.poll() is None:
            p.kill()
    log.seek(0)
    text = log.read()
    ckpts = checkpoint_dirs(run)
    assert len(ckpts) == 1 and verify_checkpoint(ckpts[0]) == [], text[-3000:]
    stopped = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    for rank in (0, 1):
        assert f"rank {rank}: run preempted by SIGTERM at step {stopped}" in text, text[-3000:]
    assert {p.name for p in ckpts[0].iterdir()} >= {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors"}

    proc = _train("deepspeed2", run, data_root, COMMON, ["--resume", "auto"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(stopped + 1, 31):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)


def test_sigusr1_to_one_rank_stops_both_with_code_75(tmp_path, data_root):
    """Two ranks started directly (as ``srun`` does, no launcher in between): SIGUSR1 to rank 1 only.
    The ranks agree through a collective flag: both exit 75 after the same step."""
    run = tmp_path / "run"
    args = _command("python", run, data_root, COMMON)
    port = str(31500 + os.getpid() % 1000)
    procs = []
    for rank in (0, 1):
        env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True))
    try:
        _wait_for_rows(procs[0], run, 3)
        os.kill(procs[1].pid, signal.SIGUSR1)
        outputs = [p.communicate(timeout=HANG_GUARD) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    codes = [p.returncode for p in procs]
    assert codes == [PREEMPTED_EXIT_CODE] * 2, (codes, outputs[0][1][-2000:], outputs[1][1][-2000:])
    ckpts = checkpoint_dirs(run)
    assert len(ckpts) == 1 and verify_checkpoint(ckpts[0]) == []
    stopped = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert f"rank 1: run preempted by SIGUSR1 at step {stopped}" in outputs[1][1]
    assert f"rank 0: run preempted by a signal to another rank at step {stopped}" in outputs[0][1]


# ------------------------------------------------------------------------------------------ VideoGPA
VG = ["videogpa.inputs.count=4", "videogpa.generate.candidates=2", "videogpa.generate.steps=4", "data.frames=6",
      "videogpa.score.frames=6", "backend=reference"]


def _vg_command(run: Path, data_root: Path, stage: str) -> list[str]:
    args = [sys.executable, "engine/train.py", "--recipe", "videogpa_tiny", "--run-dir", str(run), "--stage", stage]
    for o in [*VG, f"data.root={data_root}"]:
        args += ["--set", o]
    return args


def _signal_when(cmd: list[str], ready, sig=signal.SIGTERM) -> subprocess.CompletedProcess:
    p = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.time() + HANG_GUARD
        while not ready() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, "the stage ended before it could be signalled"
        os.killpg(p.pid, sig)
        out, err = p.communicate(timeout=HANG_GUARD)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def test_videogpa_generate_and_score_keep_what_they_finished(tmp_path):
    data_root, run = tmp_path / "data", tmp_path / "run"
    cand = run / "candidates"
    done_inputs = lambda: len([p for p in cand.glob("0*") if p.is_dir()]) if cand.is_dir() else 0  # noqa: E731
    proc = _signal_when(_vg_command(run, data_root, "generate"), lambda: done_inputs() >= 1)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "videogpa generate stage (" in proc.stderr and "preempted by SIGTERM" in proc.stderr
    kept = done_inputs()
    assert 1 <= kept < 4 and not (cand / "COMPLETE").exists()
    stamps = {p: p.stat().st_mtime_ns for i in range(kept) for p in (cand / f"{i:05d}").iterdir()}
    assert any(p.name == "meta.json" for p in stamps)
    proc = subprocess.run(_vg_command(run, data_root, "generate"), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cand / "COMPLETE").is_file() and f"0/{4 - kept} [" in proc.stderr   # only the rest generated
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps   # the kept inputs were not redone

    partial = run / "scores.partial.rank0.jsonl"
    rows = lambda: len(partial.read_text().splitlines()) if partial.is_file() else 0  # noqa: E731
    proc = _signal_when(_vg_command(run, data_root, "score"), lambda: rows() >= 1, signal.SIGUSR1)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "videogpa score stage (" in proc.stderr and not (run / "scores.jsonl").exists()
    scored = rows()
    assert 1 <= scored < 8
    proc = subprocess.run(_vg_command(run, data_root, "score"), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "score_summary.json").read_text())
    assert summary["videos"] == 8 and summary["scored_now"] == 8 - scored
