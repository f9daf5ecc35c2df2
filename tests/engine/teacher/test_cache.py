"""Teacher cache: it holds exactly the windows the data pipeline draws, its features are the live teacher's
rounded to bf16 (so the loss of a batch is the live path's), and a cache that does not fit the recipe is
refused with a message naming the recipe key."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from geoforge.engine.config import load_recipe
from geoforge.engine.data.builder import build_loader
from geoforge.engine.distributed import World
from geoforge.engine.models.dit import VideoDiT
from geoforge.engine.objectives.video_loss import VideoDiffusionLoss, sample_noise
from geoforge.engine.teacher.builder import build_teacher
from geoforge.engine.teacher.cache import build_cache, main
from geoforge.engine.teacher.live import LiveTeacher
from geoforge.engine.teacher.reader import MANIFEST, TeacherCache, TeacherCacheError

TINY = ["model.hidden_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
        "data.resolution=32", "data.frames=4", "data.synthetic_clips=8", "data.synthetic_frames=6",
        "data.batch_size=2", "gf.dit_block=1", "gf.projector_hidden=32", "gf.scale_hidden=16",
        "teacher.resolution=28", "teacher.vggt.config.aggregator.embed_dim=32", "teacher.vggt.config.aggregator.img_size=28"]
WORLD = World(rank=0, local_rank=0, size=1, local_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("gfcache")
    overrides = [*TINY, f"data.root={base / 'data'}"]
    recipe = load_recipe("gf_tiny", overrides)
    manifest = build_cache(recipe, base / "cache", epochs=2, log=lambda s: None)
    return base, overrides, manifest


def _recipe(setup, *extra):
    base, overrides, _ = setup
    return load_recipe("gf_tiny", [*overrides, f"teacher.cache={base / 'cache'}", *extra])


def _cache(recipe, directory=None):
    return TeacherCache(directory or recipe.teacher.cache, recipe.teacher, recipe.data, recipe.seed)


def _batches(recipe, n):
    it = iter(build_loader(recipe.data, WORLD, recipe.seed))
    return [{k: v for k, v in next(it).items() if torch.is_tensor(v)} for _ in range(n)]


def test_manifest_describes_the_cache(setup):
    base, _, manifest = setup
    on_disk = json.loads((base / "cache" / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["teacher"]["vggt"]["layers"] == [0, 1] and manifest["teacher"]["vggt"]["size"] == [28, 28]
    assert manifest["teacher_frames"] == 4 and manifest["data"]["frames"] == 4
    assert manifest["keys"] == {k: {"shape": [4, 2, 2, 64], "dtype": "bfloat16"} for k in ("vggt_L0", "vggt_L1")}
    # 8 clips x 3 possible starts at most; 2 epochs of 8 draws each
    assert 1 <= manifest["windows"]["count"] <= 16 and manifest["windows"]["samples_read"] == 16
    assert all((base / "cache" / s).is_file() for s in manifest["shards"])


def test_cache_serves_every_window_of_the_pipeline_with_the_live_features(setup):
    """The loader's batches of epochs 0-1 (8 clips / 2 per batch = 4 steps per epoch) are all cached, and
    the cached features are the live teacher's rounded to bf16, bit for bit."""
    recipe = _recipe(setup)
    cache = build_teacher(recipe.teacher, recipe.data, seed=recipe.seed)
    live = build_teacher(dataclasses.replace(recipe.teacher, cache=None))
    assert isinstance(cache, TeacherCache) and isinstance(live, LiveTeacher)
    assert cache.dims == live.dims
    for batch in _batches(recipe, 8):
        cached, fresh = cache(batch), live(batch)
        assert cached.keys() == fresh.keys()
        for k in cached:
            assert cached[k].dtype == torch.float32
            assert torch.equal(cached[k], fresh[k].bfloat16().float()), k


