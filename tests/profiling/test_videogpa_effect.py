"""``profiling/videogpa_effect.py``: the statistics on hand-made numbers, and the whole command at toy size (a
random camera-conditioned DiT as the policy run, 2 seeds, 2 contexts, K = 2): it prints its plan with a cost,
runs DPO and the held-out comparison, writes its table, results and plot, and reuses every finished stage when
run again."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import SUBPROCESS_THREADS, subprocess_env, torch_threads

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # profiling/ is not an installed package
    sys.path.insert(0, str(ROOT))

from profiling.videogpa_effect import main, paired, summarise, table  # noqa: E402


# ------------------------------------------------------------------------------------------- statistics
def test_paired_statistics_on_hand_made_numbers():
    st = paired([10.0, 11.0, 12.0], [9.0, 10.5, 11.0], "lower")
    assert st["diffs"] == pytest.approx([-1.0, -0.5, -1.0])
    assert st["base_mean"] == pytest.approx(11.0) and st["base_sd"] == pytest.approx(1.0)
    assert st["dpo_mean"] == pytest.approx(30.5 / 3) and st["dpo_sd"] == pytest.approx(math.sqrt(13 / 12))
    assert st["diff_mean"] == pytest.approx(-2.5 / 3) and st["diff_sd"] == pytest.approx(math.sqrt(1 / 12))
    assert st["spread"] == pytest.approx(math.sqrt(13 / 12))          # the larger of the two standard deviations
    assert st["dpo_better_seeds"] == 3                                 # lower is better: every difference < 0
    assert st["beyond_spread"] is False and st["worse_beyond_spread"] is False

    # PSNR falling by 1.5 dB on average while the seeds spread by 1 dB: a fall beyond the spread
    st = paired([20.0, 21.0, 22.0], [19.0, 19.5, 20.0], "higher")
    assert st["diffs"] == pytest.approx([-1.0, -1.5, -2.0]) and st["spread"] == pytest.approx(1.0)
    assert st["dpo_better_seeds"] == 0 and st["beyond_spread"] is True and st["worse_beyond_spread"] is True
    # the same change upwards: beyond the spread, but not worse
    st = paired([19.0, 19.5, 20.0], [20.0, 21.0, 22.0], "higher")
    assert st["dpo_better_seeds"] == 3 and st["beyond_spread"] is True and st["worse_beyond_spread"] is False

    one = paired([5.0], [4.0], "lower")
    assert math.isnan(one["spread"]) and one["beyond_spread"] is None and one["dpo_better_seeds"] == 1
    with pytest.raises(ValueError, match="same non-zero number of seeds"):
        paired([1.0, 2.0], [1.0], "lower")


def hand_results() -> dict:
    runs = {}
    for s, (cb, cd, pb, pd, acc) in enumerate([(50.0, 40.0, 15.0, 15.2, 0.75), (52.0, 45.0, 15.5, 15.1, 0.5),
                                               (48.0, 47.0, 14.5, 14.6, 0.625)]):
        runs[f"s{s}"] = {"base": {"consistency": cb, "psnr": pb, "videos": 8},
                         "dpo": {"consistency": cd, "psnr": pd, "videos": 8},
                         "reference": {"consistency_gt": 5.0, "consistency_repeated": 30.0, "psnr_repeated": 16.0},
                         "heldout_implicit_acc": acc, "heldout_reward_margin": 0.01, "heldout_pairs": 4,
                         "train_implicit_acc_before": 0.0, "train_implicit_acc_after": 0.9, "train_pairs": 6,
                         "dpo_steps": 10, "train_winner_error": 40.0, "train_loser_error": 60.0}
    return runs


def test_summary_and_table_on_hand_made_numbers():
    results, seeds = hand_results(), [0, 1, 2]
    summary = summarise(results, seeds)
    c = summary["consistency"]
    assert c["diffs"] == pytest.approx([-10.0, -7.0, -1.0]) and c["dpo_better_seeds"] == 3
    assert c["diff_mean"] == pytest.approx(-6.0) and c["spread"] == pytest.approx(np.std([40, 45, 47], ddof=1))
    assert c["beyond_spread"] is True                                   # |-6| > 3.6
    p = summary["psnr"]
    assert p["diffs"] == pytest.approx([0.2, -0.4, 0.1]) and p["dpo_better_seeds"] == 2
    assert p["diff_mean"] == pytest.approx(-0.1 / 3) and p["worse_beyond_spread"] is False
    a = summary["heldout_implicit_acc"]
    assert a["mean"] == pytest.approx(0.625) and a["sd"] == pytest.approx(0.125) and a["above_chance_seeds"] == 2
    text = table(results, seeds, summary)
    assert "| held-out 3D-consistency error (oracle MSE x1e3) | lower | 50 ± 2 | 44 ± 3.6 | -10, -7, -1 (-6 ± 4.6) " \
           "| 3/3 | yes (3.6) |" in text
    assert "0.625 ± 0.12" in text and "2/3 above 0.5" in text
    assert "lower on 3/3 seeds" in text and "not a fall beyond the seed spread" in text
    assert "| repeated context frame (static) | 30 | 16 |" in text


# ------------------------------------------------------------------------------------------ end to end
def make_policy_run(run: Path, data_root: Path) -> None:
    """A policy run directory as engine/train.py leaves one: recipe.yaml and checkpoints/step_1 (a camera-
    conditioned DiT, dfot_tiny's made smaller, whose zero-initialised layers are re-drawn, so that it and its
    adapters act; 4 frames of 16x16)."""
    from safetensors.torch import save_file

    from geoforge.engine.config import load_recipe, recipe_to_yaml
    from geoforge.engine.models.dit import VideoDiT
    from geoforge.engine.videogpa.policy import randomise_zero_init

    recipe = load_recipe("dfot_tiny", [f"data.root={data_root}", "data.synthetic_clips=2", "data.synthetic_frames=4",
                                       "data.frames=4", "data.resolution=16", "model.hidden_dim=64", "model.depth=2",
                                       "model.num_heads=2"])
    torch.manual_seed(0)
    dit = VideoDiT(recipe.model)
    randomise_zero_init(dit, 0.02)
    step = run / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    save_file({f"dit.{k}": v.contiguous() for k, v in dit.state_dict().items()}, str(step / "model.safetensors"))
    (step / "COMPLETE").write_text("{}\n")


ARGS = ["--seeds", "0", "1", "--contexts", "2", "--candidates", "2", "--heldout", "2", "--sample-steps", "2",
        "--dpo-steps", "2", "--draws", "1", "--no-progress", "--set", "videogpa.dpo.eval_pairs=2",
        "--set", "data.batch_size=2", "--set", "logging.every=1", "--set", "backend=reference"]


@pytest.mark.slow
def test_the_experiment_end_to_end_at_toy_size(tmp_path, monkeypatch, capsys):
    for key, value in subprocess_env().items():   # the DPO runs it starts: one thread, no GPU
        monkeypatch.setenv(key, value)
    make_policy_run(tmp_path / "policy", tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--policy-run", str(tmp_path / "policy"), "--out", str(out), *ARGS]
    with torch_threads(SUBPROCESS_THREADS):
        assert main([*argv, "--plan"]) == 0                      # the plan and its cost only
        assert "estimated cost:" in capsys.readouterr().out and not (out / "train_s0").exists()
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.index("plan:") < printed.index("estimated cost:") < printed.index("engine/train.py")

    info = json.loads((out / "results.json").read_text())
    runs = info["runs"]
    assert set(runs) == {"s0", "s1"} and info["seeds"] == [0, 1]
    for s in (0, 1):
        r, held = runs[f"s{s}"], out / f"heldout_s{s}"
        # the numbers are those of the stage files
        for policy in ("base", "dpo"):
            scores = [json.loads(line)["score"] for line in (held / policy / "scores.jsonl").read_text().splitlines()]
            assert len(scores) == 4 and r[policy]["videos"] == 4
            assert r[policy]["consistency"] == pytest.approx(1e3 * np.mean(scores))
            assert 0 < r[policy]["psnr"] < 60
        # base and DPO samples of a context share their noise seeds (a paired comparison)
        for key in ("00000", "00001"):
            seeds = [json.loads((held / p / "candidates" / key / "meta.json").read_text())["seeds"]
                     for p in ("base", "dpo")]
            assert seeds[0] == seeds[1]
        assert 0.0 <= r["heldout_implicit_acc"] <= 1.0 and r["heldout_pairs"] == 2
        assert (out / f"train_s{s}" / "final" / "adapter_model.safetensors").is_file()
        assert r["train_pairs"] == 2 and r["dpo_steps"] == 2
        # the true geometry ranks the ground truth far above a static video
        assert r["reference"]["consistency_gt"] < 0.5 * r["reference"]["consistency_repeated"]
    summary = info["summary"]
    assert summary["consistency"]["diffs"] == pytest.approx(
        [runs[f"s{s}"]["dpo"]["consistency"] - runs[f"s{s}"]["base"]["consistency"] for s in (0, 1)])
    text = (out / "table.md").read_text()
    assert "held-out PSNR vs ground truth (dB)" in text and "implicit reward accuracy, held-out pairs" in text
    assert (out / "videogpa_effect.png").stat().st_size > 1000

    # run again: every stage is reused, nothing is recomputed, the same table
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    with torch_threads(SUBPROCESS_THREADS):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "engine/train.py" not in printed and printed.count("reusing") == 6
    assert "train: DPO done" in printed and "held-out: implicit accuracy done" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == before
    assert (out / "table.md").read_text() == text
