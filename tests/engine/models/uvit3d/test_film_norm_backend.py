"""The U-ViT3D's FiLMRMSNorm on the fused RMSNorm + FiLM kernel (``kernels.film_norm``).

- the module keeps DFoT's parameters and state-dict keys (``emb_layer.*``, ``norm.weight``) and computes what the
  eager ``nn.RMSNorm`` + ``addcmul`` computed, forward and backward, on every backend;
- the backend travels from the recipe (``build_model(cfg, backend)``) through ``UViT3D(backend=)`` to every
  transformer block;
- a whole (small) U-ViT3D step on the fused CPU path gives the reference path's output and parameter gradients
  to 1e-4 relative in float32 (the golden test's bar); float64 takes the reference (``auto``).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from geoforge.engine.models.arch import ModelConfig, build_model
from geoforge.engine.models.uvit3d import UViT3D, UViT3DConfig
from geoforge.engine.models.uvit3d.blocks import FiLMRMSNorm, TransformerBlock
from geoforge.kernels import _backend

SMALL = UViT3DConfig(channels=[32, 32, 16, 32], emb_channels=32, num_updown_blocks=[1, 1, 2], num_mid_blocks=1,
                     num_heads=1, resolution=32, max_frames=2)
needs_triton = pytest.mark.skipif(not _backend.triton_usable(torch.device("cpu")),
                                  reason="triton not importable or TRITON_INTERPRET!=1 at import")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_state_dict_keys_unchanged():
    m = FiLMRMSNorm(24, 16)
    assert list(m.state_dict()) == ["emb_layer.weight", "emb_layer.bias", "norm.weight"]


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_triton)])
def test_module_matches_the_eager_math(backend):
    torch.manual_seed(0)
    m = FiLMRMSNorm(48, 20, backend=backend)
    with torch.no_grad():
        m.norm.weight.normal_(1, 0.3)
    x = torch.randn(2, 9, 48, requires_grad=True)
    emb = torch.randn(2, 9, 20, requires_grad=True)
    g = torch.randn(2, 9, 48)

    def run(eager):
        for t in (x, emb, *m.parameters()):
            t.grad = None
        if eager:
            scale, shift = m.emb_layer(emb).chunk(2, dim=-1)
            y = torch.addcmul(shift, m.norm(x), 1 + scale)
        else:
            y = m(x, emb)
        y.backward(g)
        return [y.detach(), x.grad, emb.grad, *(p.grad for p in m.parameters())]

    want, got = run(True), run(False)
    for name, a, b in zip(["y", "x", "emb", "emb_w", "emb_b", "norm_w"], got, want):
        assert rel(a, b) < 1e-6, (backend, name, rel(a, b))


def test_backend_reaches_every_block():
    model = build_model(ModelConfig(arch="uvit3d", uvit3d=SMALL), backend="reference")
    norms = [m for m in model.modules() if isinstance(m, FiLMRMSNorm)]
    assert norms and all(n.backend == "reference" for n in norms)
    assert all(isinstance(b, TransformerBlock) for b in model.mid_blocks)
    assert all(n.backend == "auto" for n in UViT3D(SMALL).modules() if isinstance(n, FiLMRMSNorm))


def _inputs(frames=2, res=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, 3, res, res, generator=g)
    noise = torch.randn(1, frames, generator=g)
    k = torch.tensor([0.5, 0.6, 0.55, 0.45]).expand(1, frames, 4)
    rt = torch.cat([torch.eye(3), torch.zeros(3, 1)], -1).repeat(1, frames, 1, 1)
    rt[:, 1:, 0, 3] = 0.3
    return x, noise, torch.cat([k, rt.flatten(-2)], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_uvit3d_step_fused_equals_reference(dtype):
    """fwd + bwd of a small U-ViT3D: backend auto (fused C++ in float32, the reference in float64) against
    backend reference, output and every parameter gradient."""
    torch.manual_seed(0)
    cfg = replace(SMALL, external_cond_dropout=0.0, block_dropouts=[0.0] * SMALL.num_levels)  # deterministic
    model = UViT3D(cfg, backend="reference").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    x, noise, poses = (t.to(dtype) for t in _inputs())

    def step(backend):
        for m in model.modules():
            if isinstance(m, FiLMRMSNorm):
                m.backend = backend
        model.zero_grad(set_to_none=True)
        out = model(x, noise, poses16=poses)
        out.square().mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    out_ref, grads_ref = step("reference")
    out, grads = step("auto")
    if dtype == torch.float64:
        assert torch.equal(out, out_ref)   # auto takes the reference for float64
    assert rel(out, out_ref) < 1e-4
    assert grads.keys() == grads_ref.keys()
    # a conv bias right before a GroupNorm has an exactly-zero gradient: only rounding noise, skipped
    top = max(float(g.norm()) for g in grads_ref.values())
    real = [k for k, g in grads_ref.items() if float(g.norm()) > 1e-5 * top]
    assert len(real) > len(grads) // 2
    worst = max(real, key=lambda k: rel(grads[k], grads_ref[k]))
    assert rel(grads[worst], grads_ref[worst]) < 1e-4, (worst, rel(grads[worst], grads_ref[worst]))
