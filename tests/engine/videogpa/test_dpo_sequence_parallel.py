"""Sequence parallelism (DeepSpeed-Ulysses, ``distributed.sequence_parallel``) in the DPO train stage, on 2 CPU
ranks over gloo.

- per policy (GeoForge's DiT; Wan2.2-TI2V and CogVideoX-I2V, each with and without activation
  checkpointing, random prompt embeddings; LoRA, and full fine-tuning against a frozen copy): one
  DPOModule on token slices of 2 ranks gives, on each rank, the whole clip's DPO loss and the policy's and
  the reference's per-sample errors, and the whole clip's gradients (summed over the group / 2, as
  DeepSpeed averages), 1e-5 relative (``sp_dpo_worker.py``);
- training: ``deepspeed --num_gpus 2 engine/train.py --stage train --set distributed.sequence_parallel=2``
  logs the 1-rank run's DPO parts (1e-5 relative): the DiT policy under ZeRO-3 with gradient
  accumulation, Wan under ZeRO-2, CogVideoX under ZeRO-3 with accumulation and activation checkpointing;
- bad settings fail at load naming the key.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from processes import subprocess_env
from geoforge.engine.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


CASES = [{"name": "dit", "kind": "dit"}, {"name": "wan", "kind": "wan_ti2v"},
         {"name": "wan_ckpt", "kind": "wan_ti2v", "ckpt": True}, {"name": "cogvideox", "kind": "cogvideox_i2v"},
         {"name": "cogvideox_ckpt", "kind": "cogvideox_i2v", "ckpt": True},
         # every weight trained (reference: a frozen copy): gradients of the replicated text / time paths too
         {"name": "dit_full", "kind": "dit", "full": True}, {"name": "wan_full", "kind": "wan_ti2v", "full": True},
         {"name": "cogvideox_full", "kind": "cogvideox_i2v", "full": True}]


def test_sharded_dpo_errors_and_gradients_equal_whole_clip():
    pytest.importorskip("diffusers")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(35500 + os.getpid() % 1000), "tests/engine/videogpa/sp_dpo_worker.py",
           json.dumps(CASES)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert sorted(results) == sorted(c["name"] for c in CASES)
    for name, r in results.items():
        assert r["all_to_all"] > 0, (name, r)   # the sharded run went through Ulysses' all-to-all
        assert r["missing"] == [] and r["params"] >= 8, (name, r)
        assert r["parts"]["err_w"] != r["parts"]["ref_err_w"], (name, r)   # the policy is not the reference
        assert r["part_err"] < 1e-5, (name, r)   # loss and the 4 per-sample errors, on every rank
        assert r["grad_err"] < 1e-5, (name, r)


STEPS = ["schedule.steps=3", "schedule.warmup=1", "logging.every=1", "logging.checkpoint_every=10",
         "videogpa.dpo.eval_pairs=2", "videogpa.dpo.eval_draws=1", "optimizer.lr=3e-3",
         "distributed.grad_accum=2", "distributed.precision=fp32"]   # compared at 1e-5: fp32, explicitly


def _dpo_run(launcher: str, run_dir: Path, overrides: list[str], prepare=None
             ) -> tuple[subprocess.CompletedProcess, dict]:
    from test_dpo_training import T, prepare as prepare_dit

    (prepare or prepare_dit)(run_dir)
    args = ["engine/train.py", "--recipe", "videogpa_tiny", "--run-dir", str(run_dir), "--stage", "train"]
    for o in [f"data.frames={T}", *STEPS, *overrides]:
        args += ["--set", o]
    cmd = ([sys.executable, *args] if launcher == "python" else
           [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(36500 + os.getpid() % 1000), *args])
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    rows = {}
    if proc.returncode == 0:
        rows = {r["step"]: r for r in map(json.loads, (run_dir / "train" / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}
    return proc, rows


def _compare(ref: dict, sp: dict) -> None:
    worst = 0.0
    for step in ref:
        for part in ("loss", "err_w", "err_l", "ref_err_w", "ref_err_l"):
            assert sp[step][part] == pytest.approx(ref[step][part], rel=1e-5), (step, part, ref, sp)
            worst = max(worst, abs(sp[step][part] - ref[step][part]) / abs(ref[step][part]))
    print(f"largest relative difference of the logged DPO parts, SP 2 vs 1 rank: {worst:.2e}")


def test_dit_policy_two_ranks_sp2_zero3_match_one_rank(tmp_path):
    one, ref = _dpo_run("python", tmp_path / "one", ["distributed.zero_stage=0"])
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two, sp = _dpo_run("deepspeed2", tmp_path / "two", ["distributed.zero_stage=3",
                                                        "distributed.sequence_parallel=2"])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "videogpa train: 2 rank(s) on cpu (DP 1 x SP 2)" in two.stdout
    assert sorted(sp) == sorted(ref) == [1, 2, 3]
    _compare(ref, sp)
    for step in ref:   # the margin is a difference of ~equal errors (~4): compared at 1e-6 of their size
        assert sp[step]["reward_margin"] == pytest.approx(ref[step]["reward_margin"], abs=1e-6 * ref[step]["err_w"])
    assert ref[3]["loss"] != ref[1]["loss"]   # it trained


def _prepare_pairs(run_dir: Path, pairs: int = 4, frames: int = 9, size: int = 32) -> None:
    """Pairs for the tiny diffusers policies: rendered clips (winners) and the same with shuffled frames (losers),
    conditions with a first frame and a random prompt embedding (no text encoder)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from geoforge.engine.data.synthetic import render_clip
    from geoforge.engine.data.video_io import encode_video
    from geoforge.engine.videogpa.io import atomic_write_jsonl
    from geoforge.engine.videogpa.policy import Condition

    rows, rng, g = [], np.random.default_rng(0), torch.Generator().manual_seed(0)
    for i in range(pairs):
        frames_ = render_clip(seed=5, n=i, frames=frames, resolution=size)["frames"]
        key = f"{i:05d}"
        folder = run_dir / "candidates" / key
        folder.mkdir(parents=True)
        encode_video(folder / "cand_00.mp4", frames_, fps=8)
        encode_video(folder / "cand_01.mp4", np.concatenate([frames_[:1], frames_[1:][rng.permutation(frames - 1)]]),
                     fps=8)
        embeds = torch.randn(8, 16, generator=g)
        cond = Condition(key=key, first_frame=torch.from_numpy(frames_[0]).permute(2, 0, 1).float() / 255.0,
                         prompt_embeds=embeds, negative_embeds=torch.zeros_like(embeds))
        save_file(cond.tensors(), str(folder / "condition.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"key": key, "prompt": "", "files": ["cand_00.mp4", "cand_01.mp4"],
                                                      "seeds": [0, 1]}))
        rows.append({"input": key, "winner": f"candidates/{key}/cand_00.mp4", "loser": f"candidates/{key}/cand_01.mp4",
                     "winner_score": 0.01, "loser_score": 0.2, "gap": 0.19, "split": "train"})
    atomic_write_jsonl(run_dir / "pairs.jsonl", rows)


