"""The run directory and what a run reports: resolved recipe, progress bar, metrics, tensorboard.

``runs/<recipe>-<timestamp>/`` holds ``recipe.yaml`` (resolved), ``metrics.jsonl`` (one JSON row per
logged step), ``tensorboard/`` events, ``checkpoints/`` and ``samples/``. Only rank 0 writes; every
rank may call the methods.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from geoforge.engine.atomic import atomic_write_text
from geoforge.engine.config import Recipe, recipe_to_yaml
from geoforge.engine.distributed import World

log = logging.getLogger("geoforge")


def resolve_run_dir(recipe: Recipe, run_dir: str | None, resume: str | None) -> Path:
    """``--run-dir`` if given; with ``--resume auto`` and no run dir, the newest run of this recipe."""
    if run_dir:
        return Path(run_dir)
    runs = Path("runs")
    if resume == "auto":
        previous = sorted(runs.glob(f"{recipe.name}-*"), key=lambda p: p.stat().st_mtime)
        if previous:
            return previous[-1]
    return runs / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_resolved_recipe(recipe: Recipe, run_dir: Path) -> None:
    atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))


class RunLog:
    """Progress bar (step, loss parts, it/s, ETA), metrics.jsonl, tensorboard, one-time warnings."""

    def __init__(self, run_dir: Path, world: World, total_steps: int):
        self.run_dir = Path(run_dir)
        self.main = world.is_main
        self.total = total_steps
        self._warned: set[str] = set()
        self._bar = None
        self._tb = None
        self.last: dict[str, float] = {}
        self.first_loss: float | None = None
        self.start_step = 0
        if self.main:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def info(self, text: str) -> None:
        if self.main:
            (self._bar.write if self._bar else print)(text)

    def warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.info(f"warning: {text}")

    def resume_from(self, step: int) -> None:
        """Drop metric rows after ``step`` (written by the interrupted run after its last checkpoint)."""
        self.start_step = step
        path = self.run_dir / "metrics.jsonl"
        if not self.main or not path.is_file():
            return
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        atomic_write_text(path, "".join(r + "\n" for r in rows))

    def start_progress(self, step: int) -> None:
        if self.main:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=step, desc="train", dynamic_ncols=True, unit="step")

    def step(self, step: int, parts: dict[str, float], every: int, **extra: float) -> None:
        if not self.main:
            return
        if self.first_loss is None:
            self.first_loss = parts["loss"]
        self.last = {"step": step, **parts, **extra}
        self._bar.update(1)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in parts.items()}, refresh=False)
        if step % every == 0 or step == self.total:
            row = {"step": step, "time": time.time(), **parts, **extra}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            for k, v in {**parts, **extra}.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def validation(self, result, step: int) -> None:
        """Validation metrics to metrics.jsonl and tensorboard (scalars, frame strip, videos)."""
        if not self.main:
            return
        from geoforge.engine.eval.validate import write_validation

        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **result.metrics}) + "\n")
        write_validation(self._tb, result, step)
        self.info(f"validation at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))

    def finish(self, seconds: float) -> dict:
        if not self.main:
            return {"text": ""}
        self._bar.close()
        self._tb.close()
        steps = self.last.get("step", self.start_step) - self.start_step
        parts = ", ".join(f"{k} {v:.4g}" for k, v in self.last.items() if k != "step")
        text = (f"done: {steps} steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.2f} it/s); "
                f"first loss {self.first_loss if self.first_loss is None else round(self.first_loss, 4)}; "
                f"last: {parts}\nrun directory: {self.run_dir}")
        return {"text": text, **self.last}
