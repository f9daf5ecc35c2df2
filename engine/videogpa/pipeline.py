"""VideoGPA post-training: the stages generate -> score -> pairs -> train, each resumable.

``deepspeed engine/train.py --recipe videogpa_dpo`` (any launcher) runs the recipe's pending stages in
order; ``--stage NAME`` runs one. A stage whose output is complete is skipped, and every stage writes
atomically and keeps per-item progress, so a killed run continues where it stopped when started again
on the same run directory (``--run-dir DIR`` or ``--resume auto``):

============  ==========================================  ======================================
stage         complete when                               progress kept across a kill
============  ==========================================  ======================================
generate      ``candidates/COMPLETE``                     finished inputs (``candidates/<key>/``)
score         ``scores.jsonl``                            ``scores.partial.rank*.jsonl`` rows
pairs         ``pairs.jsonl``                             (one quick step)
train         ``final/COMPLETE``                          ``train/checkpoints/step_N``
============  ==========================================  ======================================

Stage wall-clock times accumulate in ``pipeline.json``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from geoforge.engine.videogpa.config import STAGES
from geoforge.engine.atomic import atomic_write_text

log = logging.getLogger("geoforge.videogpa")

COMPLETE_MARKERS = {"generate": "candidates/COMPLETE", "score": "scores.jsonl", "pairs": "pairs.jsonl",
                    "train": "final/COMPLETE"}


def stage_complete(run_dir: Path, stage: str) -> bool:
    return (Path(run_dir) / COMPLETE_MARKERS[stage]).is_file()


def _read_timings(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "pipeline.json"
    return json.loads(path.read_text()) if path.is_file() else {"seconds": {}, "runs": {}}


def run_pipeline(recipe, run_dir: Path, world, stage: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run the pending stages of ``recipe.videogpa.stages`` (or only ``stage``) in ``run_dir``."""
    from geoforge.engine.distributed import barrier
    from geoforge.engine.videogpa.generate import run_generate_stage
    from geoforge.engine.videogpa.pairs import run_pairs_stage
    from geoforge.engine.videogpa.policy import build_policy
    from geoforge.engine.videogpa.policy_base import check_sequence_parallel
    from geoforge.engine.videogpa.score import run_score_stage
    from geoforge.engine.videogpa.train_dpo import run_train_stage

    if recipe.videogpa is None:
        raise ValueError(f"recipe {recipe.name!r} has no videogpa section")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: must be one of {list(STAGES)}")
    run_dir = Path(run_dir)
    stages = [stage] if stage else list(recipe.videogpa.stages)
    timings = _read_timings(run_dir)
    results: dict[str, Any] = {}
    policy = None
    for name in stages:
        if stage_complete(run_dir, name):
            if world.is_main:
                log.info(f"videogpa: stage {name} is complete ({COMPLETE_MARKERS[name]}), skipped")
            results[name] = {"skipped": True}
            continue
        if world.is_main:
            log.info(f"videogpa: stage {name}")
        began = time.perf_counter()
        if name in ("generate", "train") and policy is None:
            policy = build_policy(recipe, world.device)
            if "train" in stages:   # heads and tokens that sequence parallelism splits: fail before generating
                check_sequence_parallel(policy, recipe.distributed.sequence_parallel)
        if name == "generate":
            results[name] = run_generate_stage(recipe, run_dir, world, policy, show_progress)
        elif name == "score":
            results[name] = run_score_stage(recipe, run_dir, world, show_progress)
        elif name == "pairs":
            results[name] = run_pairs_stage(recipe, run_dir, world)
        else:
            results[name] = run_train_stage(recipe, run_dir, world, policy, show_progress)
        seconds = time.perf_counter() - began
        timings["seconds"][name] = timings["seconds"].get(name, 0.0) + seconds
        timings["runs"][name] = timings["runs"].get(name, 0) + 1
        if world.is_main:
            atomic_write_text(run_dir / "pipeline.json", json.dumps(timings, indent=1) + "\n")
        barrier()
    lines = ["videogpa: " + ", ".join(
        f"{n} {'skipped' if results[n].get('skipped') else 'done'}" for n in stages)]
    lines.append("stage seconds (all runs): " + ", ".join(f"{n} {s:.1f}" for n, s in timings["seconds"].items()))
    train = results.get("train", {})
    if "implicit_acc_after" in train:
        lines.append(f"implicit accuracy on training pairs {train['implicit_acc_before']:.3f} -> "
                     f"{train['implicit_acc_after']:.3f}; reference {train['reference']}; peak memory "
                     f"{train['peak_memory_bytes'] / 2**20:.0f} MiB")
    lines.append(f"run directory: {run_dir}")
    return {"text": "\n".join(lines), "stages": results, "seconds": timings["seconds"]}


__all__ = ["run_pipeline", "stage_complete", "COMPLETE_MARKERS"]
