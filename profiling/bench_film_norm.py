"""Benchmark cases for ``kernels/film_norm.py`` (fused RMSNorm + FiLM, the U-ViT3D's ``FiLMRMSNorm``).

``y = rmsnorm(x) * w * (1 + scale) + shift`` on x [N, D] with the packed per-token (scale | shift) [N, 2D] a FiLM
layer produces (how ``FiLMRMSNorm`` calls it), at the widths and token counts of DFoT's RealEstate10K U-ViT3D
transformer levels (level 2: D = 576, 32 x 32 tokens per frame at 256 x 256; level 3: D = 1152, 16 x 16):

- ``film_norm`` N = 8192 x D = 576 and N = 2048 x D = 1152 (8 frames; quick), plus 16 frames (full sweep).

Providers, same inputs: ``eager`` (the reference: ``F.rms_norm`` then ``addcmul`` on the two halves, the ratios'
baseline), ``compile`` (``torch.compile`` of that reference), ``cpu`` (the fused C++/OpenMP path, CPU only),
``triton`` (the fused Triton kernels, CUDA only). Modes: ``fwd`` under ``torch.no_grad()``; ``fwd+bwd`` = forward
and ``y.backward(g)`` into x, w and the packed modulation (grads reset before each call, untimed).

dtype: float32 on CPU; on CUDA the autocast mix the U-ViT3D trains with (float32 x, bf16 modulation, float32 y).

Bytes (b: bytes of x / y, m: of the modulation):
    fwd:     N*D*(2b + 2m)          read x, scale, shift; write y
    fwd+bwd: N*D*(6b + 6m)          + read g, x, scale; write dx, dscale, dshift

On CPU each call's process CPU time is recorded too (min over calls, ``summary()``): on a shared machine it
moves less than the wall clock.
"""
from __future__ import annotations

import time

import torch

from geoforge.kernels import film_norm
from profiling._harness import Case

QUICK = [(8192, 576), (2048, 1152)]
FULL = QUICK + [(16384, 576), (4096, 1152)]
BYTES = {"fwd": "N*D*(2b + 2m)", "fwd+bwd": "N*D*(6b + 6m)"}
CPU_SECONDS: dict[tuple[int, int, str, str], list[float]] = {}


def _providers(device: torch.device) -> list[str]:
    return ["eager", "compile", "triton" if device.type == "cuda" else "cpu"]


def cases(quick: bool, device: str) -> list[Case]:
    device = torch.device(device)
    x_dtype = torch.float32
    m_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, m = torch.tensor([], dtype=x_dtype).element_size(), torch.tensor([], dtype=m_dtype).element_size()
    compiled = {mode: torch.compile(film_norm.film_rms_norm_reference, dynamic=False) for mode in ("fwd", "fwd+bwd")}
    slot: dict = {}

    def inputs(n, d):
        if slot.get("key") != (n, d):
            slot.clear()
            g = torch.Generator().manual_seed(n * d)
            slot["key"] = (n, d)
            slot["v"] = (torch.randn(n, d, generator=g).to(device).requires_grad_(True),
                         (1 + 0.1 * torch.randn(d, generator=g)).to(device).requires_grad_(True),
                         (0.5 * torch.randn(n, 2 * d, generator=g)).to(device, m_dtype).requires_grad_(True),
                         torch.randn(n, d, generator=g).to(device))
        return slot["v"]

    out: list[Case] = []
    for n, d in (QUICK if quick else FULL):
        for mode in ("fwd", "fwd+bwd"):
            for provider in _providers(device):
                def call(x, w, ss, provider=provider, mode=mode):
                    if provider == "compile":
                        return compiled[mode](x, w, ss)
                    return film_norm.film_rms_norm(x, w, ss, backend="reference" if provider == "eager" else provider)

                def setup(n=n, d=d):
                    for t in inputs(n, d)[:3]:
                        t.grad = None

                def fn(n=n, d=d, call=call, mode=mode, provider=provider):
                    x, w, ss, g = inputs(n, d)
                    t0 = time.process_time()
                    if mode == "fwd":
                        with torch.no_grad():
                            call(x, w, ss)
                    else:
                        call(x, w, ss).backward(g)
                    CPU_SECONDS.setdefault((n, d, mode, provider), []).append(time.process_time() - t0)

                out.append(Case(kernel=f"film_norm-D{d}", provider=provider, mode=mode, x_name="N", x=n, fn=fn,
                                bytes_moved=n * d * ((2 * b + 2 * m) if mode == "fwd" else (6 * b + 6 * m)),
                                bytes_formula=BYTES[mode] + f", b={b}, m={m}", setup=setup,
                                warmup=3 if provider == "compile" else 2, repeat=None,
                                note=f"film_norm: x [N, D] {x_dtype}, packed (scale | shift) [N, 2D] {m_dtype}, "
                                     f"weight float32 [D]"))
    return out


def summary() -> str:
    """Process CPU seconds per call (min over calls) and the ratio against eager, per case."""
    if not CPU_SECONDS:
        return ""
    lines = ["film_norm: process CPU time per call (min over calls; ratio vs eager)"]
    for (n, d, mode, provider), secs in sorted(CPU_SECONDS.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        ref = min(CPU_SECONDS.get((n, d, mode, "eager"), [float("nan")]))
        lines.append(f"  D={d:<5} N={n:<6} {mode:<8} {provider:<8} {min(secs) * 1e3:9.2f} ms   {ref / min(secs):5.2f}x")
    return "\n".join(lines)