def test_cache_path_gives_the_live_loss(setup):
    """Same module, batch and noise: the loss with cached targets equals the loss with the live targets
    rounded to bf16 exactly, and the full-precision live loss to bf16 accuracy."""
    recipe = _recipe(setup)
    cache, live = _cache(recipe), LiveTeacher(recipe.teacher)
    torch.manual_seed(0)
    module = VideoDiffusionLoss(VideoDiT(recipe.model), recipe.objective, recipe.gf, cache.dims, "cpu")
    batch = _batches(recipe, 1)[0]
    noise = sample_noise(recipe.objective, recipe.model.cond_dropout, batch["frames"].shape, batch["index"], 0, 0)
    fresh = live(batch)
    from_cache = module({**batch, **cache(batch)}, noise)
    from_live_bf16 = module({**batch, **{k: v.bfloat16().float() for k, v in fresh.items()}}, noise)
    from_live = module({**batch, **fresh}, noise)
    for k in ("loss", "fm", "gf_angular", "gf_scale"):
        assert from_cache[k].item() == from_live_bf16[k].item(), k
        assert from_cache[k].item() == pytest.approx(from_live[k].item(), rel=5e-3), k


@pytest.mark.parametrize("override,key", [
    ("teacher.resolution=56", "teacher.resolution"),
    ("teacher.vggt.init_seed=1", "teacher.vggt"),
    ("teacher.layers=[0,-1]", "teacher.layers: layers [-1] are not in the cache"),
    ("teacher.frames=2", "teacher.frames"),
    ("data.resolution=40", "data.resolution"),
    ("seed=3", "seed"),
])
def test_mismatched_cache_is_refused_naming_the_key(setup, override, key):
    recipe = _recipe(setup, override)
    with pytest.raises(TeacherCacheError, match=re.escape(key)):
        _cache(recipe)


def test_recipe_may_use_a_subset_of_the_cached_layers(setup):
    recipe = _recipe(setup, "teacher.layers=[1]")
    cache = _cache(recipe)
    batch = _batches(recipe, 1)[0]
    assert set(cache(batch)) == {"teacher.vggt_L1"}


def test_missing_window_and_incomplete_cache(setup, tmp_path):
    recipe = _recipe(setup)
    cache = _cache(recipe)
    batch = _batches(recipe, 1)[0]
    batch["frame_indices"] = batch["frame_indices"] + 100
    with pytest.raises(TeacherCacheError, match="has no window for dataset index"):
        cache(batch)
    recipe = _recipe(setup, f"teacher.cache={tmp_path}")
    with pytest.raises(TeacherCacheError, match="not a complete teacher cache"):
        _cache(recipe, tmp_path)


