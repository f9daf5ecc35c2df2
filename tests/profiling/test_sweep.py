"""``profiling/sweep.py``: the held-out scores on hand-made videos (against an independent computation), the data
root a config gets, and the whole sweep end to end at toy size (real training runs, ``geoforge-eval``'s short16 on
held-out clips, the table; a second call reuses every run)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from processes import SUBPROCESS_THREADS, subprocess_env, torch_threads
from geoforge.engine.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # profiling/ is not an installed package
    sys.path.insert(0, str(ROOT))

from profiling import sweep  # noqa: E402


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over clips and frames of the PSNR of [0, 1] images (the definition, written out)."""
    mse = ((a - b) ** 2).reshape(a.shape[0], a.shape[1], -1).mean(-1)
    return float((10 * np.log10(1.0 / mse)).mean())


def test_heldout_scores_on_hand_made_videos(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.integers(40, 200, size=(3, 5, 3, 16, 16)).astype(np.uint8)
    generated = gt.copy()
    generated[:, 1:] += 10   # every generated frame off by exactly 10 / 255
    (tmp_path / "videos").mkdir()
    for i in range(3):
        np.savez_compressed(tmp_path / "videos" / f"{i:05d}.npz", generated=generated[i], gt=gt[i])
    scores = sweep.heldout_scores(tmp_path, 3)
    g, t = generated.astype(np.float64) / 255, gt.astype(np.float64) / 255
    assert scores["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-3)
    flat = np.broadcast_to(t.mean(axis=(1, 3, 4), keepdims=True), t.shape)[:, 1:]   # the clip's mean colour
    repeat = np.broadcast_to(t[:, :1], t.shape)[:, 1:]                                 # the context frame
    assert scores["flat_psnr"] == pytest.approx(_psnr(flat, t[:, 1:]), abs=1e-3)
    assert scores["repeat_psnr"] == pytest.approx(_psnr(repeat, t[:, 1:]), abs=1e-3)
    assert scores["margin_flat"] == pytest.approx(scores["psnr"] - scores["flat_psnr"])
    assert scores["margin_repeat"] == pytest.approx(scores["psnr"] - scores["repeat_psnr"])
    assert 0.9 < scores["hf_ratio"] < 1.1   # a constant offset keeps the high frequencies
    assert g.shape == t.shape


def test_a_config_that_renders_other_scenes_gets_its_own_root():
    base = load_recipe("gf_small")
    assert sweep.data_root(base, load_recipe("gf_small", ["seed=4"]), ["seed=4"]) == []   # fixed scenes: shared
    other = load_recipe("gf_small", ["data.synthetic_clips=64"])
    assert sweep.data_root(base, other, ["data.synthetic_clips=64"]) == ["data.root=data/synthetic_32_c64_f16_s0"]
    assert sweep.data_root(base, other, ["data.synthetic_clips=64", "data.root=/x"]) == []   # named: kept


TINY = ["model.hidden_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "data.frames=4",
        "data.synthetic_frames=6", "data.batch_size=2", "gf.dit_block=1", "gf.projector_hidden=32",
        "gf.scale_hidden=16", "logging.every=1", "logging.sample_steps=2", "logging.report_videos=0",
        "schedule.warmup=1", "ema.decay=0.9"]


@pytest.mark.slow
def test_the_sweep_end_to_end_at_toy_size(tmp_path, monkeypatch):
    env = subprocess_env()   # the training processes: one thread, no CUDA, no Triton interpreter
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "TRITON_INTERPRET" not in env:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(tmp_path)   # data/ roots of the configs land here
    out = tmp_path / "sweep"
    argv = ["--recipe", "gf_tiny", "--config", "a: schedule.steps=2 data.synthetic_clips=4",
            "--config", "b: schedule.steps=3 data.synthetic_clips=6", "--seeds", "0", "--videos", "2",
            "--frames", "4", "--steps", "2", "--out", str(out)] + [a for s in TINY for a in ("--set", s)]
    printed = io.StringIO()
    with torch_threads(SUBPROCESS_THREADS), contextlib.redirect_stdout(printed):
        assert sweep.main(argv) == 0
    assert printed.getvalue().startswith("plan: 2 config(s) x seeds [0] = 2 runs of gf_tiny (a 2 steps, b 3 steps)")
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == {"a_s0", "b_s0"}
    for name, clips in (("a_s0", 4), ("b_s0", 6)):
        recipe = load_recipe(str(out / name / "recipe.yaml"))
        assert recipe.data.synthetic_clips == clips and recipe.data.root.endswith(f"synthetic_32_c{clips}_f6_s0")
        row = saved["runs"][name]
        stored = sweep.heldout_scores(out / name / "eval_heldout", 2)   # from the stored videos
        assert {k: row[k] for k in stored} == pytest.approx(stored)
        assert math.isfinite(row["psnr"]) and row["train_minutes"] > 0
    table = (out / "table.md").read_text()
    assert "| a |" in table and "| b |" in table and "model - repeated context (dB)" in table
    again = io.StringIO()
    with torch_threads(SUBPROCESS_THREADS), contextlib.redirect_stdout(again):
        assert sweep.main(argv) == 0
    assert again.getvalue().count("reusing") == 4   # both trainings and both evaluations
