"""The ``pairs`` stage: one preference pair per input from its scored candidates.

Per input: candidates whose motion is below ``min_motion`` are dropped (static videos score well for the
wrong reason); among the rest, winner = lowest score, loser = highest score, and the pair is kept when
``score(loser) - score(winner) >= min_gap``. Pairs are split train/val (``val_fraction``, 98/2 in the
paper) by a seeded permutation. Output: ``pairs.jsonl`` (atomic) and ``pairs_summary.json``.
"""
from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from geoforge.engine.atomic import atomic_write_text
from geoforge.engine.videogpa.io import atomic_write_jsonl, read_jsonl

log = logging.getLogger("geoforge.videogpa")


def make_pairs(rows: list[dict[str, Any]], min_gap: float, min_motion: float, val_fraction: float,
               seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pairs from score rows (each with ``video``, ``input``, ``score``, ``motion``); returns (pairs, stats)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["input"]].append(row)
    pairs, static, small_gap, too_few = [], 0, 0, 0
    for key in sorted(groups):
        moving = [r for r in groups[key] if r["motion"] >= min_motion]
        static += len(groups[key]) - len(moving)
        if len(moving) < 2:
            too_few += 1
            continue
        ranked = sorted(moving, key=lambda r: (r["score"], r["video"]))
        winner, loser = ranked[0], ranked[-1]
        gap = loser["score"] - winner["score"]
        if gap < min_gap:
            small_gap += 1
            continue
        pairs.append({"input": key, "winner": winner["video"], "loser": loser["video"],
                      "winner_score": winner["score"], "loser_score": loser["score"], "gap": gap,
                      "winner_motion": winner["motion"], "loser_motion": loser["motion"]})
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(pairs))) if len(pairs) > 1 else 0
    val = set(order[:n_val])
    for i, pair in enumerate(pairs):
        pair["split"] = "val" if i in val else "train"
    stats = {"inputs": len(groups), "pairs": len(pairs), "train": len(pairs) - n_val, "val": n_val,
             "dropped_static_videos": static, "inputs_without_two_moving": too_few,
             "inputs_below_min_gap": small_gap}
    if pairs:
        stats["winner_score_mean"] = sum(p["winner_score"] for p in pairs) / len(pairs)
        stats["loser_score_mean"] = sum(p["loser_score"] for p in pairs) / len(pairs)
    return pairs, stats


def run_pairs_stage(recipe, run_dir: Path, world) -> dict[str, Any]:
    """``scores.jsonl`` -> ``pairs.jsonl`` (rank 0; the others wait)."""
    from geoforge.engine.distributed import barrier

    run_dir = Path(run_dir)
    out = run_dir / "pairs.jsonl"
    if out.is_file():
        return {"skipped": True}
    stats: dict[str, Any] = {}
    if world.is_main:
        scores = run_dir / "scores.jsonl"
        if not scores.is_file():
            raise FileNotFoundError(f"{scores} is missing: run the score stage first")
        cfg = recipe.videogpa.pairs
        pairs, stats = make_pairs(read_jsonl(scores), cfg.min_gap, cfg.min_motion, cfg.val_fraction, cfg.seed)
        if not any(p["split"] == "train" for p in pairs):
            raise RuntimeError(f"pairs stage: no training pair from {stats['inputs']} inputs (min_gap "
                               f"{cfg.min_gap}, min_motion {cfg.min_motion}: {stats}); lower the thresholds or "
                               f"generate more candidates")
        atomic_write_text(run_dir / "pairs_summary.json", json.dumps(stats, indent=1) + "\n")
        atomic_write_jsonl(out, pairs)
        log.info(f"pairs: {stats['pairs']} pairs ({stats['train']} train / {stats['val']} val) from "
                 f"{stats['inputs']} inputs; winner mean score {stats.get('winner_score_mean', float('nan')):.5f}, "
                 f"loser {stats.get('loser_score_mean', float('nan')):.5f}")
    barrier()
    return stats


__all__ = ["make_pairs", "run_pairs_stage"]
