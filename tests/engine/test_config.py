"""Recipe loading: typed values, overrides, errors that name the key, cross-section checks."""
from pathlib import Path

import pytest
import yaml

from geoforge.engine.config import RECIPES_DIR, ConfigError, Recipe, load_recipe, recipe_to_yaml
from geoforge.engine.schema import build, to_dict


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path.stem)
    assert recipe.name == path.stem


def test_overrides_are_typed(tmp_path):
    r = load_recipe(write(tmp_path, {}), ["optimizer.lr=1e-4", "schedule.steps=7", "distributed.precision=bf16",
                                        "optimizer.betas=[0.8, 0.95]", "model.camera=plucker"])
    assert r.optimizer.lr == 1e-4 and isinstance(r.optimizer.lr, float)
    assert r.schedule.steps == 7 and r.distributed.precision == "bf16"
    assert r.optimizer.betas == (0.8, 0.95)
    assert r.model.camera == "plucker"


def test_yaml_exponent_floats_are_numbers(tmp_path):
    r = load_recipe(write(tmp_path, {"optimizer": {"lr": "3e-4"}}))
    assert r.optimizer.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("data, key", [
    ({"optimizer": {"lrr": 1.0}}, "optimizer.lrr"),
    ({"modle": {}}, ": modle: unknown key"),
    ({"model": {"hiden_dim": 3}}, "model.hiden_dim"),
])
def test_unknown_key_is_named_with_a_suggestion(tmp_path, data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_recipe(write(tmp_path, data))
    assert "did you mean" in str(err.value) or "known keys" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("schedule.steps=ten", "schedule.steps"),
    ("schedule.steps=1.5", "schedule.steps"),
    ("distributed.precision=fp8", "distributed.precision"),
    ("distributed.bf16=true", "distributed.bf16: this key moved to distributed.precision"),
    ("schedule.decay=linear", "schedule.decay"),
    ("distributed.zero_stage=4", "distributed.zero_stage"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("optimizer.lr.x=1", "optimizer.lr"),
])
def test_wrong_type_or_value_is_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(write(tmp_path, {}), [override])


def test_impossible_combinations_fail_before_compute(tmp_path):
    with pytest.raises(ConfigError, match="data.resolution"):
        load_recipe(write(tmp_path, {"model": {"patch_size": 8}, "data": {"resolution": 60}}))
    with pytest.raises(ConfigError, match="objective.context_frames"):
        load_recipe(write(tmp_path, {"data": {"frames": 4}, "objective": {"context_frames": 4}}))
    with pytest.raises(ConfigError, match=r"schedule\.warmup: must be >= 0, got -1"):
        load_recipe(write(tmp_path, {"schedule": {"steps": 5, "warmup": -1}}))
    with pytest.raises(ConfigError, match="num_heads"):
        load_recipe(write(tmp_path, {"model": {"hidden_dim": 100, "num_heads": 3}}))
    with pytest.raises(ConfigError, match="logging.sample_steps"):   # DFoT's DDIM grid has dfot.timesteps levels
        load_recipe("uvit3d_tiny", ["logging.sample_steps=2000"])
    with pytest.raises(ConfigError, match=r"distributed\.compile: not with zero_stage 3"):
        load_recipe(write(tmp_path, {"distributed": {"compile": True, "zero_stage": 3}}))
    with pytest.raises(ConfigError, match=r"distributed\.compile: the U-ViT3D's blocks are not compiled yet"):
        load_recipe("uvit3d_tiny", ["distributed.compile=true"])


def test_uvit3d_recipes_may_validate_periodically():
    """Periodic validation samples the U-ViT3D through the v-prediction adapter: no longer refused."""
    assert load_recipe("uvit3d_tiny", ["logging.validate_every=10"]).logging.validate_every == 10


# The validate contract (engine/schema.py): every section's checks raise ConfigError naming the full key
# path, whichever module owns the section, and a recipe error is never a bare ValueError.
@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size: must be >= 1"),
    ("model.hidden_dim=0", "model.hidden_dim: must be >= 1"),
    ("model.size=huge", "model.size: must be one of"),
    ("model.cond_dropout=1.5", "model.cond_dropout: must be in [0, 1)"),
    ("objective.logit_std=0", "objective.logit_std: must be > 0"),
    ("dfot.shift=0", "dfot.shift: must be > 0"),
    ("gf.dit_block=0", "gf.dit_block: 1-based block index"),
    ("gf.angular_weight=-1", "gf.angular_weight: must be a finite number >= 0"),
    ("teacher.resolution=15", "teacher.resolution: must be a positive multiple of 14"),
    ("teacher.vggt.pretrained=null", "teacher.vggt.pretrained / config: give pretrained"),
    ("teacher.dino.resolution=13", "teacher.dino.resolution: must be a positive multiple of 14"),
    ("videogpa.dpo.beta=0", "videogpa.dpo.beta: must be > 0"),
    ("videogpa.lora.dropout=1", "videogpa.lora.dropout: must be in [0, 1)"),
])
def test_every_section_names_the_full_key_path(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, {}), [override])
    assert f": {message}" in str(err.value)