def test_cli_writes_once_and_refuses_to_overwrite(setup, tmp_path, capsys):
    _, overrides, _ = setup
    args = ["--recipe", "gf_tiny", "--out", str(tmp_path / "c"), "--max-windows", "3", "--epochs", "1"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["windows"]["count"] == 3
    assert main(args) == 1
    assert "already holds a teacher cache" in capsys.readouterr().err
    # samples carry their flip flag, so flipped windows are cached too (keyed by index, start, flip)
    assert main([*args, "--set", "data.hflip_prob=0.5", "--overwrite"]) == 0
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["data"]["hflip_prob"] == 0.5


def test_minecraft_clips_are_cached_and_served(tmp_path):
    """gf_minecraft's data (DFoT's Minecraft layout, here synthetic): the cache lists its clips, holds the
    windows its pipeline draws, serves them with the live teacher's features, and is refused once the clip
    set changes."""
    from geoforge.engine.data.minecraft import write_minecraft_clips

    write_minecraft_clips(tmp_path / "mc" / "training", clips=4, frames=10, resolution=32, seed=0)
    overrides = [*TINY, "data.kind=minecraft", f"data.root={tmp_path / 'mc'}", "data.frame_skip=2",
                 "model.action_dim=8", "model.camera=none"]
    recipe = load_recipe("gf_tiny", overrides)
    manifest = build_cache(recipe, tmp_path / "cache", epochs=2, log=lambda s: None)
    assert manifest["data"]["kind"] == "minecraft" and manifest["data"]["clips"] == 4
    assert manifest["windows"]["samples_read"] == 8
    recipe = load_recipe("gf_tiny", [*overrides, f"teacher.cache={tmp_path / 'cache'}"])
    cache, live = _cache(recipe), LiveTeacher(recipe.teacher)
    for batch in _batches(recipe, 4):   # epochs 0-1: 4 clips / 2 per batch
        assert "actions" in batch
        cached, fresh = cache(batch), live(batch)
        for k in cached:
            assert torch.equal(cached[k], fresh[k].bfloat16().float()), k
    write_minecraft_clips(tmp_path / "mc" / "training", clips=5, frames=10, resolution=32, seed=0)
    with pytest.raises(TeacherCacheError, match="data.root"):
        _cache(recipe)


def test_worker_and_in_process_batches_give_the_teacher_the_same_bits(setup):
    """Batches from a DataLoader worker and from the main process have the same values and memory layout,
    so the teacher (and a cache built either way) gives bit-identical features."""
    live = LiveTeacher(_recipe(setup).teacher)
    inline, worker = (_batches(_recipe(setup, f"data.num_workers={w}"), 1)[0] for w in (0, 1))
    assert inline["frames"].stride() == worker["frames"].stride()
    a, b = live(inline), live(worker)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_windows_one_epoch_cache_serves_every_epoch(setup, tmp_path):
    """data.fixed_windows: every epoch draws epoch 0's window (and flip) of each clip, so the default cache
    is one epoch, one window per clip, and serves a run of any length; a cache of moving windows does not
    fit such a recipe (and the other way round), named by the recipe key."""
    base, overrides, _ = setup
    fixed = [*overrides, "data.fixed_windows=true", "data.hflip_prob=0.5"]
    manifest = build_cache(load_recipe("gf_tiny", fixed), tmp_path / "fixed", log=lambda s: None)
    assert manifest["windows"]["epochs"] == 1 and manifest["windows"]["count"] == 8   # 8 clips
    recipe = load_recipe("gf_tiny", [*fixed, f"teacher.cache={tmp_path / 'fixed'}"])
    cache = _cache(recipe)
    batches = _batches(recipe, 12)   # 3 epochs of 4 batches
    for batch in batches:
        cache(batch)   # raises if a window is missing
    windows = [{(int(i), int(f[0]), bool(fl)) for b in batches[e * 4:(e + 1) * 4]
                for i, f, fl in zip(b["index"], b["frame_indices"], b["flip"])} for e in range(3)]
    assert windows[0] == windows[1] == windows[2] and len(windows[0]) == 8
    moving = load_recipe("gf_tiny", [*overrides, f"teacher.cache={tmp_path / 'fixed'}", "data.hflip_prob=0.5"])
    with pytest.raises(TeacherCacheError, match="data.fixed_windows"):
        _cache(moving)
    with pytest.raises(TeacherCacheError, match="data.fixed_windows"):   # the setup's cache: moving windows
        _cache(load_recipe("gf_tiny", [*fixed, f"teacher.cache={base / 'cache'}"]))


def test_fixed_windows_in_minecraft_clips(tmp_path):
    from geoforge.engine.data.minecraft import MinecraftClips, write_minecraft_clips

    write_minecraft_clips(tmp_path / "training", clips=3, frames=12, resolution=16, seed=0)

    def starts(fixed: bool, epoch: int) -> list[int]:
        ds = MinecraftClips(tmp_path, num_frames=2, frame_skip=2, resolution=16, fixed_windows=fixed)
        ds.set_epoch(epoch)
        return [int(ds[i]["frame_indices"][0]) for i in range(3)]

    assert starts(True, 0) == starts(True, 1) == starts(True, 5) == starts(False, 0)
    assert any(starts(False, e) != starts(False, 0) for e in (1, 2, 3))
