"""engine.models.attention: backend choice, the SDPA path against a softmax reference, frame-causal masks."""
import math

import pytest
import torch

import geoforge.engine.models.attention as attn_mod
from geoforge.engine.models.attention import attention, frame_causal_mask, set_attention_backend


@pytest.fixture
def no_cuda(monkeypatch):
    """Pretend to be a CPU-only machine and forget any backend chosen before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(attn_mod._state, "backend", None)


def reference_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def test_auto_picks_sdpa_without_cuda(no_cuda):
    assert set_attention_backend("auto") == "sdpa"
    assert attn_mod.attention_backend() == "sdpa"


def test_lazy_resolution_on_first_use(no_cuda):
    q = torch.randn(1, 1, 3, 4)
    attention(q, q, q)
    assert attn_mod._state["backend"] == "sdpa"


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_forcing_an_unusable_backend_errors_clearly(no_cuda, backend):
    with pytest.raises(RuntimeError, match=rf"{backend}.*not usable.*sdpa"):
        set_attention_backend(backend)


def test_unknown_backend_is_a_value_error(no_cuda):
    with pytest.raises(ValueError, match="attention backend must be one of"):
        set_attention_backend("flash3")


def test_gpu_backend_falls_back_to_sdpa_on_cpu_tensors(monkeypatch):
    monkeypatch.setitem(attn_mod._state, "backend", "flash_attn")  # as if chosen on a GPU machine
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_softmax_reference(no_cuda, masked):
    q, k, v = torch.randn(3, 2, 3, 12, 16).unbind(0)
    mask = frame_causal_mask(3, 4) if masked else None
    torch.testing.assert_close(attention(q, k, v, mask), reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_frame_causal_mask_entries():
    frames, per_frame = 3, 2
    mask = frame_causal_mask(frames, per_frame)
    assert mask.shape == (6, 6) and mask.dtype == torch.bool
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (j // per_frame <= i // per_frame)


def test_frame_causal_attention_ignores_later_frames(no_cuda):
    frames, per_frame = 4, 3
    q, k, v = torch.randn(3, 1, 2, frames * per_frame, 8).unbind(0)
    k2, v2 = k.clone(), v.clone()
    later = slice(2 * per_frame, None)
    k2[..., later, :] += torch.randn_like(k2[..., later, :])
    v2[..., later, :] += torch.randn_like(v2[..., later, :])
    mask = frame_causal_mask(frames, per_frame)
    a, b = attention(q, k, v, mask), attention(q, k2, v2, mask)
    torch.testing.assert_close(a[..., : 2 * per_frame, :], b[..., : 2 * per_frame, :], rtol=0, atol=1e-6)
    assert (a[..., later, :] - b[..., later, :]).abs().max() > 1e-2
    # within its own frame attention is bidirectional: the first token sees the frame's last token
    v3 = v.clone()
    v3[..., per_frame - 1, :] += 1.0
    assert (attention(q, k, v3, mask)[..., 0, :] - a[..., 0, :]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- issue 16 item 3
def test_kernel_choice_and_reasons():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert attn_mod.kernel_for("flash_attn", "cuda", bf16, False) == ("flash_attn", "")
    assert attn_mod.kernel_for("xformers", "cuda", torch.float16, False) == ("xformers", "")
    assert attn_mod.kernel_for("flash_attn", "cuda", bf16, True) == ("sdpa", "flash_attn not taken: a mask")
    assert attn_mod.kernel_for("flash_attn", "cuda", fp32, False) == ("sdpa", "flash_attn not taken: float32")
    assert attn_mod.kernel_for("flash_attn", "cpu", bf16, False) == ("sdpa", "flash_attn not taken: cpu tensors")
    assert attn_mod.kernel_for("sdpa", "cuda", bf16, False) == ("sdpa", "")


def test_mixed_dtypes_reach_the_kernel_as_v_dtype(no_cuda, monkeypatch):
    """Autocast on CUDA leaves a normalised q/k in float32 and v in bf16; the kernel must see one dtype
    (the fused check reads q's dtype, so a float32 q silently sent every call to SDPA)."""
    seen = []
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None: seen.append((q.dtype, k.dtype, v.dtype)) or v)
    q = torch.randn(1, 2, 5, 8)
    attention(q, q.clone(), q.bfloat16())
    assert seen == [(torch.bfloat16,) * 3]


def test_dit_block_under_autocast_like_norms(no_cuda, monkeypatch):
    """DiTBlock.attend with its q/k norms returning float32 (what CUDA autocast does with rms_norm) hands the
    kernel q, k and v of one dtype, and the call site is reported."""
    from geoforge.engine.models.dit import DiTBlock
    from geoforge.engine.models.rope import rope_tables

    block = DiTBlock(32, 2, 2.0, qk_norm=True).bfloat16()
    for norm in (block.q_norm, block.k_norm):
        norm.register_forward_hook(lambda module, args, out: out.float())
    seen = []
    real = attn_mod.F.scaled_dot_product_attention
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None: seen.append({q.dtype, k.dtype, v.dtype}) or real(q, k, v))
    monkeypatch.setattr(attn_mod, "_used", {})
    h = torch.randn(1, 2, 4, 32).bfloat16()
    cos, sin = rope_tables(2, 2, 2, 16, 10000.0, h.device)
    block.attend(h, cos, sin, None)
    assert seen == [{torch.bfloat16}]
    assert attn_mod.attention_report() == {"geoforge.engine.models.dit:DiTBlock.attend": "sdpa"}


def test_report_names_each_site_and_reason(no_cuda, monkeypatch, caplog):
    monkeypatch.setattr(attn_mod, "_used", {})
    q = torch.randn(1, 1, 4, 8)
    with caplog.at_level("INFO", logger="geoforge.attention"):
        attention(q, q, q, site="a")
        attention(q, q, q, mask=frame_causal_mask(2, 2), site="b")
        attention(q, q, q, site="a")
    assert attn_mod.attention_report() == {"a": "sdpa", "b": "sdpa"}
    assert sum("attention a: sdpa" in r.getMessage() for r in caplog.records) == 1  # logged once per site
