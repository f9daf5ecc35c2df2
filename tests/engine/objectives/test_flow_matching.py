"""Flow-matching objective: path, targets, timestep sampling, context frames, weighting, sampler."""
import math

import pytest
import torch

from processes import torch_threads
from geoforge.engine.models.dit import DiTConfig, VideoDiT
from geoforge.engine.sampling import sample_clip
from geoforge.engine.objectives.flow_matching import (FlowMatchingConfig, add_noise, context_mask,
                                             flow_matching_loss, loss_weight, sample_t, shift_t, velocity_target)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recorder(torch.nn.Module):
    """Velocity model that records its inputs and answers ``answer(x_t, t)``."""

    def __init__(self, answer):
        super().__init__()
        self.answer, self.calls = answer, []

    def forward(self, x, t, **cond):
        self.calls.append((x.clone(), t.clone(), cond))
        return self.answer(x, t)


def oracle(x0: torch.Tensor):
    """The exact velocity field when the data is the single point x0: v = (x_t - x0) / t (0 where t = 0)."""
    def answer(x, t):
        tt = t[:, :, None, None, None]
        return torch.where(tt > 0, (x - x0) / tt.clamp_min(1e-12), torch.zeros_like(x))
    return answer


# ---------------------------------------------------------------- path and target

def test_path_endpoints_and_per_frame_t():
    x0, eps = torch.randn(2, 3, 2, 4, 4, generator=gen(1)), torch.randn(2, 3, 2, 4, 4, generator=gen(2))
    assert torch.equal(add_noise(x0, torch.zeros(2, 3), eps), x0)
    assert torch.equal(add_noise(x0, torch.ones(2, 3), eps), eps)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.25, 1.0, 0.0]])
    x_t = add_noise(x0, t, eps)
    for b in range(2):
        for f in range(3):
            torch.testing.assert_close(x_t[b, f], (1 - t[b, f]) * x0[b, f] + t[b, f] * eps[b, f])


def test_velocity_target_is_the_path_derivative():
    x0, eps = torch.randn(2, 2, 3, 2, 2, generator=gen(1)), torch.randn(2, 2, 3, 2, 2, generator=gen(2))
    t = torch.rand(2, 2, generator=gen(3)).requires_grad_()
    v = velocity_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    direction = torch.randn_like(x0)
    (grad,) = torch.autograd.grad((add_noise(x0, t, eps) * direction).sum(), t)
    torch.testing.assert_close(grad, (v * direction).sum(dim=(2, 3, 4)))
    x_t = add_noise(x0, t.detach(), eps)
    tt = t.detach()[:, :, None, None, None]
    torch.testing.assert_close(x_t - tt * v, x0)  # clean estimate from the velocity
    torch.testing.assert_close(x_t + (1 - tt) * v, eps)  # noise estimate from the velocity


# ---------------------------------------------------------------- timestep sampling

def test_shift_formula_and_sampled_distribution():
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_t(u, 3.0), 3 * u / (1 + 2 * u))
    torch.testing.assert_close(shift_t(u, 1.0), u)
    assert shift_t(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    cfg = FlowMatchingConfig(shift=3.0)
    t = sample_t(4000, 4, cfg, gen(0))
    assert t.shape == (4000, 4) and t.min() >= 0 and t.max() <= 1
    # P(t <= s) = P(u <= s / (shift - (shift - 1) s)) for u ~ U(0, 1)
    for s in (0.25, 0.5, 0.75, 0.9):
        expected = s / (3 - 2 * s)
        assert (t <= s).float().mean().item() == pytest.approx(expected, abs=0.015)
    torch.testing.assert_close(t, shift_t(torch.rand(4000, 4, generator=gen(0)), 3.0))


def test_logit_normal_statistics():
    cfg = FlowMatchingConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = sample_t(20000, 2, cfg, gen(0))
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)
    assert (t.double() - 1 / (1 + math.exp(-0.5))).median().abs() < 0.01  # median = sigmoid(mean)


