"""``engine.precision``: ``distributed.precision: auto | bf16 | fp16 | fp32`` resolved from the processor (faked
flag sets here, never the machine's), installed per process, and the autocast every network runs under; fp16
refused off CUDA, and DeepSpeed's fp16 config with dynamic loss scaling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from geoforge.engine.config import ConfigError, load_recipe
from geoforge.engine.precision import (FP32, Precision, autocast, cpu_flags, current_precision, network_dtype,
                                       resolve_precision, use_precision)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw {extra}
bogomips\t: 4800.00

processor\t: 1
flags\t\t: fpu {extra}
"""


@pytest.mark.parametrize("extra, name", [("amx_bf16 amx_tile avx512_bf16", "bf16"), ("avx512_bf16", "bf16"),
                                         ("amx_bf16", "bf16"), ("", "fp32")],
                         ids=["amx+avx512bf16", "avx512bf16", "amx", "avx512-without-bf16"])
def test_auto_follows_the_cpu_flags(tmp_path, extra, name):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    flags = cpu_flags(path)
    assert "avx512f" in flags and ("amx_bf16" in flags) == ("amx_bf16" in extra)
    got = resolve_precision("auto", "cpu", flags)
    assert got.name == name and got.reason.startswith("auto: CPU " + ("with" if extra else "without"))
    assert all(f in got.reason for f in extra.split() if f.endswith("bf16"))   # the flags that decided it


