"""DFoT's continuous diffusion against the official code's values (``tests/data/uvit3d/golden.*``, produced by
``tests/data/uvit3d/make_golden.py`` from ``ContinuousDiffusion`` with the RE10K ``diffusion_cfg``) and against
the closed-form values of the shifted-cosine schedule."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from geoforge.engine.models.uvit3d import UViT3D, ray_condition
from geoforge.engine.schema import ConfigError
from geoforge.engine.objectives.dfot_diffusion import (DFoTDiffusionConfig, DiscreteSchedule, alpha_sigma, ddim_sample,
                                              ddim_step, dfot_diffusion_loss, logsnr)

DATA = Path(__file__).resolve().parents[2] / "data" / "uvit3d"


@pytest.fixture(scope="module")
def golden():
    return load_file(str(DATA / "golden.safetensors")), json.loads((DATA / "golden.json").read_text())


def test_training_logsnr_formula_values(golden):
    tensors, _ = golden
    k = tensors["diff.k"]
    torch.testing.assert_close(logsnr(k), tensors["diff.train_logsnr"], rtol=1e-6, atol=1e-6)
    # closed form: lambda(0) = 15 + 2 log 0.125, lambda(1) = -15 + 2 log 0.125, lambda(0.5) = 2 log 0.125 (symmetric)
    lam = logsnr(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    shift = 2 * math.log(0.125)
    torch.testing.assert_close(lam, torch.tensor([15 + shift, shift, -15 + shift], dtype=torch.float64),
                               rtol=0, atol=5e-5)   # float32 constants (t_min, t_max) as DFoT buffers
    a, s = alpha_sigma(lam)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones(3, dtype=torch.float64))


def test_discrete_schedule_equals_official_buffers(golden):
    tensors, _ = golden
    sched = DiscreteSchedule()
    assert torch.equal(sched.alphas_cumprod, tensors["diff.alphas_cumprod"])
    assert torch.equal(sched.logsnr, tensors["diff.logsnr"])
    assert torch.equal(sched.ddim_levels(), tensors["diff.ddim_levels"])
    assert sched.ddim_levels()[:3].tolist() == [-1, 19, 39] and sched.ddim_levels()[-1] == 999


def _model(golden):
    tensors, meta = golden
    constructor = {"cfg": meta["tiny_cfg"], "x_shape": meta["x_shape"], "max_tokens": meta["max_tokens"]}
    model = UViT3D.from_dfot_config(constructor).eval()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.double()


def test_training_forward_matches_official(golden):
    tensors, _ = golden
    model = _model(golden)
    x0 = tensors["in.x"].double().clamp(-1, 1)
    rays = ray_condition(tensors["in.poses16"], x0.shape[-1])
    noise = {"t": tensors["diff.train_k"], "context": torch.zeros(1, 2, dtype=torch.bool),
             "eps": tensors["diff.train_noise"].double()}
    with torch.no_grad():
        out = dfot_diffusion_loss(lambda x, n: model.dfot_forward(x, n, rays), x0, DFoTDiffusionConfig(),
                                  noise=noise)
    ref_loss = tensors["diff.train_loss"].double()
    assert abs(out["loss"].item() - ref_loss.mean().item()) < 1e-5 * ref_loss.mean().item()
    ref_x = tensors["diff.train_x_pred"].double()
    assert float((out["x0_pred"] - ref_x).abs().max() / ref_x.abs().max()) < 1e-5
    # per-frame weighting sigmoid(-1 - lambda): the noisier frame (t = 0.97) weighs ~1, the cleaner (t = 0.05) 0.13
    w = torch.sigmoid(-1 - out["logsnr"])
    assert w[0, 1] > 0.99 and 0.1 < w[0, 0] < 0.2


def test_noise_clipping_and_context_frames():
    cfg = DFoTDiffusionConfig(clip_noise=1.0)
    x0 = torch.zeros(1, 2, 1, 2, 2)
    seen = {}

    def model(x, n):
        seen["x"], seen["n"] = x, n
        return torch.zeros_like(x)
    noise = {"t": torch.tensor([[0.0, 1.0]]), "context": torch.tensor([[True, False]]),
             "eps": torch.full((1, 2, 1, 2, 2), 5.0)}
    out = dfot_diffusion_loss(model, x0, cfg, noise=noise)
    lam = logsnr(torch.tensor([[0.0, 1.0]]))
    _, sigma = alpha_sigma(lam)
    torch.testing.assert_close(seen["x"][0, :, 0, 0, 0], sigma[0])            # eps clipped to 1
    torch.testing.assert_close(seen["n"], 0.125 * lam)                          # network input
    # eps_hat = sigma x_t = sigma^2 (eps = 1); only frame 1 counts, weighted, averaged over all elements
    expected = torch.sigmoid(-1 - lam[0, 1]) * (sigma[0, 1] ** 2 - 1) ** 2 / 2
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("tag", ["a", "b"])
def test_ddim_step_matches_official(golden, tag):
    tensors, _ = golden
    model = _model(golden)
    x = tensors["in.x"].double()
    rays = ray_condition(tensors["in.poses16"], x.shape[-1])
    with torch.no_grad():
        out = ddim_step(lambda xx, n: model.dfot_forward(xx, n, rays), x, tensors[f"diff.ddim_{tag}_curr"],
                        tensors[f"diff.ddim_{tag}_next"], DiscreteSchedule())
    ref = tensors[f"diff.ddim_{tag}_out"].double()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    same = tensors[f"diff.ddim_{tag}_curr"] == tensors[f"diff.ddim_{tag}_next"]
    assert torch.equal(out[same], x[same])   # frames whose level does not change are untouched


def test_ddim_sample_with_an_oracle_recovers_the_data():
    """With the exact v of a point-mass data distribution, 50 DDIM steps land on the data; context stays."""
    sched = DiscreteSchedule()
    target = torch.linspace(-1, 1, 2 * 3 * 4).reshape(1, 2, 3, 2, 2)

    def oracle(x, n):
        lam = n / 0.125
        a, s = (v[..., None, None, None] for v in alpha_sigma(lam))
        eps = (x - a * target) / s
        return a * eps - s * target   # v = alpha eps - sigma x0
    g = torch.Generator().manual_seed(0)
    out = ddim_sample(oracle, (1, 2, 3, 2, 2), sched, context=target[:, :1], generator=g)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="sampling_timesteps: must be"):
        DFoTDiffusionConfig(sampling_timesteps=0).validate()