def test_uvit3d_section_errors_name_the_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r": model\.uvit3d\.noise_freq_dim: must be even"):
        load_recipe("uvit3d_tiny", ["model.uvit3d.noise_freq_dim=3"])


def _config_classes(cls: type, seen: dict[str, type]) -> dict[str, type]:
    """Every dataclass reachable from ``cls`` through its fields' annotations."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        for tp in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(tp) and tp.__name__ not in seen:
                seen[tp.__name__] = tp
                _config_classes(tp, seen)
    return seen


def test_every_validate_returns_none():
    """One contract: ``validate()`` raises or returns nothing; resolved values come from named methods."""
    from geoforge.engine.sampling import SamplerConfig

    classes = {"Recipe": Recipe, "SamplerConfig": SamplerConfig}
    for root in (Recipe, SamplerConfig):
        _config_classes(root, classes)
    assert {"ModelConfig", "UViT3DConfig", "DFoTDiffusionConfig", "GFConfig", "TeacherConfig", "TeacherSource",
            "DinoConfig", "DinoTermConfig", "VideoGPAConfig", "Guidance"} <= set(classes)
    for name, cls in classes.items():
        if hasattr(cls, "validate"):
            try:
                result = cls().validate()
            except ConfigError:   # a default that needs a value (ScoreConfig's LPIPS weights)
                continue
            assert result is None, name


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError, match="dfot_tiny"):
        load_recipe("no_such_recipe")


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe("dfot_tiny", ["optimizer.lr=2e-4"])
    again = build(Recipe, yaml.safe_load(recipe_to_yaml(r)))
    assert to_dict(again) == to_dict(r)


def test_lr_schedule():
    r = load_recipe("dfot_tiny", ["schedule.steps=100", "schedule.warmup=10", "schedule.decay=cosine",
                                  "schedule.min_lr_ratio=0.1"])
    s = r.schedule
    assert s.lr_factor(0) == pytest.approx(0.1) and s.lr_factor(9) == pytest.approx(1.0)
    assert s.lr_factor(10) == pytest.approx(1.0)
    assert s.lr_factor(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.lr_factor(100) == pytest.approx(0.1)


@pytest.mark.parametrize("decay", ["constant", "cosine"])
def test_warmup_longer_than_the_run(tmp_path, decay):
    """Geometry Forcing's run: 10k warm-up steps, ~1,500 optimizer steps. Allowed: the rate rises by (s + 1) / warmup
    at every step of the run, never reaches its peak, and the decay never starts; the run is warned."""
    r = load_recipe(write(tmp_path, {"optimizer": {"lr": 8e-6},
                                     "schedule": {"steps": 1500, "warmup": 10000, "decay": decay}}))
    s = r.schedule
    assert [s.lr_factor(i) for i in range(s.steps)] == pytest.approx([(i + 1) / 10000 for i in range(1500)],
                                                                     rel=1e-12)
    assert max(s.lr_factor(i) for i in range(s.steps)) == s.lr_factor(1499) == pytest.approx(0.15)
    assert s.never_peaks(r.optimizer.lr) == ("the learning rate never reaches its peak: warm-up 10000 > steps 1500, "
                                             "last LR = 1.2e-06 (schedule.warmup; peak optimizer.lr = 8e-06)")
    # warmup == steps: the last step reaches the peak, no warning; the paper recipe keeps GF's schedule
    assert load_recipe("dfot_tiny", ["schedule.steps=10", "schedule.warmup=10"]).schedule.never_peaks(1e-3) is None
    paper = load_recipe("gf_re10k_paper").schedule
    assert (paper.warmup, paper.steps, paper.decay) == (10000, 1500, "constant")


def test_velocity_prediction_with_a_narrow_pixel_model_is_refused(tmp_path):
    narrow = {"model": {"hidden_dim": 128, "num_heads": 4, "patch_size": 8}}
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, narrow))
    for key in ("model.hidden_dim", "model.patch_size", "objective.prediction", "allow_patch_bottleneck"):
        assert key in str(err.value)
    assert load_recipe(write(tmp_path, {**narrow, "objective": {"prediction": "x0"}})).objective.prediction == "x0"
    assert load_recipe(write(tmp_path, {**narrow, "objective": {"allow_patch_bottleneck": True}}))
    wide = {"model": {"hidden_dim": 768, "num_heads": 4, "patch_size": 8}}   # 768 = 4 x 192
    assert load_recipe(write(tmp_path, wide)).model.hidden_dim == 768
    with pytest.raises(ConfigError, match="objective.prediction"):
        load_recipe(write(tmp_path, {**narrow, "objective": {"prediction": "eps"}}))
