"""Sequence parallelism (DeepSpeed-Ulysses, ``distributed.sequence_parallel``) on 2 CPU ranks over gloo.

- gradients: one DiT + GF loss evaluated on whole clips and on token slices (2 ranks) gives the same loss
  parts and the same gradients (slices' gradients averaged over the ranks, as DeepSpeed does), 1e-5
  relative, for per-frame and per-token (camera) conditioning, frame-causal attention with activation
  checkpointing, a slice boundary inside a token frame, and GF's released form (``models/sp_worker.py``);
- training: ``deepspeed --num_gpus 2 engine/train.py --set distributed.sequence_parallel=2`` logs the
  1-rank run's losses (1e-5 relative) under ZeRO-2, ZeRO-3 with gradient accumulation, and for GF with
  its live teacher;
- DFoT's U-ViT3D (``model.arch: uvit3d``, its transformer levels' tokens split, the ResBlock levels whole on every
  rank): the same loss parts and gradients as whole clips (``models/sp_uvit_worker.py``: a GF map computed on token
  shards and a replicated one, the folded pose embedding with activation checkpointing, GF's released form on a
  gathered map, slices of 1.5 token frames; with dropout, different masks per slice, replayed under
  checkpointing), and ``deepspeed --num_gpus 2 engine/train.py --recipe uvit3d_tiny
  --set distributed.sequence_parallel=2`` logs the 1-rank losses (its live VGGT teacher under ZeRO-2; the oracle
  teacher aligning a ResBlock level under ZeRO-3 with gradient accumulation);
- bad settings fail at load naming the key.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from geoforge.engine.config import ConfigError, load_recipe
from processes import subprocess_env
from test_train import ROOT, TINY, _losses, _train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", [
    {"frames": 4, "resolution": 12, "patch": 4, "camera": "rays"},                  # per-token conditioning
    {"frames": 2, "resolution": 12, "patch": 4, "attention": "frame_causal", "ckpt": True},
    {"frames": 3, "resolution": 8, "patch": 4},                                     # 12 tokens: slice of 1.5 frames
    {"frames": 2, "resolution": 16, "patch": 4, "released": True},                  # GF as released: gathered block
], ids=["camera", "frame_causal_ckpt", "unaligned_slices", "as_released"])
def test_sharded_loss_and_gradients_equal_whole_clip(case):
    result = _worker("tests/engine/models/sp_worker.py", case)
    assert result["missing"] == [] and result["params"] > 50
    assert result["parts"]["gf_scale"] > 0 and result["parts"]["fm"] > 0
    assert result["part_err"] < 1e-5, result
    assert result["grad_err"] < 1e-5, result


def _worker(script: str, case: dict) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(32500 + os.getpid() % 1000), script, json.dumps(case)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))


@pytest.mark.parametrize("case", [
    # GF on the level-2 map (token shards), REPA on the level-0 map (whole, every rank); 48 and 12 tokens per clip
    # at the transformer levels: slices of 1.5 token frames
    {"frames": 3, "resolution": 32, "gf_map": 3, "dino_map": 7},
    # the folded pose embedding, activation checkpointing, GF on the middle level, REPA on level 1 (other widths)
    {"frames": 4, "resolution": 16, "gf_map": 4, "dino_map": 2, "fold": "always", "ckpt": True},
    {"frames": 2, "resolution": 32, "gf_map": 3, "released": True},   # GF as released: the gathered level-2 map
], ids=["shard_and_whole_maps", "folded_ckpt_mid", "as_released"])
def test_uvit3d_sharded_loss_and_gradients_equal_whole_clip(case):
    result = _worker("tests/engine/models/sp_uvit_worker.py", case)
    assert result["missing"] == [] and result["params"] > 100
    assert result["parts"]["gf_scale"] > 0 and result["parts"]["fm"] > 0
    sharded = {int(k): v for k, v in result["sharded"].items()}
    assert sharded[case["gf_map"]] is True   # a transformer level's map arrives as this rank's slice
    if "dino_map" in case:
        assert sharded[case["dino_map"]] is False
    assert result["part_err"] < 1e-5, result
    assert result["grad_err"] < 1e-5, result


def test_uvit3d_dropout_masks_differ_between_slices_and_replay_under_checkpointing():
    """The ranks of a group share one RNG stream; their slices of a transformer level must not drop the same
    positions (DFoT's RE10K model has dropout 0.1 there), and checkpointed blocks must replay their masks."""
    result = _worker("tests/engine/models/sp_uvit_worker.py",
                     {"frames": 4, "resolution": 32, "gf_map": 3, "dropout": 0.3})
    assert result["masks_differ"] and result["replay"], result
    assert 0.25 < result["drop_fraction"] < 0.35
    assert result["ckpt_grad_err"] < 1e-6


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic") / "set"


# Runs compared with each other at 1e-5 relative: fp32, set explicitly (bf16 autocast moves the 5th digit).
EXACT = "distributed.precision=fp32"
SP_COMMON = ["data.batch_size=4", "schedule.steps=4", "model.num_heads=4", EXACT]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, data_root):
    curves = {}
    for accum in (1, 2):
        run = tmp_path_factory.mktemp("one") / "run"
        proc = _train("python", run, data_root, [*SP_COMMON, "distributed.zero_stage=0",
                                                 f"distributed.grad_accum={accum}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[accum] = _losses(run)
    return curves


@pytest.mark.parametrize("stage,accum", [(2, 1), (3, 2)])
def test_two_ranks_sp2_match_one_rank(tmp_path, data_root, one_rank, stage, accum):
    proc = _train("deepspeed2", tmp_path / "run", data_root,
                  [*SP_COMMON, "distributed.sequence_parallel=2", f"distributed.zero_stage={stage}",
                   f"distributed.grad_accum={accum}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "(DP 1 x SP 2)" in proc.stdout
    sp = _losses(tmp_path / "run")
    assert sorted(sp) == sorted(one_rank[accum])
    for step, loss in one_rank[accum].items():
        assert sp[step] == pytest.approx(loss, rel=1e-5), (step, sp, one_rank[accum])


GF = ["data.resolution=32", "data.synthetic_clips=8", "data.synthetic_frames=8", "data.batch_size=2",
      "schedule.steps=3", "schedule.warmup=1", "logging.sample_steps=2", "model.depth=3", "gf.dit_block=2",
      "data.num_workers=0", "logging.every=1",
      "distributed.zero_stage=1", EXACT]


def test_gf_with_teacher_sp2_matches_one_rank(tmp_path):
    data = tmp_path / "data"

    def run(launcher, name, extra):
        args = ["engine/train.py", "--recipe", "gf_tiny", "--run-dir", str(tmp_path / name)]
        for o in [*GF, f"data.root={data}", *extra]:
            args += ["--set", o]
        cmd = ([sys.executable, *args] if launcher == "python" else
               [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(33500 + os.getpid() % 1000), *args])
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "loss" in r}

    one = run("python", "one", [])
    two = run("deepspeed2", "two", ["distributed.sequence_parallel=2"])
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in one:
        for part in ("loss", "fm", "gf_angular", "gf_scale"):
            assert two[step][part] == pytest.approx(one[step][part], rel=1e-5), (step, part, one, two)


@pytest.mark.parametrize("override,message", [
    ("distributed.sequence_parallel=3", "distributed.sequence_parallel: 3 does not divide model.num_heads=4"),
    ("distributed.sequence_parallel=0", "distributed.sequence_parallel: must be >= 1"),
])
def test_bad_heads_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("dfot_tiny", [override])


def test_bad_tokens_and_partial_gf_fail_at_load():
    # 2 heads split over 2, but 3 frames x (24 / 8)^2 = 27 tokens do not
    with pytest.raises(ConfigError, match=r"does not divide the 27 tokens of a clip \(data.frames"):
        load_recipe("dfot_tiny", ["distributed.sequence_parallel=2", "data.frames=3", "data.resolution=24",
                                  "model.patch_size=8"])
    with pytest.raises(ConfigError, match="teacher.frames: 4 aligns part of the clip"):
        load_recipe("gf_tiny", ["distributed.sequence_parallel=2", "teacher.frames=4"])
    # VideoGPA recipes: the policy's heads and tokens (tests/engine/videogpa/test_dpo_sequence_parallel.py)
    load_recipe("videogpa_tiny", ["distributed.sequence_parallel=2"])


# uvit3d_tiny made small; the data set of TINY (shared with the DiT runs: 16 clips of 6 frames at 32 px)
UVIT = ["data.frames=4", "data.synthetic_clips=16", "data.synthetic_frames=6", "data.batch_size=2", "schedule.steps=3",
        "schedule.warmup=1", "logging.every=1", "logging.sample_steps=2", "optimizer.lr=1e-3",
        "model.uvit3d.num_updown_blocks=[1, 1, 1]", "model.uvit3d.num_mid_blocks=1", "gf.projector_hidden=32",
        "gf.scale_hidden=16", "teacher.vggt.config.aggregator.embed_dim=32", EXACT]


@pytest.mark.parametrize("teacher,stage,accum", [
    ("vggt", 2, 1),     # the recipe's tiny live VGGT, GF on the level-2 map: aligned on each rank's token shard
    ("oracle", 3, 2),   # the oracle teacher, GF on the level-1 ResBlock map: aligned whole on every rank
])
def test_uvit3d_two_ranks_sp2_match_one_rank(tmp_path, data_root, teacher, stage, accum):
    def run(launcher: str, name: str, extra: list[str]) -> dict[int, dict]:
        args = ["engine/train.py", "--recipe", "uvit3d_tiny", "--run-dir", str(tmp_path / name)]
        for o in [*UVIT, f"data.root={data_root}", f"distributed.grad_accum={accum}",
                  *(["teacher.kind=oracle", "gf.dit_block=2"] if teacher == "oracle" else []), *extra]:
            args += ["--set", o]
        cmd = ([sys.executable, *args] if launcher == "python" else
               [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(35500 + os.getpid() % 1000), *args])
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        if launcher != "python":
            assert "(DP 1 x SP 2)" in proc.stdout
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "loss" in r}

    one = run("python", "one", ["distributed.zero_stage=0"])
    two = run("deepspeed2", "two", ["distributed.sequence_parallel=2", f"distributed.zero_stage={stage}"])
    assert sorted(two) == sorted(one) == [1, 2, 3]
    assert one[3]["loss"] != one[1]["loss"]   # it trained
    for step in one:
        for part in ("loss", "fm", "gf_angular", "gf_scale"):
            assert two[step][part] == pytest.approx(one[step][part], rel=1e-5), (step, part, one, two)


def test_uvit3d_bad_settings_fail_at_load():
    with pytest.raises(ConfigError, match="distributed.sequence_parallel: 4 does not divide model.uvit3d.num_heads=2"):
        load_recipe("uvit3d_tiny", ["distributed.sequence_parallel=4"])
    # 3 frames x (16 / (2 x 8))^2: the middle level's 3 tokens do not split over 2 ranks
    with pytest.raises(ConfigError, match=r"does not divide the 3 tokens of the U-ViT3D's transformer level 3"):
        load_recipe("uvit3d_tiny", ["distributed.sequence_parallel=2", "data.frames=3", "data.resolution=16"])
    # GF on the level-2 map is computed per token shard: it needs the teacher on every frame; a ResBlock map does not
    with pytest.raises(ConfigError, match="teacher.frames: 4 aligns part of the clip"):
        load_recipe("uvit3d_tiny", ["distributed.sequence_parallel=2", "teacher.frames=4"])
    load_recipe("uvit3d_tiny", ["distributed.sequence_parallel=2", "teacher.frames=4", "gf.dit_block=2"])
    with pytest.raises(ConfigError, match="model.uvit3d.block_types has no TransformerBlock level"):
        load_recipe("uvit3d_tiny", ["distributed.sequence_parallel=2", "model.uvit3d.block_types=[ResBlock, ResBlock, "
                                    "ResBlock, ResBlock]"])


def test_world_not_divisible_fails_naming_the_key(tmp_path, data_root):
    proc = _train("python", tmp_path / "run", data_root, [*SP_COMMON, "distributed.sequence_parallel=2"])
    assert proc.returncode == 2
    assert "distributed.sequence_parallel: 2 does not divide the world of 1 ranks" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_two_nodes_without_ssh_match_one_rank(tmp_path, data_root):
    """DeepSpeed's launcher with a 2-host hostfile and ``--no_ssh``: one launcher per "node" (both on this
    machine, ``--node_rank`` 0 and 1, master 127.0.0.1), one rank each; ZeRO-2 over the 2-node world logs
    the same losses as one rank with the same global batch."""
    common = ["data.batch_size=2", "schedule.steps=3", "distributed.zero_stage=2"]
    one = _train("python", tmp_path / "one", data_root, ["data.batch_size=4", "schedule.steps=3",
                                                         "distributed.zero_stage=0"])
    assert one.returncode == 0, one.stderr[-3000:]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    args = ["engine/train.py", "--recipe", "dfot_tiny", "--run-dir", str(tmp_path / "two")]
    for o in [*TINY, f"data.root={data_root}", *common]:
        args += ["--set", o]
    port = str(34500 + os.getpid() % 1000)
    procs = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                               "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                               "--master_port", port, *args], cwd=ROOT, env=subprocess_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for node in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outs[1]
    assert "2 rank(s) on cpu (DP 2 x SP 1)" in outs[0]
    two, ref = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == sorted(ref) == [1, 2, 3]
    for step in ref:
        assert two[step] == pytest.approx(ref[step], rel=1e-5)
