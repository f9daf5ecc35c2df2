"""The tiny VideoGPA pipeline through ``engine/train.py``: generate + score uninterrupted; the same score stage
killed mid-way and resumed gives a byte-identical scores.jsonl; then the pending pairs and train stages run
(generate and score are skipped) and leave a complete run directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import subprocess_env

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow

INPUTS, CANDIDATES = 4, 2
VIDEOS = INPUTS * CANDIDATES
SMALL = [f"videogpa.inputs.count={INPUTS}", f"videogpa.generate.candidates={CANDIDATES}", "videogpa.generate.steps=4",
         "data.frames=6", "videogpa.score.frames=6", "schedule.steps=4", "schedule.warmup=1", "logging.every=1",
         "logging.checkpoint_every=2", "videogpa.dpo.eval_pairs=4", "backend=reference"]


def _command(run_dir: Path, data_root: Path, extra: list[str]) -> list[str]:
    args = [sys.executable, "engine/train.py", "--recipe", "videogpa_tiny", "--run-dir", str(run_dir)]
    for o in [*SMALL, f"data.root={data_root}"]:
        args += ["--set", o]
    return args + extra


def _run(run_dir: Path, data_root: Path, extra: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(run_dir, data_root, extra), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_kill_during_score_and_resume(tmp_path):
    data_root = tmp_path / "data"
    first = tmp_path / "uninterrupted"
    _run(first, data_root, ["--set", "videogpa.stages=[generate,score]"])
    reference = (first / "scores.jsonl").read_bytes()
    rows = [json.loads(line) for line in reference.decode().splitlines()]
    assert len(rows) == VIDEOS and all(set(r) >= {"video", "score", "mse", "lpips", "motion", "seed"} for r in rows)
    assert not (first / "pairs.jsonl").exists()   # only the listed stages ran

    second = tmp_path / "killed"
    shutil.copytree(first / "candidates", second / "candidates")
    partial = second / "scores.partial.rank0.jsonl"
    proc = subprocess.Popen(_command(second, data_root, ["--stage", "score"]), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if partial.is_file() and len(partial.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the score stage finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (second / "scores.jsonl").exists()
    done_before = len([line for line in partial.read_text().splitlines() if line.strip()])
    assert 2 <= done_before < VIDEOS

    _run(second, data_root, ["--stage", "score"])
    assert (second / "scores.jsonl").read_bytes() == reference
    summary = json.loads((second / "score_summary.json").read_text())
    assert summary["videos"] == VIDEOS and summary["scored_now"] <= VIDEOS - done_before + 1
    assert set(summary["stage_seconds"]) == {"decode", "teacher", "reprojection", "lpips"}
    assert not partial.exists()

    # the rest of the pipeline: generate and score are complete and skipped, pairs and train run
    proc = _run(second, data_root, [])
    assert "generate skipped" in proc.stdout and "score skipped" in proc.stdout and "train done" in proc.stdout
    pairs = [json.loads(line) for line in (second / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and all(p["winner_score"] <= p["loser_score"] for p in pairs)
    final = json.loads((second / "final" / "COMPLETE").read_text())
    assert final["steps"] == 4 and final["reference"] == "adapters_disabled"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (second / "final").iterdir()}
    metrics = [json.loads(line) for line in (second / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert set(metrics[0]) >= {"loss", "implicit_acc", "reward_margin", "err_w", "err_l", "winner_score",
                               "loser_score", "step_seconds"}
    timings = json.loads((second / "pipeline.json").read_text())["seconds"]
    assert set(timings) == {"score", "pairs", "train"}   # this run directory never ran generate itself
