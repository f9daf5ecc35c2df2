"""DPO training (``engine/train.py --stage train``) on a prepared preference set: winners are rendered 3D-consistent
synthetic clips, losers the same clips with their later frames shuffled. Training raises the implicit accuracy on
the training pairs above 0.5 (measured with fixed noise draws before and after), logs the DPO quantities, and the
final adapter loads with peft into a fresh policy."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from processes import subprocess_env
from geoforge.engine.config import load_recipe
from geoforge.engine.data.re10k import pixel_intrinsics, relative_extrinsics
from geoforge.engine.data.synthetic import render_clip
from geoforge.engine.data.video_io import encode_video
from geoforge.engine.videogpa.io import atomic_write_jsonl
from geoforge.engine.videogpa.lora import load_adapter
from geoforge.engine.videogpa.policy import Condition, build_dit_policy

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow
T, R, PAIRS = 6, 32, 6
OVERRIDES = [f"data.frames={T}", "schedule.steps=30", "schedule.warmup=2", "logging.every=1",
             "logging.checkpoint_every=10", "optimizer.lr=3e-3", "videogpa.dpo.eval_pairs=6",
             "videogpa.dpo.eval_draws=4"]


def prepare(run_dir: Path) -> None:
    """candidates/<key>/ (condition, two videos) and pairs.jsonl for PAIRS inputs."""
    pairs = []
    rng = np.random.default_rng(0)
    for i in range(PAIRS):
        clip = render_clip(seed=5, n=i, frames=T, resolution=R)
        key = f"{i:05d}"
        folder = run_dir / "candidates" / key
        folder.mkdir(parents=True)
        frames = clip["frames"]
        shuffled = np.concatenate([frames[:1], frames[1:][rng.permutation(T - 1)]])
        encode_video(folder / "cand_00.mp4", frames, fps=8)
        encode_video(folder / "cand_01.mp4", shuffled, fps=8)
        cond = Condition(key=key, first_frame=torch.from_numpy(frames[0]).permute(2, 0, 1).float() / 255.0,
                         intrinsics=pixel_intrinsics(clip["intrinsics"], R, R).float(),
                         extrinsics=relative_extrinsics(clip["w2c"]).float())
        save_file(cond.tensors(), str(folder / "condition.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"key": key, "prompt": "", "files": ["cand_00.mp4", "cand_01.mp4"],
                                                      "seeds": [0, 1]}))
        pairs.append({"input": key, "winner": f"candidates/{key}/cand_00.mp4", "loser": f"candidates/{key}/cand_01.mp4",
                      "winner_score": 0.01, "loser_score": 0.2, "gap": 0.19, "split": "train"})
    atomic_write_jsonl(run_dir / "pairs.jsonl", pairs)


def test_dpo_raises_implicit_accuracy_on_training_pairs(tmp_path):
    run_dir = tmp_path / "run"
    prepare(run_dir)
    cmd = [sys.executable, "engine/train.py", "--recipe", "videogpa_tiny", "--run-dir", str(run_dir), "--stage", "train"]
    for o in OVERRIDES:
        cmd += ["--set", o]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    summary = json.loads((run_dir / "final" / "COMPLETE").read_text())
    assert summary["train_pairs"] == PAIRS and summary["pairs_evaluated"] == PAIRS * 4
    assert summary["implicit_acc_before"] == 0.0          # θ = reference: every margin is exactly 0
    assert summary["implicit_acc_after"] > 0.5, summary
    assert summary["reward_margin_after"] > 0
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert np.mean([r["implicit_acc"] for r in rows[-10:]]) > 0.5
    assert all(r["winner_score"] == 0.01 and r["loser_score"] == 0.2 for r in rows)
    # the one trainer checkpoints every logging.checkpoint_every steps and at the last; keep_checkpoints=2
    assert sorted(p.name for p in (run_dir / "train" / "checkpoints").iterdir()) == ["step_20", "step_30"]
    assert len(list((run_dir / "latents").iterdir())) == 2 * PAIRS   # latents cached once

    # the final adapter loads with peft into a fresh policy (same recipe seed = same base weights)
    recipe = load_recipe("videogpa_tiny", OVERRIDES)
    base = build_dit_policy(recipe)
    tuned = load_adapter(build_dit_policy(recipe).network, run_dir / "final")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, 3, R, R, generator=g)
    t = torch.rand(1, T, generator=g)
    cams = {"intrinsics": torch.tensor([[28.0, 0, 15.5], [0, 28.0, 15.5], [0, 0, 1]]).expand(1, T, 3, 3),
            "extrinsics": torch.eye(3, 4).expand(1, T, 3, 4)}
    with torch.no_grad():
        assert (tuned(x, t, **cams) - base.network(x, t, **cams)).abs().max() > 1e-6
