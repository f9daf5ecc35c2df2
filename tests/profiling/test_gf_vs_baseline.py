"""``profiling/gf_vs_baseline.py``: the statistics on hand-made numbers, each variant's overrides as a valid recipe,
and the whole pipeline end to end at toy size (real training runs, evaluation, probe, table, results, plot; a
second call reuses every run)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from processes import SUBPROCESS_THREADS, subprocess_env, torch_threads
from geoforge.engine.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # profiling/ is not an installed package
    sys.path.insert(0, str(ROOT))

from profiling import gf_vs_baseline as exp  # noqa: E402

ROWS = [("fm_heldout", "held-out loss", "lower"), ("psnr", "PSNR", "higher")]


def hand_results() -> dict:
    """Two seeds, baseline and gf, numbers chosen so every statistic is known by hand."""
    def run(fm: float, psnr: float, curve: list[tuple[int, float]]) -> dict:
        return {"fm_heldout": fm, "psnr": psnr, "heldout_curve": [list(c) for c in curve]}
    return {
        "baseline_s0": run(0.30, 15.0, [(2, 0.50), (4, 0.35), (6, 0.30)]),
        "baseline_s1": run(0.40, 16.0, [(2, 0.60), (4, 0.38), (6, 0.40)]),   # dips below its final loss at 4
        "gf_s0": run(0.25, 16.0, [(2, 0.45), (4, 0.29), (6, 0.25)]),
        "gf_s1": run(0.42, 15.5, [(2, 0.70), (4, 0.50), (6, 0.42)]),         # never reaches 0.40
    }


def test_a_run_trained_for_other_steps_is_named_not_resumed(tmp_path):
    """An experiment asked for 4,000 steps where a 5,000-step run lives stops before training, naming the run and
    the --steps that reuses it (resuming it would run a schedule it was not made with)."""
    from profiling._experiment import train_run

    run = tmp_path / "gf_s0"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: gf_small\nschedule:\n  steps: 5000\n")
    with pytest.raises(SystemExit, match=r"gf_s0: trained for schedule.steps=5000 .*asked for 4000: pass --steps 5000"):
        train_run("gf_small", run, [], 4000)


def test_statistics_on_hand_made_numbers():
    s = exp.summary([1.0, 2.0, 6.0])
    assert s["mean"] == 3.0 and s["n"] == 3 and s["sd"] == pytest.approx(math.sqrt(7.0))   # ((4 + 1 + 9) / 2)
    assert math.isnan(exp.summary([5.0])["sd"])
    assert exp.fmt_summary(exp.summary([5.0])) == "5 (1 seed)" and exp.fmt_summary(exp.summary([1.0, 3.0])) == "2 ± 1.4"
    results = hand_results()
    assert exp.paired_differences(results, "gf", "psnr", [0, 1]) == pytest.approx([1.0, -0.5])
    assert exp.convergence_step([[2, 0.5], [4, 0.29], [6, 0.25]], 0.30) == 4
    assert exp.convergence_step([[2, 0.5], [4, 0.30]], 0.30) == 4          # "reaches": at most the target
    assert exp.convergence_step([[2, 0.5], [4, 0.31]], 0.30) is None

    agg = exp.aggregate(results, ["baseline", "gf"], [0, 1], ROWS)
    assert agg["metrics"]["psnr"]["baseline"]["mean"] == pytest.approx(15.5)
    assert agg["metrics"]["psnr"]["baseline"]["sd"] == pytest.approx(math.sqrt(0.5))
    diff = agg["differences"]["fm_heldout"]["gf"]
    assert diff["per_seed"] == pytest.approx([-0.05, 0.02])
    assert diff["mean"] == pytest.approx(-0.015) and diff["sd"] == pytest.approx(math.sqrt(2 * 0.035 ** 2))
    assert "baseline" not in agg["differences"]["psnr"]
    assert agg["convergence"]["target"] == {0: 0.30, 1: 0.40}
    assert agg["convergence"]["baseline"] == {0: 6, 1: 4}
    assert agg["convergence"]["gf"] == {0: 4, 1: None}

    text = exp.table(agg, ["baseline", "gf"], [0, 1], ROWS)
    assert "| PSNR | higher | 15.5 ± 0.71 | 15.75 ± 0.35 |" in text
    assert "| held-out loss | lower | -0.05, +0.02 (-0.015 ± 0.049) |" in text
    assert "| baseline's final held-out loss | 0.3 | 0.4 |" in text
    assert "| gf | 4 | not reached |" in text and "| baseline | 6 | 4 |" in text


TINY = ["model.hidden_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "data.frames=4",
        "data.synthetic_clips=8", "data.synthetic_frames=6", "data.batch_size=2", "gf.dit_block=1",
        "gf.projector_hidden=32", "gf.scale_hidden=16", "logging.every=1", "logging.sample_steps=2",
        "schedule.warmup=1", "ema.decay=0.9"]


def test_every_variant_is_a_valid_recipe_with_its_teacher_and_form(tmp_path):
    args = Namespace(steps=10, curve_points=5, set=[], teacher="oracle")
    recipe = load_recipe("gf_small")
    loaded = {}
    for variant in exp.VARIANTS:
        sets = exp.run_overrides(args, recipe, variant, 3, tmp_path)
        assert "logging.keep_checkpoints=0" in sets and "logging.checkpoint_every=2" in sets
        loaded[variant] = load_recipe("gf_small", sets)
    assert not loaded["baseline"].gf.enabled and loaded["baseline"].seed == 3
    assert loaded["baseline"].data.root == str(tmp_path / "data")   # gf_small fixes its scenes: one rendered set
    for variant in ("gf", "control", "released", "irepa"):
        r = loaded[variant]
        assert r.gf.enabled and r.teacher.layers == [0] and r.teacher.resolution == 14 * (32 // 4)   # the token grid
        assert r.teacher.kind == ("random" if variant == "control" else "oracle")
    assert loaded["released"].gf.alignment_form == "as_released" and loaded["released"].gf.released_size == 32
    assert loaded["irepa"].gf.alignment_form == "irepa" and loaded["gf"].gf.alignment_form == "per_token"
    # a recipe whose scenes follow the run's seed renders per seed
    per_seed = load_recipe("gf_tiny", ["data.synthetic_seed=null"])
    assert per_seed.data.synthetic_seed is None
    assert f"data.root={tmp_path / 'data_s3'}" in exp.run_overrides(args, per_seed, "gf", 3, tmp_path)
    tiny = load_recipe("gf_tiny")
    # --teacher recipe: the recipe's teacher, the control its random twin on the recipe's grid
    keep = Namespace(steps=10, curve_points=5, set=[], teacher="recipe")
    control = load_recipe("gf_tiny", exp.run_overrides(keep, tiny, "control", 0, tmp_path))
    assert control.teacher.kind == "random" and control.teacher.resolution == tiny.teacher.resolution
    assert load_recipe("gf_tiny", exp.run_overrides(keep, tiny, "gf", 0, tmp_path)).teacher.kind == "vggt"


@pytest.mark.slow
def test_the_pipeline_end_to_end_at_toy_size(tmp_path, monkeypatch):
    """2 seeds x (baseline, control): real engine/train.py runs (4 steps, a checkpoint every 2), evaluated, probed,
    tabled and plotted; the second call trains and evaluates nothing."""
    env = subprocess_env()   # the training processes: one thread, no CUDA, no Triton interpreter
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "TRITON_INTERPRET" not in env:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "exp"
    argv = ["--recipe", "gf_tiny", "--variants", "control", "baseline", "--seeds", "0", "1", "--steps", "4",
            "--curve-points", "2", "--videos", "2", "--probe-clips", "4", "--probe-times", "0", "0.8",
            "--out", str(out)] + [a for s in TINY for a in ("--set", s)]
    printed = io.StringIO()
    with torch_threads(SUBPROCESS_THREADS), contextlib.redirect_stdout(printed):
        assert exp.main(argv) == 0
    text = printed.getvalue()
    assert text.startswith("plan: 4 runs (baseline control x seeds [0, 1]) of 4 steps of gf_tiny, 4 to train")
    assert "estimated cost" in text
    control_recipe = (out / "control_s0" / "recipe.yaml").read_text()
    assert "kind: random" in control_recipe and "resolution: 56" in control_recipe
    rows = [json.loads(line) for line in (out / "control_s0" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["gf_angular"]) and math.isfinite(r["gf_scale"]) for r in rows if "gf_angular" in r)

    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"] == ["baseline", "control"]
    for name in ("baseline_s0", "baseline_s1", "control_s0", "control_s1"):
        r = saved["runs"][name]
        assert [step for step, _ in r["heldout_curve"]] == [2, 4]
        assert r["fm_heldout"] == r["heldout_curve"][-1][1]
        assert r["psnr_margin_flat"] == pytest.approx(r["psnr"] - r["psnr_flat"])
        assert r["ssim_margin_repeat"] == pytest.approx(r["ssim"] - r["ssim_repeat"])
        for key in ("probe_depth_t0", "probe_world_t0", "probe_depth_t0.8", "probe_world_t0.8", "consistency"):
            assert math.isfinite(r[key]), (name, key)
            assert key == "consistency" or r[key] <= 1.0
    # the trivial predictions are the data's, not the model's: the same for both variants of a seed
    assert saved["runs"]["control_s0"]["psnr_flat"] == saved["runs"]["baseline_s0"]["psnr_flat"]
    summary = saved["summary"]
    diffs = summary["differences"]["psnr"]["control"]["per_seed"]
    assert diffs == pytest.approx([saved["runs"][f"control_s{s}"]["psnr"] - saved["runs"][f"baseline_s{s}"]["psnr"]
                                   for s in (0, 1)])
    for s in ("0", "1"):
        target = saved["runs"][f"baseline_s{s}"]["fm_heldout"]
        step = summary["convergence"]["control"][s]
        curve = saved["runs"][f"control_s{s}"]["heldout_curve"]
        assert step == next((st for st, loss in curve if loss <= target), None)

    table = (out / "table.md").read_text()
    assert "| held-out PSNR (dB) | higher |" in table and "control - baseline" in table
    assert "probe R² log depth, t=0.8" in table and "### Convergence" in table
    assert (out / "gf_vs_baseline.png").stat().st_size > 10_000

    again = io.StringIO()
    with torch_threads(SUBPROCESS_THREADS), contextlib.redirect_stdout(again):
        assert exp.main(argv) == 0
    assert "0 to train, 4 reused" in again.getvalue() and again.getvalue().count("reusing") == 4
    assert json.loads((out / "results.json").read_text())["runs"] == saved["runs"]
