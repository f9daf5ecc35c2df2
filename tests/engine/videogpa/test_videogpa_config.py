"""The ``videogpa`` recipe section: the two recipes load with their settings, bad values fail naming the key."""
import pytest

from geoforge.engine.config import ConfigError, load_recipe


def test_paper_recipe_settings():
    r = load_recipe("videogpa_dpo")
    vg = r.videogpa
    assert vg.policy.kind == "cogvideox_i2v" and vg.policy.checkpoint == "THUDM/CogVideoX-5B-I2V"
    assert (vg.lora.rank, vg.lora.alpha, vg.lora.targets) == (64, 128.0, ["to_q", "to_k", "to_v", "to_out.0"])
    assert (r.optimizer.lr, vg.dpo.beta, r.distributed.precision, r.distributed.zero_stage) == (5e-6, 1.0, "bf16", 2)
    assert (vg.score.frames, vg.score.resolution, vg.score.teacher) == (10, 518, "facebook/VGGT-1B")
    assert (vg.pairs.min_gap, vg.pairs.min_motion, vg.pairs.val_fraction) == (0.05, 0.001, 0.02)
    assert (r.schedule.steps, r.schedule.warmup, r.schedule.decay) == (10000, 500, "cosine")
    assert vg.reference_mode() == "adapters_disabled" and vg.stages == ["generate", "score", "pairs", "train"]


def test_tiny_recipe_and_plain_recipes():
    assert load_recipe("videogpa_tiny").videogpa.policy.kind == "dit"
    assert load_recipe("dfot_tiny").videogpa is None
    full = load_recipe("videogpa_tiny", ["videogpa.lora.enabled=false"]).videogpa
    assert full.reference_mode() == "frozen_copy"


@pytest.mark.parametrize("override, key", [
    ("videogpa.stages=[score,generate]", "stages"),
    ("videogpa.stages=[generate,judge]", "stages"),
    ("videogpa.generate.candidates=1", "generate.candidates"),
    ("videogpa.score.resolution=50", "score.resolution"),
    ("videogpa.score.lpips_random=false", "score.lpips_backbone"),
    ("videogpa.pairs.val_fraction=1.0", "pairs.val_fraction"),
    ("videogpa.dpo.beta=0", "dpo.beta"),
    ("videogpa.lora.rnak=4", "lora.rnak"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe("videogpa_tiny", [override])


def test_adapters_disabled_needs_lora():
    with pytest.raises(ConfigError, match="adapters_disabled"):
        load_recipe("videogpa_tiny", ["videogpa.lora.enabled=false", "videogpa.dpo.reference=adapters_disabled"])
