"""GF's alignment as released (``engine.objectives.gf_released``) against the official ``VGGTAlignmentLoss`` on
tiny inputs (``tests/data/uvit3d/gf_released.safetensors``, made by ``tests/data/uvit3d/make_gf_released_golden.py``
from CIntellifusion/GeometryForcing @ bf86144 with only VGGT replaced by fixed aggregator outputs)."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from geoforge.engine.objectives.gf_released import ReleasedAlignment, released_target

DATA = Path(__file__).resolve().parents[2] / "data" / "uvit3d" / "gf_released.safetensors"


def test_released_alignment_matches_the_official_loss():
    t = load_file(str(DATA))
    tokens = [t[f"in.tokens{i}"] for i in range(24)]
    target = released_target(tokens, 8)
    assert target.shape == (2, 3, 24, 8, 8)
    head = ReleasedAlignment(16, 24, 8, mid_channels=8)
    state = {k[len("w.projectors.0."):] if k.startswith("w.projectors.0.") else k[2:]: v
             for k, v in t.items() if k.startswith("w.")}
    state = {("projector." + k if not k.startswith("feature_unormalizer") else k): v for k, v in state.items()}
    head.load_state_dict(state, strict=True)
    latent = t["in.latent"].flatten(0, 1)
    ang, scale = head(latent, target.flatten(0, 1))
    torch.testing.assert_close(ang, t["out.loss_ang"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ang + 1.0 * scale, t["out.loss_total"], rtol=1e-5, atol=1e-7)
    # the angular term is a sum over the 6 frames of -(1/S^2) mean cos per plane: tiny, negative when aligned
    assert -6 / 64 <= ang.item() <= 6 / 64


def test_as_released_config_keys_and_cache_refusal():
    import pytest

    from geoforge.engine.config import ConfigError, load_recipe
    from geoforge.engine.teacher.builder import build_teacher
    r = load_recipe("uvit3d_tiny", ["gf.alignment_form=as_released"])
    teacher = build_teacher(r.teacher, released_size=r.gf.released_size)   # the released target, one key
    assert teacher.dims == {"vggt_released": len(r.teacher.layers)}
    with pytest.raises(ConfigError, match="teacher.cache"):
        load_recipe("uvit3d_tiny", ["gf.alignment_form=as_released", "teacher.cache=somewhere"])
    with pytest.raises(ConfigError, match="gf.alignment_form"):
        load_recipe("uvit3d_tiny", ["gf.alignment_form=released"])
