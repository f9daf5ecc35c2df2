"""End to end, no fakes: ``engine/train.py`` trains the default recipe's model (gf_tiny: x-prediction, GF
with its tiny VGGT teacher) for a bounded number of steps on a few synthetic clips; then its checkpoint
samples those clips from noise with one clean context frame, and the samples must be the scene:

- above the flat frame of the clip's mean colour in PSNR;
- not noise: high-frequency (Laplacian) energy within a factor of 5 of the ground truth's (uniform noise
  carries tens of times more, the issue's noisy samples 38-70x; a flat frame none);
- the EMA weights (what samples and eval use) not worse than the raw ones.

The same trained DiT, as a VideoGPA policy, makes candidates that are not noise either. The run's
``report.md`` agrees with the numbers computed here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from processes import SUBPROCESS_THREADS, subprocess_env, torch_threads
from geoforge.engine.checkpoint import latest_checkpoint
from geoforge.engine.config import load_recipe
from geoforge.engine.eval.baselines import flat_frames, high_frequency_energy
from geoforge.engine.eval.image_metrics import psnr
from geoforge.engine.eval.load import load_model
from geoforge.engine.eval.validate import validate, validation_batch
from geoforge.engine.precision import resolve_precision, use_precision

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

CLIPS, STEPS = 4, 250
SMALL = ["model.hidden_dim=64", "model.depth=3", "model.num_heads=2", "data.resolution=32", "model.patch_size=4",
         "data.frames=4", f"data.synthetic_clips={CLIPS}", "data.synthetic_frames=6", "data.batch_size=4",
         "data.num_workers=0",
         "teacher.resolution=28", "teacher.vggt.config.aggregator.img_size=28", "gf.projector_hidden=64",
         f"schedule.steps={STEPS}", "schedule.warmup=10", "optimizer.lr=1e-3", f"logging.checkpoint_every={STEPS}",
         "logging.every=10", "logging.sample_steps=16", f"logging.report_videos={CLIPS}",
         "objective.prediction=x0", "objective.context_frames=1", "objective.random_context=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("e2e") / "run"
    data = run.parent / "data"
    cmd = [sys.executable, "engine/train.py", "--recipe", "gf_tiny", "--run-dir", str(run)]
    for o in [*SMALL, f"data.root={data}"]:
        cmd += ["--set", o]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    recipe = load_recipe("gf_tiny", [*SMALL, f"data.root={data}"])
    return run, recipe


def _sample(recipe, run: Path, weights: str):
    """Sampled on the training process's thread count and precision: the run report's numbers are compared with
    these."""
    dit = load_model(recipe, latest_checkpoint(run), weights)
    with torch_threads(SUBPROCESS_THREADS), use_precision(resolve_precision(recipe.distributed.precision, "cpu")):
        return validate(dit, validation_batch(recipe, CLIPS), recipe, STEPS)


def test_samples_from_noise_are_the_scene_and_ema_is_not_worse(trained):
    run, recipe = trained
    ema, raw = _sample(recipe, run, "ema"), _sample(recipe, run, "model")
    k = ema.context
    gt = ema.ground_truth[:, k:]
    p_ema, p_raw = float(psnr(ema.samples[:, k:], gt).mean()), float(psnr(raw.samples[:, k:], gt).mean())
    p_flat = float(psnr(flat_frames(ema.ground_truth, k), gt).mean())
    hf = high_frequency_energy(ema.samples[:, k:]) / high_frequency_energy(gt)
    noise = torch.rand(gt.shape, generator=torch.Generator().manual_seed(0))
    assert p_ema > p_flat + 0.5, (p_ema, p_flat)   # measured: 19.2 vs 18.0 dB (repeated context 16.8)
    assert 0.2 < hf < 5.0, hf                       # measured: 0.42 (blurred, not noise)
    assert high_frequency_energy(noise) / high_frequency_energy(gt) > 10   # what "noise" would score
    assert p_ema >= p_raw - 0.5, (p_ema, p_raw)
    report = json.loads((run / "report" / "metrics.json").read_text())["training"]
    assert report["model (EMA weights)"]["psnr"] == pytest.approx(p_ema, abs=1e-4)
    assert report["flat frame"]["psnr"] == pytest.approx(p_flat, abs=1e-4)
    text = (run / "report.md").read_text()
    assert "held-out clips" in text and "repeated context" in text
    # the recipe's precision (auto) as this machine resolves it: bf16 autocast where the CPU has AMX / AVX512-BF16
    ran = resolve_precision("auto", "cpu")
    assert f"Precision (training and these samples): {ran.describe()}." in text
    assert json.loads((run / "report" / "metrics.json").read_text())["precision"] == ran.describe()
    for png in ("loss.png", "frames_training.png", "frames_heldout.png"):
        assert (run / "report" / png).stat().st_size > 1000


def test_videogpa_candidates_of_the_trained_policy_are_not_noise(trained):
    from geoforge.engine.videogpa.config import VideoGPAConfig
    from geoforge.engine.videogpa.policy import Condition, build_dit_policy

    run, recipe = trained
    gpa = load_recipe("videogpa_tiny").videogpa
    gpa = replace(gpa, policy=replace(gpa.policy, checkpoint=str(latest_checkpoint(run))))
    assert isinstance(gpa, VideoGPAConfig)
    policy = build_dit_policy(replace(recipe, videogpa=gpa))
    batch = validation_batch(recipe, 2)
    scores = []
    for i in range(2):
        cond = Condition(key=str(i), first_frame=batch["frames"][i, 0], intrinsics=batch["intrinsics"][i],
                         extrinsics=batch["extrinsics"][i])
        videos = torch.from_numpy(policy.sample(cond, seeds=[1, 2], steps=16, guidance=1.0)).float() / 255
        videos = videos.permute(0, 1, 4, 2, 3)   # [K, T, 3, H, W]
        gt = batch["frames"][i:i + 1, 1:].expand(2, -1, -1, -1, -1)
        hf = high_frequency_energy(videos[:, 1:]) / high_frequency_energy(gt)
        assert 0.2 < hf < 5.0, hf
        p_flat = float(psnr(flat_frames(batch["frames"][i:i + 1], 1), batch["frames"][i:i + 1, 1:]).mean())
        scores.append(float(psnr(videos[:, 1:], gt).mean()))
        assert scores[-1] > p_flat, (scores[-1], p_flat)
        assert not np.array_equal(videos[0].numpy(), videos[1].numpy())   # seeds give different candidates
