"""User errors end in one ``error:`` line that names the key or file and what to do next, exit code 2, no traceback
(``engine/errors.py``); a bug keeps its traceback. One case per class of error, through ``engine/train.py`` as a
user runs it on a CPU machine."""
from __future__ import annotations

import subprocess
import sys

import pytest

import geoforge.engine.train as train_entry
from geoforge.engine.errors import MissingInput
from processes import subprocess_env
from test_train import ROOT


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "engine/train.py", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_a_misspelt_key_names_the_key():
    line = _one_error_line(_train("--recipe", "gf_tiny", "--set", "optimizer.lrr=1e-4"))
    assert "optimizer.lrr: unknown key (did you mean 'lr'?)" in line


def test_a_cuda_recipe_without_cuda_says_what_it_needs_and_the_toy_twin():
    line = _one_error_line(_train("--recipe", "gf_re10k"))
    assert "device: 'cuda' but no CUDA device is available" in line
    assert "gf_re10k needs 8 x H100 80 GB" in line and "facebook/VGGT-1B" in line
    assert "try its toy twin: deepspeed engine/train.py --recipe gf_tiny" in line


def test_a_backend_that_is_not_installed_names_the_extra():
    line = _one_error_line(_train("--recipe", "videogpa_dpo", "--set", "device=cpu", "--set", "attention=flash_attn"))
    assert "attention: 'flash_attn' requested but not usable here" in line
    assert "pip install -e '.[gpu]'" in line and "--set attention=auto" in line
    assert "--recipe videogpa_tiny" in line


def test_a_missing_data_root_names_the_folder_and_the_prepare_command(tmp_path):
    line = _one_error_line(_train("--recipe", "dfot_tiny", "--run-dir", str(tmp_path / "run"),
                                  "--set", "data.kind=re10k", "--set", f"data.root={tmp_path / 'nothing'}"))
    assert f"data.root: no clips for split 'training': neither {tmp_path / 'nothing' / 'training'}" in line
    assert "geoforge-prepare-re10k" in line


def test_a_missing_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "dit.safetensors"
    line = _one_error_line(_train("--recipe", "dfot_tiny", "--run-dir", str(tmp_path / "run"),
                                  "--set", f"model.pretrained={missing}", "--set", f"data.root={tmp_path / 'data'}"))
    assert f"weights file {str(missing)!r} does not exist" in line


def test_only_rank_zero_reports_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def missing(*_):
        raise MissingInput("data.root: /x does not exist; prepare it")

    monkeypatch.setattr(train_entry, "load_recipe", missing)
    assert train_entry.main(["--recipe", "gf_tiny"]) == 2
    assert capsys.readouterr().err == "error: data.root: /x does not exist; prepare it\n"
    monkeypatch.setenv("RANK", "1")
    assert train_entry.main(["--recipe", "gf_tiny"]) == 2
    assert capsys.readouterr().err == ""   # the other ranks stay quiet

    def bug(*_):
        raise KeyError("a real bug")

    monkeypatch.setattr(train_entry, "load_recipe", bug)
    with pytest.raises(KeyError, match="a real bug"):
        train_entry.main(["--recipe", "gf_tiny"])
