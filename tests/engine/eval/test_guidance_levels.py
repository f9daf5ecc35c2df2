"""One unit per guidance flag: ``--stabilization-level`` / ``--freq-scale`` (and the protocols' levels) are DFoT's
noise levels on every architecture, converted to flow times inside (``engine.eval.protocols.GuidanceSpec``);
the same value puts history at the same noise level on the DiT and on the U-ViT3D; the old flags, whose
meaning differed per architecture, are refused naming the new ones."""
from __future__ import annotations

import pytest
import torch

from geoforge.engine.config import load_recipe
from geoforge.engine.eval.protocols import GuidanceSpec, get_protocol
from geoforge.engine.eval.options import parse_args
from geoforge.engine.eval.run import sampler_config
from geoforge.engine.objectives.dfot_diffusion import DFoTDiffusionConfig, DiscreteSchedule
from geoforge.engine.objectives.dfot_velocity import DFoTVelocity, dfot_level_time, flow_logsnr, recipe_velocity_model
from geoforge.engine.sampling import CONTEXT, GENERATE, GENERATED_CONTEXT, Guidance, guided_velocity
from geoforge.engine.schema import ConfigError

BASE = ["--protocol", "long256", "--videos-dir", "unused"]


class NoiseProbe(torch.nn.Module):
    """A network that records its second input (the DiT's flow time, the U-ViT3D's noise input) and returns
    zeros of its input's shape."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, noise, **_):
        self.seen.append(noise.detach().clone())
        return torch.zeros_like(x)


def history_logsnr(recipe_name: str, flags: list[str]) -> tuple[torch.Tensor, Guidance]:
    """The logSNR at which the recipe's network receives the generated history (frame 1) in the conditional
    branch, for guidance flags ``flags``: the DiT's from the flow time it is given, the U-ViT3D's from its
    noise input ``precond_scale * logSNR``."""
    recipe = load_recipe(recipe_name)
    opts = parse_args(["--recipe", recipe_name, *BASE, *flags])
    guidance = sampler_config(get_protocol("long256"), opts, 4, 256, None, recipe).guidance
    probe = NoiseProbe()
    model = recipe_velocity_model(probe, recipe)
    kinds = torch.tensor([CONTEXT, GENERATED_CONTEXT, GENERATE])
    x = torch.zeros(1, 3, 3, 8, 8)
    guided_velocity(model, x, torch.tensor([0.0, 0.0, 0.5]), kinds, x, {}, guidance, torch.Generator().manual_seed(0),
                    autocast="none")
    seen = probe.seen[-1][:, 1].double()   # the branches' inputs of the generated-history frame
    if isinstance(model, DFoTVelocity):
        return seen / recipe.dfot.precond_scale, guidance
    return flow_logsnr(seen), guidance


@pytest.mark.parametrize("flags", [["--guidance", "stabilized_conditional", "--stabilization-level", "0.02"],
                                   ["--guidance", "stabilized_vanilla", "--guidance-scale", "4",
                                    "--stabilization-level", "0.1"],
                                   []])   # the protocol's default: GF's stabilized HG-v 4 / 0.02
def test_same_level_same_noise_on_dit_and_uvit3d(flags):
    """The same flag value: the same flow time in the sampler on both architectures, and the network sees the
    generated history at the same logSNR - DFoT's own for that level (index level * 1000 - 1 of its table, what
    DFoT's sampler feeds), not the flow time read as the level (the DiT's old meaning)."""
    lam_dit, g_dit = history_logsnr("dfot_tiny", flags)
    lam_uvit, g_uvit = history_logsnr("uvit3d_tiny", flags)
    level = float(flags[flags.index("--stabilization-level") + 1]) if flags else 0.02
    assert g_dit == g_uvit and g_dit.stabilization == dfot_level_time(DFoTDiffusionConfig(), level)
    table = DiscreteSchedule(DFoTDiffusionConfig()).logsnr.double()
    expected = table[round(level * 1000) - 1]
    conditional = lam_dit[-1:]   # the conditional branch comes last (after the unconditional one when guided)
    torch.testing.assert_close(conditional, expected[None], atol=1e-4, rtol=0)
    torch.testing.assert_close(lam_uvit[-1:], conditional, atol=1e-4, rtol=0)
    old = flow_logsnr(torch.tensor([level], dtype=torch.float64))   # the flow time ``level`` (the DiT before)
    assert float((old - expected).abs()) > 1.0


def test_freq_scale_is_dfots_level_on_every_architecture():
    flags = ["--guidance", "fractional", "--guidance-scale", "2", "--freq-scale", "0.4"]
    cfg = DFoTDiffusionConfig()
    for name in ("dfot_tiny", "uvit3d_tiny"):
        guidance = sampler_config(get_protocol("long256"), parse_args(["--recipe", name, *BASE, *flags]), 4, 256,
                                  None, load_recipe(name)).guidance
        assert guidance == Guidance("fractional", 2.0, fraction=dfot_level_time(cfg, 0.4))
        # DFoT noises the fractional history to index 399: its logSNR
        torch.testing.assert_close(flow_logsnr(torch.tensor([guidance.fraction], dtype=torch.float64)),
                                   DiscreteSchedule(cfg).logsnr.double()[399:400], atol=1e-4, rtol=0)


@pytest.mark.parametrize("old, new", [("--stabilization", "--stabilization-level"), ("--fraction", "--freq-scale")])
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_old_flag_spellings_fail_naming_the_new_ones(old, new, form, capsys):
    """``--stabilization`` would otherwise pass as argparse's abbreviation of ``--stabilization-level``."""
    args = [old, "0.02"] if form == "separate" else [f"{old}=0.02"]
    with pytest.raises(SystemExit) as info:
        parse_args(["--recipe", "dfot_tiny", *BASE, *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{old} was renamed {new}" in err and "DFoT" in err


def test_spec_validation_names_the_flag():
    for kwargs, flag in (({"stabilization_level": 1.0}, "--stabilization-level"),
                         ({"stabilization_level": -0.1}, "--stabilization-level"),
                         ({"freq_scale": 0.0}, "--freq-scale"), ({"freq_scale": 1.0}, "--freq-scale"),
                         ({"name": "frequency"}, "guidance")):
        with pytest.raises(ConfigError, match=flag):
            GuidanceSpec(**{"name": "stabilized_fractional", **kwargs}).to_guidance()
    # a level inside (0, 1) always lands strictly inside the sampler's range, even the smallest
    g = GuidanceSpec("stabilized_fractional", 2.0, stabilization_level=0.9989, freq_scale=1e-4).to_guidance()
    assert 0 < g.fraction < g.stabilization < 1
