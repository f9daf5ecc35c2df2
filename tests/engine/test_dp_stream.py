"""One RNG stream per data-parallel rank for dropout and every other stochastic layer (issue 23).

``dp_stream_worker.py`` trains a small U-ViT3D (DFoT's diffusion, the real ``DiffusionTask`` through the one trainer)
on 2 CPU ranks over gloo, once as the code runs now and once with the reseed after the build disabled (the old
path: every rank drawing from the one stream it seeded to build the model). It shows:

- the weights each rank builds are identical (before DeepSpeed, which would broadcast rank 0's anyway);
- with dropout 0.3 the 2 DP ranks draw different masks (the old path: the same masks on different clips);
- without dropout, the per-step losses, the learning rate of each step and the weights after the run are
  those of the old path, exactly: nothing a training step draws (noise, times, conditioning drop, data) comes
  from the global stream;
- the ranks of one sequence-parallel group (DP 1 x SP 2) share one stream;
- a run resumed from a checkpoint draws the uninterrupted run's masks and logs its losses.

And the warm-up longer than the run of the same worker: the learning rate of each step is ``lr (s + 1) / warmup``,
and the run warns that it never reaches its peak.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from processes import SUBPROCESS_THREADS, subprocess_env
from test_train import ROOT

pytestmark = pytest.mark.slow

LR, WARMUP, STEPS = 1e-3, 10, 3   # the worker's optimizer.lr, schedule.warmup and schedule.steps


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp_stream")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(36500 + os.getpid() % 1000), "tests/engine/dp_stream_worker.py",
           str(tmp / "data"), str(tmp / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert result["threads"] == SUBPROCESS_THREADS
    return result, proc.stdout


def test_dp_ranks_draw_different_dropout_masks_from_identical_initial_weights(worker):
    result, _ = worker
    new, old = result["dropout"]["new"], result["dropout"]["old"]
    for run in (new, old):
        assert run["weights_equal"], run   # every rank builds the same weights
        assert run["mask_count"] == [3, 3]   # the U-ViT3D's 3 transformer blocks, each with its dropout
    assert new["built_weights_sum"] == old["built_weights_sum"]   # the build itself is unchanged
    assert new["masks_differ"] and not new["rng_equal"], new
    assert 0.25 < new["drop_fraction"] < 0.35
    # the old path drew the same masks on both DP ranks: what the per-rank stream fixes
    assert not old["masks_differ"] and old["rng_equal"], old


def test_without_dropout_the_losses_are_those_of_the_old_seeding(worker):
    result, _ = worker
    new, old = result["no_dropout"]["new"], result["no_dropout"]["old"]
    assert len(new["losses"]) == STEPS and all(0 < s["loss"] < 10 for s in new["losses"])
    assert new["losses"] == old["losses"]   # every part of every step, exactly
    assert new["weights"] == old["weights"]
    assert new["ranks_weights_equal"] and old["ranks_weights_equal"]


def test_sequence_parallel_group_shares_one_stream(worker):
    result, _ = worker
    assert result["sp"]["dp_ranks"] == [0, 0]
    assert result["sp"]["rng_equal"]


def test_resume_reproduces_the_masks_and_losses_of_the_uninterrupted_run(worker):
    resume = worker[0]["resume"]
    assert resume["resumed_from"] == 2
    assert resume["masks_equal"]
    assert resume["resumed"] == resume["full"][2:]


def test_warmup_longer_than_the_run_lr_curve_and_warning(worker):
    result, stdout = worker
    for run in result["no_dropout"].values():
        assert run["lrs"] == pytest.approx([LR * (s + 1) / WARMUP for s in range(STEPS)], rel=1e-12)
    last = LR * STEPS / WARMUP
    assert (f"warning: the learning rate never reaches its peak: warm-up {WARMUP} > steps {STEPS}, "
            f"last LR = {last:.4g}") in stdout