def test_unreadable_cpuinfo_means_no_flags_and_fp32(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert resolve_precision("auto", "cpu", frozenset()).name == "fp32"


def test_explicit_values_are_taken_as_given_and_bad_ones_named():
    for name in ("bf16", "fp32"):
        assert resolve_precision(name, "cpu", frozenset()) == Precision(name, "distributed.precision")
    with pytest.raises(ValueError, match="distributed.precision"):
        resolve_precision("fp8", "cpu")


# ----------------------------------------------------------------------------- fp16 (GF's training precision)
def test_fp16_on_a_cpu_is_refused_in_one_line_naming_the_key():
    """No CPU fp16 autocast: resolving, installing-then-autocasting, the recipe with device cpu and the trainer's
    check all refuse it with a ConfigError (a UserError: one line, no traceback) that names the key and says what
    to use instead."""
    from geoforge.engine.errors import UserError
    from geoforge.engine.precision import check_fp16_device

    def refused(call):
        with pytest.raises(ConfigError) as err:
            call()
        text = str(err.value)
        assert isinstance(err.value, UserError) and "\n" not in text
        assert "distributed.precision: fp16 needs a CUDA device" in text and "bf16 or auto" in text

    refused(lambda: resolve_precision("fp16", "cpu"))
    refused(lambda: check_fp16_device(torch.device("cpu")))
    refused(lambda: network_dtype("cpu", Precision("fp16", "test")))
    refused(lambda: load_recipe("dfot_tiny", ["device=cpu", "distributed.precision=fp16"]))
    assert current_precision() == FP32


def test_fp16_recipe_keys():
    """fp16 loads on an auto / cuda device; with the U-ViT3D's FiLM norms or GF's per-token alignment (fused kernels:
    float32 / bfloat16 only) it needs backend: reference, named."""
    assert load_recipe("dfot_tiny", ["distributed.precision=fp16"]).distributed.precision == "fp16"
    with pytest.raises(ConfigError, match=r"backend: auto .*distributed.precision fp16 needs backend: reference"):
        load_recipe("gf_re10k_paper", ["distributed.precision=fp16"])
    recipe = load_recipe("gf_re10k_paper", ["distributed.precision=fp16", "backend=reference"])
    assert (recipe.distributed.precision, recipe.backend) == ("fp16", "reference")
    assert Precision("fp16", "test").dtype == torch.float16 and Precision("fp16", "test").fp16


def test_deepspeed_config_for_fp16_has_dynamic_loss_scaling_and_no_bf16_block():
    """distributed.precision fp16 -> DeepSpeed's fp16 block with dynamic loss scaling (loss_scale 0), set as torch's
    GradScaler that Lightning's 16-mixed uses (init 2^16, halved at each overflow, doubled after 2000 good steps);
    no bf16 block. bf16 -> the bf16 block and no fp16 block; fp32 -> neither enabled. Loaded by DeepSpeed's own
    config parser, which reads the dynamic scaling from it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from geoforge.engine.distributed import deepspeed_config

    recipe = load_recipe("gf_re10k_paper", ["distributed.precision=fp16", "backend=reference"])
    config = deepspeed_config(recipe, "fp16")
    assert "bf16" not in config
    assert config["fp16"]["enabled"] is True and config["fp16"]["loss_scale"] == 0
    assert (config["fp16"]["initial_scale_power"], config["fp16"]["hysteresis"],
            config["fp16"]["loss_scale_window"]) == (16, 1, 2000)
    fp16 = DeepSpeedConfig(config).float16_config
    assert fp16.enabled and fp16.loss_scale == 0 and not DeepSpeedConfig(config).bfloat16_config.enabled
    assert fp16.dynamic_loss_scale_args() == {"init_scale": 2 ** 16, "scale_window": 2000, "delayed_shift": 1,
                                              "consecutive_hysteresis": False, "min_scale": 1}
    bf16 = deepspeed_config(recipe, "bf16")
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    fp32 = deepspeed_config(recipe, "fp32")
    assert fp32["bf16"] == {"enabled": False} and "fp16" not in fp32
    with pytest.raises(ValueError, match="mode must be"):
        deepspeed_config(recipe, "fp8")


def test_the_old_bf16_key_fails_naming_the_new_one(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("name: old\ndistributed:\n  bf16: true\n")
    with pytest.raises(ConfigError, match=r"distributed\.bf16: this key moved to distributed\.precision"):
        load_recipe(path)


def test_installed_precision_drives_autocast_and_is_restored():
    linear = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    assert current_precision() == FP32   # the library default: nothing installed
    with autocast("cpu"):
        assert linear(x).dtype == torch.float32
    with use_precision(Precision("bf16", "test")) as p:
        assert current_precision() is p and network_dtype("cpu") == torch.bfloat16
        with autocast("cpu"):
            y = linear(x)
        assert y.dtype == torch.bfloat16 and linear.weight.dtype == torch.float32   # fp32 weights, bf16 compute
        with autocast("cpu", FP32):   # an explicit precision wins over the installed one
            assert linear(x).dtype == torch.float32
    assert current_precision() == FP32


def test_sampler_auto_autocast_follows_the_installed_precision():
    from geoforge.engine.sampling.common import autocast_for

    seen = []
    linear = nn.Linear(8, 8)
    for p in (FP32, Precision("bf16", "test")):
        with use_precision(p), autocast_for(torch.device("cpu"), "auto"):
            seen.append(linear(torch.randn(2, 8)).dtype)
    assert seen == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_alignment_under_autocast_runs_bf16_and_returns_fp32_losses(backend):
    """The fused path casts once to the autocast dtype (its ops are not autocast's), keeps the tail in float32 and
    hands float32 gradients to the float32 parameters; values stay within bf16's reach of the fp32 reference."""
    from geoforge.kernels.align import GeometryAlignment

    torch.manual_seed(0)
    m = GeometryAlignment(64, 96, 48, 32, backend=backend)
    x = torch.randn(512, 64, requires_grad=True)
    y = torch.randn(512, 48)
    ref = GeometryAlignment(64, 96, 48, 32, backend="reference")
    ref.load_state_dict(m.state_dict())
    want = ref(x, y)
    (0.5 * want["angular"] + 0.05 * want["scale"]).backward()
    want_grads = [x.grad.clone(), ref.projector[0].weight.grad.clone()]
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x, y)
    assert got["angular"].dtype == torch.float32 and got["scale"].dtype == torch.float32
    (0.5 * got["angular"] + 0.05 * got["scale"]).backward()
    for k in ("angular", "scale"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-2)
    for g, w in zip([x.grad, m.projector[0].weight.grad], want_grads):
        assert g.dtype == torch.float32
        assert float((g - w).norm() / w.norm()) < 3e-2   # bf16 matmuls: ~1e-2 relative
