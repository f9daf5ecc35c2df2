"""What the experiment commands share (``gf_vs_baseline.py``, ``precision_equivalence.py``): train a run or reuse a
finished one, read its logged losses, and summarise numbers over seeds."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def finished(run_dir: Path, steps: int) -> bool:
    """The run has its final checkpoint (``checkpoints/step_<steps>``)."""
    from geoforge.engine.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and ckpt.name == f"step_{steps}"


def trained_steps(run_dir: Path) -> int | None:
    """``schedule.steps`` of the run's resolved ``recipe.yaml`` (None: no run there yet)."""
    import yaml

    path = Path(run_dir) / "recipe.yaml"
    return yaml.safe_load(path.read_text())["schedule"]["steps"] if path.is_file() else None


def train_run(recipe: str, run_dir: Path, sets: list[str], steps: int, env: dict[str, str] | None = None) -> bool:
    """``engine/train.py --recipe RECIPE --run-dir RUN_DIR --resume auto --set ...`` unless the run is finished;
    its output goes to ``RUN_DIR.log``. Returns True when it trained (False: reused). Exits naming the log on
    failure."""
    if finished(run_dir, steps):
        print(f"reusing {run_dir}", flush=True)
        return False
    trained = trained_steps(run_dir)
    if trained is not None and trained != steps:
        raise SystemExit(f"{run_dir}: trained for schedule.steps={trained} (its recipe.yaml), asked for {steps}: "
                         f"pass --steps {trained} to reuse it, or another --out")
    launch(recipe, run_dir, sets, env, resume=True)
    return True


def launch(recipe: str, run_dir: Path, sets: list[str], env: dict[str, str] | None = None, resume: bool = False,
           what: str = "training") -> None:
    """Run ``engine/train.py --recipe RECIPE --run-dir RUN_DIR [--resume auto] --set ...`` to the end, its output in
    ``RUN_DIR.log``; exits naming the log when it fails."""
    cmd = [sys.executable, str(ROOT / "engine" / "train.py"), "--recipe", str(recipe), "--run-dir", str(run_dir)]
    cmd += ["--resume", "auto"] if resume else []
    for s in sets:
        cmd += ["--set", s]
    print(" ".join(cmd), flush=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if proc.returncode:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); see {log}")


def logged(run_dir: Path, key: str) -> list[float]:
    """Every logged value of ``key`` in the run's ``metrics.jsonl``, in step order."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r[key] for r in rows if key in r]


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    """The mean of the last ``fraction`` of ``values`` (at least one)."""
    n = max(1, int(len(values) * fraction))
    return sum(values[-n:]) / n


def mean_sd(values: list[float], digits: int = 4) -> str:
    """``mean ± sample standard deviation`` (``± nan`` for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.{digits}g} ± {sd:.2g}"


def smooth(curve: list[float], window: int) -> list[float]:
    """Means of consecutive windows of ``window`` values (the x of value i is ``i + window``)."""
    return [sum(curve[i:i + window]) / window for i in range(0, len(curve) - window + 1)]
