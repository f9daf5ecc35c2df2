"""``gf.freeze_projector``: the released form's frozen-at-init alignment head (issue 23).

GF's released code never optimises its projector: its optimizer takes ``diffusion_model.parameters()`` only
(CIntellifusion/GeometryForcing ``algorithms/dfot/dfot_video.py`` ``configure_optimizers``), so the projector and
scale head keep their random initialisation while the alignment loss still trains the backbone through them.
``freeze_projector_worker.py`` trains gf_tiny (shrunk) through the real task and trainer: with the option the head's
weights after 3 steps equal their initialisation, none is in the optimizer or has optimizer state (or a gradient,
or an EMA), the backbone trains; without it the head's weights change and have optimizer state. Under ZeRO 2 (the
paper recipe's stage) too, and a run resumed from a checkpoint (which DeepSpeed writes without frozen parameters)
rebuilds the head at its initialisation and continues the uninterrupted run's loss.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from geoforge.engine.config import load_recipe
from processes import SUBPROCESS_THREADS, subprocess_env
from test_train import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("freeze_projector")
    proc = subprocess.run([sys.executable, "tests/engine/freeze_projector_worker.py", str(tmp / "data"),
                           str(tmp / "runs")], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert result["threads"] == SUBPROCESS_THREADS
    return result


def test_frozen_head_stays_at_its_init_without_optimizer_state(worker):
    frozen = worker["frozen"]
    assert frozen["head_tensors"] > 0
    assert frozen["head_equal_init"] and frozen["head_changed"] == 0
    assert frozen["head_in_optimizer_groups"] == 0 and frozen["head_with_optimizer_state"] == 0
    assert frozen["head_grads"] == 0 and frozen["ema_names_with_gf"] == 0
    assert frozen["backbone_moved"] and frozen["backbone_with_optimizer_state"] > 0   # the loss still trains it


def test_trained_head_changes_and_has_optimizer_state(worker):
    trained, frozen = worker["trained"], worker["frozen"]
    assert not trained["head_equal_init"] and trained["head_changed"] == trained["head_tensors"]
    assert trained["head_in_optimizer_groups"] == trained["head_tensors"]
    assert trained["head_with_optimizer_state"] == trained["head_tensors"]
    assert trained["ema_names_with_gf"] == trained["head_tensors"]
    assert trained["losses"][0] == pytest.approx(frozen["losses"][0], rel=1e-6)   # same start, then they part
    assert trained["losses"][1:] != frozen["losses"][1:]


def test_frozen_head_under_zero2_and_across_a_resume(worker):
    z2 = worker["frozen_zero2"]
    assert z2["head_equal_init"] and z2["head_in_optimizer_groups"] == 0
    assert z2["resumed_step"] == 3 and z2["resumed_head_equal_init"]
    assert z2["loss_resumed"] == pytest.approx(z2["loss_next"], rel=1e-5)


def test_the_key_defaults_to_trained_as_the_paper_describes():
    assert load_recipe("gf_re10k_paper").gf.freeze_projector is False
    assert load_recipe("gf_re10k_paper", ["gf.freeze_projector=true"]).gf.freeze_projector is True
