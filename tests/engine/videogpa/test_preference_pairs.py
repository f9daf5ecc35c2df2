"""Preference pairs: winner = lowest score, loser = highest, min gap, static videos dropped, 98/2 split."""
import pytest

from geoforge.engine.videogpa.pairs import make_pairs


def rows_for(key, scores, motions=None):
    motions = motions or [0.1] * len(scores)
    return [{"video": f"candidates/{key}/cand_{k:02d}.mp4", "input": key, "score": s, "motion": m}
            for k, (s, m) in enumerate(zip(scores, motions))]


def test_winner_loser_gap_and_motion():
    rows = (rows_for("a", [0.30, 0.10, 0.50, 0.20])                       # gap 0.4: kept
            + rows_for("b", [0.30, 0.32, 0.31])                           # gap 0.02 < 0.05: dropped
            + rows_for("c", [0.05, 0.60, 0.40], motions=[0.0, 0.1, 0.1])   # static winner dropped: 0.40 vs 0.60
            + rows_for("d", [0.1, 0.9], motions=[0.0, 0.1]))              # one moving candidate: no pair
    pairs, stats = make_pairs(rows, min_gap=0.05, min_motion=0.001, val_fraction=0.0, seed=0)
    by_input = {p["input"]: p for p in pairs}
    assert sorted(by_input) == ["a", "c"]
    assert by_input["a"]["winner"].endswith("cand_01.mp4") and by_input["a"]["loser"].endswith("cand_02.mp4")
    assert by_input["a"]["gap"] == pytest.approx(0.4)
    assert by_input["c"]["winner"].endswith("cand_02.mp4") and by_input["c"]["winner_score"] == 0.40
    assert stats == {"inputs": 4, "pairs": 2, "train": 2, "val": 0, "dropped_static_videos": 2,
                     "inputs_without_two_moving": 1, "inputs_below_min_gap": 1,
                     "winner_score_mean": pytest.approx(0.25), "loser_score_mean": pytest.approx(0.55)}
    assert all(p["split"] == "train" for p in pairs)


def test_split_is_seeded_and_sized():
    rows = [r for i in range(100) for r in rows_for(f"{i:03d}", [0.1, 0.2 + i / 1000])]
    pairs, stats = make_pairs(rows, min_gap=0.05, min_motion=0.0, val_fraction=0.02, seed=42)
    assert stats["pairs"] == 100 and stats["val"] == 2 and stats["train"] == 98
    again, _ = make_pairs(rows, min_gap=0.05, min_motion=0.0, val_fraction=0.02, seed=42)
    other, _ = make_pairs(rows, min_gap=0.05, min_motion=0.0, val_fraction=0.02, seed=7)
    val = [p["input"] for p in pairs if p["split"] == "val"]
    assert val == [p["input"] for p in again if p["split"] == "val"]
    assert val != [p["input"] for p in other if p["split"] == "val"]


def test_ties_break_by_video_name():
    pairs, _ = make_pairs(rows_for("a", [0.2, 0.1, 0.1, 0.3, 0.3]), 0.05, 0.0, 0.0, 0)
    assert pairs[0]["winner"].endswith("cand_01.mp4") and pairs[0]["loser"].endswith("cand_04.mp4")