def test_noise_level_independent_vs_uniform():
    indep = sample_t(64, 5, FlowMatchingConfig(noise_level="independent"), gen(0))
    assert (indep.std(dim=1) > 0).all()
    clip = sample_t(64, 5, FlowMatchingConfig(noise_level="uniform"), gen(0))
    assert torch.equal(clip, clip[:, :1].expand(64, 5))
    assert clip[:, 0].std() > 0.1


def test_context_mask_fixed_and_random():
    fixed = context_mask(3, 5, FlowMatchingConfig(context_frames=2))
    assert fixed.tolist() == [[True, True, False, False, False]] * 3
    rand = context_mask(400, 5, FlowMatchingConfig(context_frames=3, random_context=True), gen(0))
    k = rand.sum(1)
    assert torch.equal(rand, torch.arange(5)[None] < k[:, None])  # always a prefix
    assert set(k.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="context_frames"):
        context_mask(1, 2, FlowMatchingConfig(context_frames=2))


# ---------------------------------------------------------------- the loss

def test_context_frames_are_clean_and_excluded_from_the_loss():
    x0 = torch.randn(3, 4, 2, 4, 4, generator=gen(1))
    exact = oracle(x0)

    def answer(x, t):  # exact on noisy frames, garbage on context frames
        return torch.where((t == 0)[:, :, None, None, None], torch.full_like(x, 100.0), exact(x, t))

    model = Recorder(answer)
    out = flow_matching_loss(model, x0, FlowMatchingConfig(context_frames=2), generator=gen(2))
    x_t, t, _ = model.calls[0]
    assert torch.equal(x_t[:, :2], x0[:, :2]) and torch.equal(t[:, :2], torch.zeros(3, 2))
    assert (t[:, 2:] > 0).all() and torch.equal(out["t"], t)
    assert out["loss"].item() < 1e-8 and out["mse"].item() < 1e-8
    assert out["per_sample"].shape == (3,) and out["features"] == {}