@pytest.mark.parametrize("kind,stage,accum,ckpt", [("wan_ti2v", 2, 1, False), ("cogvideox_i2v", 3, 2, True)],
                         ids=["wan_zero2", "cogvideox_zero3_accum_ckpt"])
def test_diffusers_policy_two_ranks_sp2_match_one_rank(tmp_path, kind, stage, accum, ckpt):
    pytest.importorskip("diffusers")
    from test_diffusers_policies import TINY

    policy = [f"videogpa.policy.kind={kind}", f"videogpa.policy.tiny_config={json.dumps(TINY[kind])}",
              "videogpa.policy.text_encoder=false", "videogpa.policy.max_text_tokens=8", "videogpa.generate.frames=9",
              "videogpa.generate.height=32", "videogpa.generate.width=32", "schedule.steps=2",
              f"distributed.grad_accum={accum}"]
    one, ref = _dpo_run("python", tmp_path / "one", [*policy, "distributed.zero_stage=0"], prepare=_prepare_pairs)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    two, sp = _dpo_run("deepspeed2", tmp_path / "two",
                       [*policy, f"distributed.zero_stage={stage}", f"distributed.activation_checkpointing={ckpt}",
                        "distributed.sequence_parallel=2"], prepare=_prepare_pairs)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert f"videogpa train: 2 rank(s) on cpu (DP 1 x SP 2) | policy {kind}" in two.stdout
    assert sorted(sp) == sorted(ref) == [1, 2]
    _compare(ref, sp)
    assert ref[2]["err_w"] != ref[2]["ref_err_w"]   # the first step moved the adapters


@pytest.mark.parametrize("overrides,message", [
    (["distributed.sequence_parallel=3"], "distributed.sequence_parallel: 3 does not divide model.num_heads=4"),
    (["distributed.sequence_parallel=2", "data.frames=5", "data.resolution=12"],
     r"does not divide the 45 tokens of a policy clip \(videogpa.generate.frames"),
    (["distributed.sequence_parallel=2", "videogpa.policy.kind=wan_ti2v",
      "videogpa.policy.tiny_config={transformer: {num_attention_heads: 3}, vae: {}}"],
     "does not divide videogpa.policy.tiny_config.transformer.num_attention_heads=3"),
])
def test_bad_settings_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("videogpa_tiny", overrides)


HEADS_3 = {"num_attention_heads": 3, "attention_head_dim": 8}


@pytest.mark.parametrize("kind,geometry,transformer,message", [
    ("wan_ti2v", ["videogpa.generate.frames=9", "videogpa.generate.height=16", "videogpa.generate.width=16"], {},
     r"does not divide the 3 video tokens of a training clip of the wan_ti2v policy \(videogpa.generate"),
    ("cogvideox_i2v", ["videogpa.generate.frames=9", "videogpa.generate.height=16", "videogpa.generate.width=16"], {},
     r"does not divide the 3 video tokens of a training clip of the cogvideox_i2v policy"),
    ("wan_ti2v", ["videogpa.generate.frames=9", "videogpa.generate.height=32", "videogpa.generate.width=32"], HEADS_3,
     r"does not divide the 3 attention heads of the wan_ti2v policy \(num_attention_heads of the transformer"),
], ids=["wan_tokens", "cogvideox_tokens", "wan_heads"])
def test_diffusers_policy_checked_when_built(kind, geometry, transformer, message):
    """What the recipe cannot know (a hub checkpoint's heads, the VAE's token grid): checked on the built
    policy (``engine.videogpa.pipeline`` does it before any stage runs)."""
    pytest.importorskip("diffusers")
    from test_diffusers_policies import TINY

    from geoforge.engine.videogpa.config import PolicyConfig
    from geoforge.engine.videogpa.policy import build_policy
    from geoforge.engine.videogpa.policy_base import check_sequence_parallel

    recipe = load_recipe("videogpa_tiny", geometry)
    tiny = {**TINY[kind], "transformer": {**TINY[kind]["transformer"], **transformer}}
    recipe.videogpa.policy = PolicyConfig(kind=kind, tiny_config=tiny, text_encoder=False, max_text_tokens=8)
    policy = build_policy(recipe)
    check_sequence_parallel(policy, 1)
    with pytest.raises(ConfigError, match=message):
        check_sequence_parallel(policy, 2)
