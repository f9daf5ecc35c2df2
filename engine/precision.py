"""The one precision choice: ``distributed.precision: auto | bf16 | fp16 | fp32`` -> what every network of a process
runs in.

``auto`` is bf16 mixed precision where the device computes bf16 matrix products natively - CUDA compute capability
8.0 and newer; CPUs whose flags (``/proc/cpuinfo``) list AMX-BF16 or AVX512-BF16 - and fp32 elsewhere (a CPU
without those instructions emulates bf16 and gains nothing). ``bf16`` and ``fp32`` are taken as given.

``fp16`` is fp16 mixed precision with dynamic loss scaling, as Geometry Forcing and DFoT trained (Lightning's
``16-mixed``: ``configurations/experiment/video_generation.yaml`` of CIntellifusion/GeometryForcing), for exact
replication; CUDA only (:func:`resolve_precision` refuses it elsewhere, naming the key: there is no CPU fp16
autocast here). Training runs DeepSpeed's fp16 mode (fp16 weights and gradients, fp32 master weights, the loss
scaled dynamically: ``engine.distributed.deepspeed_config``) with the forward under fp16 autocast, so norms,
softmax and losses run in float32 as under Lightning's autocast; other networks (teacher, sampler, eval) run under
fp16 autocast. bf16 is the better choice where the GPU has it (sm_80+): float32's exponent range, no loss scaling,
no skipped steps on overflow.

What bf16 means, everywhere: the weights, the optimizer state, the EMA and the loss reductions stay float32 and
the networks' forward passes run under ``torch.autocast(dtype=bfloat16)`` (matrix products and convolutions in
bf16, norms, softmax and losses in float32), so a checkpoint is the same whichever precision wrote it. The one
exception is training on CUDA, where DeepSpeed's bf16 mode does it instead (bf16 weights and gradients with fp32
master weights in the optimizer): at GPU scale it halves the weight and gradient memory and ZeRO's communication,
which autocast's per-step casts of fp32 weights would not (``engine.distributed.deepspeed_config``).

Entry points resolve the recipe's value once (:func:`resolve_precision`), install it for the process
(:func:`use_precision`) and say which ran and why (banner, ``report.md``). Everything that runs a network - the
trainer's forward, the GF teacher, the sampler, VGGT scoring - enters :func:`autocast` with the installed
precision. Library code run without an entry point (tests, notebooks) gets fp32 until it installs another.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from geoforge.engine.schema import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")   # native bf16 dot products (oneDNN's AMX / AVX512-BF16 kernels)


@dataclass(frozen=True)
class Precision:
    name: str      # "bf16", "fp16" or "fp32"
    reason: str    # why it was chosen, for the banner and the run report

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name, torch.float32)

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def fp16(self) -> bool:
        return self.name == "fp16"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


FP32 = Precision("fp32", "library default: no entry point installed a precision")
_current = {"precision": FP32}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The processor's feature flags (Linux ``/proc/cpuinfo``: the first ``flags`` line); empty where unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_precision(requested: str, device: torch.device | str, flags: frozenset[str] | None = None) -> Precision:
    """``requested`` (``distributed.precision``) on ``device`` -> the precision that runs, with its reason.
    ``flags``: the CPU's feature flags (default :func:`cpu_flags`; tests pass a faked set)."""
    if requested not in PRECISIONS:
        raise ValueError(f"distributed.precision: must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device = torch.device(device)
    if requested == "fp16":
        check_fp16_device(device)
    if requested != "auto":
        return Precision(requested, "distributed.precision")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision("bf16", f"auto: CUDA sm_{major}{minor} computes bf16 natively")
        return Precision("fp32", f"auto: CUDA sm_{major}{minor} has no native bf16 (sm_80 and newer do)")
    if device.type == "cpu":
        have = [f for f in BF16_CPU_FLAGS if f in (cpu_flags() if flags is None else flags)]
        if have:
            return Precision("bf16", f"auto: CPU with {' and '.join(have)}")
        return Precision("fp32", f"auto: CPU without {' or '.join(BF16_CPU_FLAGS)} (bf16 would be emulated)")
    return Precision("fp32", f"auto: no native bf16 known for {device.type}")


def check_fp16_device(device: torch.device | str) -> None:
    """fp16 mixed precision needs CUDA (DeepSpeed's dynamic loss scaling, fp16 autocast): a one-line ConfigError
    naming the key on any other device."""
    if torch.device(device).type != "cuda":
        raise ConfigError(f"distributed.precision: fp16 needs a CUDA device (fp16 mixed precision with dynamic loss "
                          f"scaling), this run is on {torch.device(device).type}; use bf16 or auto "
                          f"(--set distributed.precision=auto)")


class use_precision:   # noqa: N801 - used like a function, or as a context manager
    """Install ``precision`` for this process now (entry points). As a context manager it also restores the one
    installed before when the block ends (``with use_precision(p) as p: ...``), for code run in-process."""

    def __init__(self, precision: Precision):
        self.precision, self.previous = precision, _current["precision"]
        _current["precision"] = precision

    def __enter__(self) -> Precision:
        return self.precision

    def __exit__(self, *exc) -> None:
        _current["precision"] = self.previous


def current_precision() -> Precision:
    return _current["precision"]


def network_dtype(device: torch.device | str, precision: Precision | None = None) -> torch.dtype:
    """The dtype a network's matrix products run in under ``precision`` (default: the installed one) on ``device``:
    bf16, fp16 (``fp16``: CUDA only, :func:`check_fp16_device`) or float32; on a CUDA device without bf16 (before
    sm_80, where only an explicit ``bf16`` asks for it) fp16 stands in for bf16."""
    precision = precision or current_precision()
    if precision.fp16:
        check_fp16_device(device)
        return torch.float16
    if not precision.bf16:
        return torch.float32
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device | str, precision: Precision | None = None) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (default: the installed one) on ``device`` (:func:`network_dtype`),
    or nothing under fp32."""
    dtype = network_dtype(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


__all__ = ["BF16_CPU_FLAGS", "FP32", "PRECISIONS", "Precision", "autocast", "check_fp16_device", "cpu_flags",
           "current_precision", "network_dtype", "resolve_precision", "use_precision"]
