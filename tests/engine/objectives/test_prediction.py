"""x-prediction: the output-to-velocity conversion by hand, in the loss (with v_sigmoid), in every sampler
and guidance scheme, and in the VideoGPA policy's DPO errors."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.objectives.flow_matching import FlowMatchingConfig, flow_matching_loss, loss_weight
from geoforge.engine.objectives.prediction import VelocityModel, velocity_from_output, velocity_model
from geoforge.engine.sampling import GUIDANCE_NAMES, Guidance, SamplerConfig, generate

X0 = FlowMatchingConfig(prediction="x0")


def test_conversion_by_hand():
    x_t = torch.tensor([1.0, 1.0, 1.0, -2.0]).reshape(1, 4, 1, 1, 1)
    out = torch.tensor([0.4, 0.4, 0.4, 0.0]).reshape(1, 4, 1, 1, 1)
    t = torch.tensor([[0.5, 0.02, 0.0, 1.0]])
    v = velocity_from_output(out, x_t, t, "x0", 0.05).flatten().tolist()
    # (1 - 0.4) / 0.5; t = 0.02 and t = 0 are clamped to 0.05: 0.6 / 0.05; (-2 - 0) / 1
    assert v == pytest.approx([1.2, 12.0, 12.0, -2.0])
    assert torch.equal(velocity_from_output(out, x_t, t, "velocity", 0.05), out)
    with pytest.raises(ValueError, match="prediction"):
        velocity_from_output(out, x_t, t, "eps", 0.05)


def test_exact_x0_gives_the_exact_velocity_above_the_clamp():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 3, 4, 4, generator=g), torch.randn(2, 3, 3, 4, 4, generator=g)
    t = torch.tensor([[0.05, 0.4, 1.0], [0.7, 0.2, 0.9]])
    x_t = (1 - t)[..., None, None, None] * x0 + t[..., None, None, None] * eps
    torch.testing.assert_close(velocity_from_output(x0, x_t, t, "x0", 0.05), eps - x0, atol=1e-5, rtol=1e-5)


class Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x, t, **_):
        return self.value.expand_as(x).clone()


@pytest.mark.parametrize("parameterization", ["velocity", "v_sigmoid"])
def test_loss_is_the_velocity_loss_of_the_x0_output(parameterization):
    """x0 = 1, eps = 0 everywhere, the network answers 0.5: v = -1, v_hat = (x_t - 0.5) / max(t, 0.05)."""
    cfg = replace(X0, parameterization=parameterization)
    x0 = torch.ones(1, 3, 1, 2, 2)
    t = torch.tensor([[0.0, 0.5, 0.02]])
    noise = {"t": t, "context": torch.tensor([[True, False, False]]), "eps": torch.zeros_like(x0)}
    out = flow_matching_loss(Constant(torch.tensor(0.5)), x0, cfg, noise=noise)
    # frame 1: x_t = 0.5 -> v_hat = 0, err 1; frame 2: x_t = 0.98 -> v_hat = 0.48 / 0.05 = 9.6, err 10.6^2
    errors = torch.tensor([1.0, 10.6 ** 2])
    weights = loss_weight(t[:, 1:], cfg)[0]
    assert out["mse"].item() == pytest.approx(errors.mean().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((weights * errors).mean().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["mse"].item() if parameterization == "velocity"
                                               else (weights * errors).mean().item(), rel=1e-5)


def test_velocity_model_wraps_features_modes_and_parameters():
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=2, num_heads=2, patch_size=2))
    wrapped = velocity_model(dit, X0)
    assert isinstance(wrapped, VelocityModel) and velocity_model(wrapped, X0) is wrapped
    assert velocity_model(dit, FlowMatchingConfig()) is dit
    assert list(wrapped.parameters()) == list(dit.parameters())
    wrapped.eval()
    assert dit.training is False
    x, t = torch.randn(1, 2, 3, 4, 4), torch.tensor([[0.3, 0.8]])
    raw, feats = dit(x, t, return_features=(1,))
    v, feats2 = wrapped(x, t, return_features=(1,))
    torch.testing.assert_close(v, (x - raw) / t[..., None, None, None])
    assert torch.equal(feats[1], feats2[1])


class X0Oracle(torch.nn.Module):
    """Predicts the target video's frames (frame index from ``actions``): the optimal x0 of a point mass."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, x, t, actions=None, drop_cond=None, **_):
        idx = actions[..., 0].round().long()
        return self.target[0][idx]


@pytest.mark.parametrize("name", GUIDANCE_NAMES)
@pytest.mark.parametrize("method", ["euler", "ddim"])
def test_every_sampler_and_guidance_scheme_lands_on_the_x0_oracle(name, method):
    """Through :class:`VelocityModel` an x0 oracle gives the exact velocity towards the target: sliding
    windows with generated history, every history-guidance scheme (weights sum to 1), CFG on the actions."""
    length = 7
    i = torch.arange(length, dtype=torch.float32)[:, None, None, None]
    target = torch.sin(0.7 * i + torch.arange(3)[None, :, None, None] + torch.linspace(0, 1, 16).reshape(1, 1, 4, 4))[None]
    guidance = Guidance.named(name, 2.0, 0.02, cond_scale=1.5, subsets=[[-1], [0]], subset_weights=[1.5, 1.0])
    sampler = SamplerConfig(method=method, steps=4, window=4, sliding_context=2, guidance=guidance, progress=False)
    actions = {"actions": i.reshape(1, length, 1).clone()}
    out = generate(velocity_model(X0Oracle(target), X0), target[:, :1], length, actions, sampler,
                   torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    raw = generate(X0Oracle(target), target[:, :1], length, actions, sampler, torch.Generator().manual_seed(0))
    assert (raw - target).abs().max() > 0.1  # read as a velocity, the same output is wrong


def test_dit_policy_dpo_error_uses_the_x0_conversion():
    from geoforge.engine.videogpa.policy import DiTPolicy

    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(hidden_dim=32, depth=1, num_heads=2, patch_size=4))
    for p in dit.final.parameters():   # a non-zero output
        torch.nn.init.normal_(p, std=0.1)
    policy = DiTPolicy(dit, replace(X0, timestep_sampling="uniform"), frames=3, resolution=8)
    frames = torch.rand(2, 3, 3, 8, 8)
    x0 = policy.encode(frames)
    noise = policy.draw_noise(tuple(x0.shape), torch.Generator().manual_seed(1))
    err = policy.per_sample_error(dit, x0, {"first_frame": frames[:, 0]}, noise)
    x_t = policy.add_noise(x0, noise)
    x_t[:, 0] = x0[:, 0]
    x0_hat = dit(x_t, noise["t"])
    v_hat = (x_t - x0_hat) / noise["t"][..., None, None, None].clamp_min(0.05)
    expected = (v_hat - (noise["eps"] - x0))[:, 1:].pow(2).flatten(1).mean(1)   # |v_hat - v|^2, frame 0 excluded
    torch.testing.assert_close(err, expected, atol=1e-5, rtol=1e-4)