def test_loss_value_against_independent_computation():
    x0 = torch.randn(2, 3, 3, 4, 4, generator=gen(1))
    pred = torch.randn_like(x0)
    for parameterization in ("velocity", "v_sigmoid"):
        model = Recorder(lambda x, t: pred)
        cfg = FlowMatchingConfig(context_frames=1, parameterization=parameterization)
        out = flow_matching_loss(model, x0, cfg, generator=gen(3))
        x_t, t, _ = model.calls[0]
        tt = t[:, :, None, None, None]
        eps = (x_t[:, 1:] - (1 - tt[:, 1:]) * x0[:, 1:]) / tt[:, 1:]  # noise recovered from the model input
        v = eps - x0[:, 1:]
        mse_frames = (pred[:, 1:] - v).pow(2).mean(dim=(2, 3, 4))
        if parameterization == "velocity":
            per_sample = mse_frames.mean(1)
        else:  # SiD2: sigmoid(bias - logSNR) * |eps_hat - eps|^2, eps_hat = x_t + (1 - t) v_hat
            eps_hat = x_t[:, 1:] + (1 - tt[:, 1:]) * pred[:, 1:]
            log_snr = 2 * torch.log((1 - t[:, 1:]) / t[:, 1:])
            per_sample = (torch.sigmoid(-1 - log_snr) * (eps_hat - eps).pow(2).mean(dim=(2, 3, 4))).mean(1)
        torch.testing.assert_close(out["per_sample"], per_sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["loss"], per_sample.mean(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["mse"], mse_frames.mean(), rtol=1e-4, atol=1e-5)


def test_v_sigmoid_weight_endpoints():
    cfg = FlowMatchingConfig(parameterization="v_sigmoid", sigmoid_bias=-1.0)
    t = torch.tensor([0.0, 0.5, 1.0])
    w = loss_weight(t, cfg)
    torch.testing.assert_close(w, torch.tensor([0.0, torch.sigmoid(torch.tensor(-1.0)).item() * 0.25, 0.0]))
    assert torch.equal(loss_weight(t, FlowMatchingConfig()), torch.ones(3))


def test_determinism_under_a_generator_and_cond_passthrough():
    model = VideoDiT(DiTConfig(hidden_dim=24, depth=1, num_heads=2, camera="plucker"))
    x0 = torch.rand(2, 2, 3, 4, 4, generator=gen(1))
    k = torch.tensor([[4.0, 0, 1.5], [0, 4.0, 1.5], [0, 0, 1]]).expand(2, 2, 3, 3)
    e = torch.eye(3, 4).expand(2, 2, 3, 4)
    cond = dict(intrinsics=k, extrinsics=e, drop_cond=torch.tensor([False, True]))
    cfg = FlowMatchingConfig(context_frames=1, random_context=True)
    a = flow_matching_loss(model, x0, cfg, generator=gen(5), cond=cond, return_features=[1])
    b = flow_matching_loss(model, x0, cfg, generator=gen(5), cond=cond, return_features=[1])
    c = flow_matching_loss(model, x0, cfg, generator=gen(6), cond=cond)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    assert not torch.equal(a["t"], c["t"]) and a["loss"] != c["loss"]
    assert a["features"][1].shape == (2, 2, 2, 2, 24)
    with pytest.raises(ValueError, match="cond: unknown keys"):
        flow_matching_loss(model, x0, cfg, cond=dict(pose=e))


@pytest.fixture
def one_thread():
    """Tiny-op training loops run ~10x faster on one thread when the 2 cores are shared."""
    with torch_threads(1):
        yield


def test_tiny_dit_overfits_one_batch(one_thread):
    """One fixed (x0, t, eps) draw, re-seeded each step: a memorisable regression target."""
    model = VideoDiT(DiTConfig(hidden_dim=64, depth=2, num_heads=2, attention="frame_causal"))
    x0 = torch.rand(2, 2, 3, 8, 8, generator=gen(1))
    cfg = FlowMatchingConfig(context_frames=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = flow_matching_loss(model, x0, cfg, generator=gen(7))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


# ---------------------------------------------------------------- Euler sampling of the path (engine.sampling.sample_clip)

@pytest.mark.parametrize("steps", [1, 4])
def test_sample_clip_with_exact_velocity_reproduces_x0(steps):
    x0 = torch.randn(2, 4, 3, 4, 4, generator=gen(1))
    context = x0[:, :2] + 0.0
    model = Recorder(oracle(x0))
    model.train()
    out = sample_clip(model, x0.shape, steps, generator=gen(2), context=context)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :2], context)
    assert len(model.calls) == steps and model.training  # mode restored
    for x, t, _ in model.calls:
        assert torch.equal(x[:, :2], context) and torch.equal(t[:, :2], torch.zeros(2, 2))
    first_t = model.calls[0][1]
    assert torch.equal(first_t[:, 2:], torch.ones(2, 2))


def test_sample_clip_is_deterministic_and_checks_arguments():
    model = Recorder(lambda x, t: -x)
    a = sample_clip(model, (1, 2, 1, 2, 2), 3, generator=gen(3))
    b = sample_clip(model, (1, 2, 1, 2, 2), 3, generator=gen(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps"):
        sample_clip(model, (1, 2, 1, 2, 2), 0)
    with pytest.raises(ValueError, match="context"):
        sample_clip(model, (1, 2, 1, 2, 2), 2, context=torch.zeros(1, 2, 1, 2, 2))


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kw,field", [
    (dict(timestep_sampling="cosine"), "timestep_sampling"),
    (dict(logit_std=0.0), "logit_std"),
    (dict(shift=0.0), "shift"),
    (dict(context_frames=-1), "context_frames"),
    (dict(noise_level="random"), "noise_level"),
    (dict(parameterization="eps"), "parameterization"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        FlowMatchingConfig(**kw).validate()
