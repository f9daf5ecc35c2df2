"""One history-guided sampling step of GeoForge's sampler through the U-ViT3D adapter against the official DFoT /
Geometry Forcing code's step (``tests/data/uvit3d/hg_golden.*``, produced by ``make_hg_golden.py``, whose
docstring says what and how).

The official step: ``HistoryGuidanceManager`` (or ``SimpleHistoryGuidanceManager`` for plain HG-v) ``prepare``
with ``q_sample`` noising every branch's history with its own noise (drawn from the global RNG seeded with
the fixture's seed), the DDIM step of the tiny ``UViT3DPose`` of ``golden.safetensors`` (random weights) on every
branch, ``compose``. GeoForge's: ``guided_velocity`` + the Euler step, on the same window (generated frames
moved from DFoT's VP space to flow space and back), the guidance given in DFoT's units (``GuidanceSpec``) and a
``torch.Generator`` seeded with the same seed. Same inputs, same generator state -> the same frames to float32
rounding (relative 1e-4, as the U-ViT3D's golden forward; measured <= 1e-6). One draw shared by all branches
(the sampler before) gives a different step, which the test checks too.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from geoforge.engine.eval.protocols import GuidanceSpec
from geoforge.engine.models.uvit3d import UViT3D
from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig
from geoforge.engine.objectives.dfot_velocity import DFoTVelocity, dfot_index_time, vp_scales
from geoforge.engine.sampling import CONTEXT, GENERATE, GENERATED_CONTEXT, PAD, flow_step, guided_velocity
from geoforge.engine.sampling import window as window_module

DATA = Path(__file__).resolve().parents[2] / "data" / "uvit3d"
KIND = {1: CONTEXT, 2: GENERATED_CONTEXT, 0: GENERATE, -1: PAD}
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(str(DATA / "hg_golden.safetensors"))
    meta = json.loads((DATA / "hg_golden.json").read_text())
    model = UViT3D.from_dfot_config({"cfg": meta["tiny_cfg"], "x_shape": meta["x_shape"],
                                     "max_tokens": meta["max_tokens"], "external_cond_dim": 16}).eval()
    weights = load_file(str(DATA / "golden.safetensors"))
    model.load_state_dict({k[len("model."):]: v.float() for k, v in weights.items() if k.startswith("model.")},
                          strict=True)
    return tensors, meta, DFoTVelocity(model, DFoTDiffusionConfig())


def spec(method: str, kwargs: dict) -> GuidanceSpec:
    """DFoT's ``HistoryGuidance.<method>(**kwargs)`` as GeoForge's guidance, in the same (DFoT's) units."""
    return GuidanceSpec(method, scale=kwargs.get("guidance_scale", 1.0),
                        stabilization_level=kwargs.get("stabilization_level", 0.0),
                        freq_scale=kwargs.get("freq_scale", 0.5))


def geoforge_step(golden, name: str) -> torch.Tensor:
    """GeoForge's step on the fixture's window: the generated frames after it, in DFoT's VP space."""
    tensors, meta, velocity = golden
    cfg = velocity.cfg
    x_vp, mask = tensors["in.x"].float(), tensors["in.mask"][0]
    kinds = torch.tensor([KIND[int(m)] for m in mask])
    # per-frame flow times of DFoT's levels: history -1 -> 0, padding T - 1 -> 1 (pure noise, as DFoT's padding)
    times = [[1.0 if kind == PAD else dfot_index_time(cfg, int(level)) for kind, level in zip(kinds, row[0])]
             for row in (tensors["in.from_levels"], tensors["in.to_levels"])]
    t_now, t_next = (torch.tensor(t, dtype=torch.float32) for t in times)
    alpha, sigma = vp_scales(t_now)
    x = x_vp / (alpha + sigma)[None, :, None, None, None]   # the VP point in flow space (history: clean, as given)
    guidance = spec(meta["schemes"][name]["method"], meta["schemes"][name]["kwargs"]).to_guidance(cfg)
    g = torch.Generator().manual_seed(meta["seed"])
    with torch.no_grad():
        v = guided_velocity(velocity, x, t_now, kinds, x, {"poses16": tensors["in.poses16"]}, guidance, g,
                            autocast="none")
    b = x.shape[0]
    out = flow_step(x, v, t_now.expand(b, -1), t_next.expand(b, -1), "euler")
    alpha, sigma = vp_scales(t_next)
    out = out * (alpha + sigma)[None, :, None, None, None]
    return out[:, kinds == GENERATE]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", ["vanilla", "stabilized_conditional", "stabilized_vanilla", "stabilized_fractional"])
def test_history_guided_step_matches_official(golden, name):
    ref = golden[0][f"out.{name}"]
    ours = geoforge_step(golden, name)
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    assert err < TOL, (name, err)


@pytest.mark.parametrize("name", ["stabilized_vanilla", "stabilized_fractional"])
def test_one_shared_draw_is_not_dfots_step(golden, name, monkeypatch):
    """GeoForge's sampler before: one draw of the window's shape, shared by all branches. Its step differs from
    DFoT's by more than ten times the tolerance (measured 1.7e-3 and 2.2e-3; with a draw per branch <= 1e-6),
    so the fixture tells the two apart."""
    def shared(guidance, branches, shape, generator, device):
        noised = [i for i, (levels, _, _) in enumerate(branches) if any(k > 0 for k in levels)]
        eps = torch.randn(tuple(shape), generator=generator)
        return {i: eps for i in noised}

    monkeypatch.setattr(window_module, "history_noise", shared)
    err = rel_err(geoforge_step(golden, name), golden[0][f"out.{name}"])
    assert err > 10 * TOL, (name, err)


def test_fixture_covers_both_of_dfots_managers(golden):
    """Plain HG-v goes through DFoT's SimpleHistoryGuidanceManager (one draw, the unconditional branch's), the
    stabilized schemes through HistoryGuidanceManager (one draw per branch); two videos, so the draw's layout
    (video-major, branch-minor) matters."""
    tensors, meta, _ = golden
    managers = {name: s["manager"] for name, s in meta["schemes"].items()}
    assert managers["vanilla"] == "SimpleHistoryGuidanceManager"
    assert {managers[n] for n in managers if n.startswith("stabilized")} == {"HistoryGuidanceManager"}
    assert meta["schemes"]["stabilized_fractional"]["nfe"] == 3 and tensors["in.x"].shape[0] == 2
