"""Recipe loading: typed values, overrides, errors that name the key, cross-section checks."""
from pathlib import Path

import pytest
import yaml

from engine.config import RECIPES_DIR, ConfigError, Recipe, load_recipe, recipe_to_yaml
from engine.schema import build, to_dict


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path.stem)
    assert recipe.name == path.stem


def test_overrides_are_typed(tmp_path):
    r = load_recipe(write(tmp_path, {}), ["optimizer.lr=1e-4", "schedule.steps=7", "distributed.bf16=true",
                                        "optimizer.betas=[0.8, 0.95]", "model.camera=plucker"])
    assert r.optimizer.lr == 1e-4 and isinstance(r.optimizer.lr, float)
    assert r.schedule.steps == 7 and r.distributed.bf16 is True
    assert r.optimizer.betas == (0.8, 0.95)
    assert r.model.camera == "plucker"


def test_yaml_exponent_floats_are_numbers(tmp_path):
    r = load_recipe(write(tmp_path, {"optimizer": {"lr": "3e-4"}}))
    assert r.optimizer.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("data, key", [
    ({"optimizer": {"lrr": 1.0}}, "optimizer.lrr"),
    ({"modle": {}}, "recipe.modle"),
    ({"model": {"hiden_dim": 3}}, "model.hiden_dim"),
])
def test_unknown_key_is_named_with_a_suggestion(tmp_path, data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_recipe(write(tmp_path, data))
    assert "did you mean" in str(err.value) or "known keys" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("schedule.steps=ten", "schedule.steps"),
    ("schedule.steps=1.5", "schedule.steps"),
    ("distributed.bf16=3", "distributed.bf16"),
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
    with pytest.raises(ConfigError, match="schedule.warmup"):
        load_recipe(write(tmp_path, {"schedule": {"steps": 5, "warmup": 6}}))
    with pytest.raises(ConfigError, match="num_heads"):
        load_recipe(write(tmp_path, {"model": {"hidden_dim": 100, "num_heads": 3}}))
    with pytest.raises(ConfigError, match="logging.sample_steps"):   # DFoT's DDIM grid has dfot.timesteps levels
        load_recipe("uvit3d_tiny", ["logging.sample_steps=2000"])


def test_uvit3d_recipes_may_validate_periodically():
    """Periodic validation samples the U-ViT3D through the v-prediction adapter: no longer refused."""
    assert load_recipe("uvit3d_tiny", ["logging.validate_every=10"]).logging.validate_every == 10


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
