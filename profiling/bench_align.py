"""Benchmark cases for ``kernels/align.py`` (Geometry Forcing alignment: projector + angular + scale losses).

Two kernels, every provider on the same weights and inputs:

- ``align``: the whole alignment, ``GeometryAlignment(1152, 2048, 2048, 2048)`` (DiT width 1152, VGGT
  features 2048, projector hidden 2048, scale-head hidden 2048), N tokens.
- ``align_tail``: the loss tail alone (row normalisation, cosine, scale error, and the gradients with
  respect to the projection p and the scale-head output s), given p, s and the target y, all [N, 2048].

Providers: ``eager`` (the plain-PyTorch reference, the baseline of the ratios), ``compile``
(``torch.compile`` of that same reference, compiled before timing), ``cpu`` (the fused C++/OpenMP path,
CPU only) and ``triton`` (the fused Triton path, CUDA only).

Modes: ``fwd`` = the losses under ``torch.no_grad()``; ``fwd+bwd`` = the losses with gradients
(``align``: ``0.5 * angular + 0.05 * scale``, DESIGN's default weights, ``.backward()`` into x and
every parameter, whose ``.grad`` is reset to None before each call, untimed; ``align_tail``:
d(angular)/dp and d(scale)/ds).

dtype: float32 on CPU, bfloat16 on CUDA (fp32 accumulation in the fused paths).

Bytes (effective bandwidth; b = bytes per element, P = parameter count):
    align fwd:          b*(N*in + N*T + P)                read x, y, weights
    align fwd+bwd:      b*(2*N*in + N*T + 2*P)            + write grad x, weight gradients
    align_tail fwd:     3*b*N*T                           read p, s, y
    align_tail fwd+bwd: 5*b*N*T                           + write grad p, grad s
FLOPs (align): fwd 2*N*(in*h + h*h + h*T + T*sh + sh*T); fwd+bwd 3x that.
"""
from __future__ import annotations

import torch

from geoforge.kernels import align
from profiling._harness import Case

IN, HID, TGT, SHID = 1152, 2048, 2048, 2048
WEIGHTS = (0.5, 0.05)  # DESIGN §4 defaults (lambda_ang, lambda_scale)
FULL_N = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_N = [1024, 4096]
TAIL_N_FULL = [1024, 4096, 16384, 65536]
TAIL_N_QUICK = [4096]

ALIGN_BYTES = {"fwd": "b*(N*in + N*T + P)", "fwd+bwd": "b*(2*N*in + N*T + 2*P)"}
TAIL_BYTES = {"fwd": "3*b*N*T", "fwd+bwd": "5*b*N*T"}
ALIGN_FLOPS = "fwd 2*N*(in*h + h*h + h*T + T*sh + sh*T); fwd+bwd 3x"


class _Lazy:
    """Inputs of one size at a time, made on first use (in a case's untimed setup): all kernels share one slot,
    so the previous size's inputs are freed before the next are made."""

    slot: list = [None, None]  # [key, value], shared

    def __init__(self, make):
        self.make = make

    def __call__(self, n):
        key = (id(self), n)
        if self.slot[0] != key:
            self.slot[:] = [None, None]
            self.slot[:] = [key, self.make(n)]
        return self.slot[1]


def _providers(device: torch.device) -> list[str]:
    return ["eager", "compile", "triton" if device.type == "cuda" else "cpu"]


def align_cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b = torch.tensor([], dtype=dtype).element_size()
    torch.manual_seed(0)
    module = align.GeometryAlignment(IN, HID, TGT, SHID, backend="reference", loss_weights=WEIGHTS)
    module = module.to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in module.parameters())

    def make(n):
        g = torch.Generator(device="cpu").manual_seed(n)
        x = torch.randn(n, IN, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        y = torch.randn(n, TGT, generator=g).to(device=device, dtype=dtype)
        return x, y

    inputs = _Lazy(make)

    def reference(x, y):
        return align.alignment_losses_reference(x, y, module.projector, module.scale_head)

    compiled = {"fwd": torch.compile(reference, dynamic=False), "fwd+bwd": torch.compile(reference, dynamic=False)}
    out: list[Case] = []
    sizes = QUICK_N if quick else FULL_N
    for n in sizes:
        fwd_flops = 2 * n * (IN * HID + HID * HID + HID * TGT + TGT * SHID + SHID * TGT)
        for mode in ("fwd", "fwd+bwd"):
            for provider in _providers(device):
                if quick and provider == "compile" and (n != QUICK_N[0] or mode != "fwd"):
                    continue  # compiling the full fwd+bwd costs ~a minute on 2 cores: full sweep only

                def setup(n=n):
                    x, _ = inputs(n)
                    module.zero_grad(set_to_none=True)
                    x.grad = None

                def losses(x, y, provider=provider, mode=mode):
                    if provider == "compile":
                        return compiled[mode](x, y)
                    module.backend = "reference" if provider == "eager" else provider
                    return module(x, y)

                if mode == "fwd":
                    def fn(n=n, losses=losses):
                        with torch.no_grad():
                            out_ = losses(*inputs(n))
                        return out_["angular"] + out_["scale"]
                    nbytes = b * (n * IN + n * TGT + n_params)
                else:
                    def fn(n=n, losses=losses):
                        out_ = losses(*inputs(n))
                        (WEIGHTS[0] * out_["angular"] + WEIGHTS[1] * out_["scale"]).backward()
                    nbytes = b * (2 * n * IN + n * TGT + 2 * n_params)
                flops = fwd_flops * (1 if mode == "fwd" else 3)
                out.append(Case(kernel="align", provider=provider, mode=mode, x_name="N", x=n, fn=fn,
                                bytes_moved=nbytes, bytes_formula=ALIGN_BYTES[mode] + f", P={n_params}",
                                setup=setup, flops=flops, flop_formula=ALIGN_FLOPS,
                                warmup=2 if provider == "compile" else (0 if quick and n >= 4096 else 1),
                                note=f"align: in={IN} hidden={HID} target={TGT} scale_hidden={SHID}, {dtype}, "
                                     f"loss weights {WEIGHTS}; fused chunk {align.DEFAULT_CHUNK}"))
    return out


def tail_cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b = torch.tensor([], dtype=dtype).element_size()

    def make(n):
        g = torch.Generator(device="cpu").manual_seed(n)
        p = torch.randn(n, TGT, generator=g)
        y = (p + torch.randn(n, TGT, generator=g)).to(device=device, dtype=dtype)
        s = torch.randn(n, TGT, generator=g).to(device=device, dtype=dtype)
        return p.to(device=device, dtype=dtype), s, y

    inputs = _Lazy(make)
    compiled = {"fwd": torch.compile(align.tail_losses_reference, dynamic=False),
                "fwd+bwd": torch.compile(align.tail_losses_reference, dynamic=False)}
    out: list[Case] = []
    for n in (TAIL_N_QUICK if quick else TAIL_N_FULL):
        for mode in ("fwd", "fwd+bwd"):
            for provider in _providers(device):
                if mode == "fwd":
                    if provider in ("eager", "compile"):
                        f = align.tail_losses_reference if provider == "eager" else compiled[mode]

                        def fn(n=n, f=f):
                            with torch.no_grad():
                                return f(*inputs(n))
                    else:
                        def fn(n=n, provider=provider):
                            return align.loss_tail(*inputs(n), backend=provider, grad=False)[:2]
                else:
                    if provider in ("eager", "compile"):
                        f = align.tail_losses_reference if provider == "eager" else compiled[mode]

                        def fn(n=n, f=f):
                            p, s, y = inputs(n)
                            p, s = p.detach().requires_grad_(True), s.detach().requires_grad_(True)
                            angular, scale = f(p, s, y)
                            return torch.autograd.grad(angular + scale, (p, s))
                    else:
                        def fn(n=n, provider=provider):
                            return align.loss_tail(*inputs(n), backend=provider)
                out.append(Case(kernel="align_tail", provider=provider, mode=mode, x_name="N", x=n, fn=fn,
                                bytes_moved=(3 if mode == "fwd" else 5) * b * n * TGT,
                                bytes_formula=TAIL_BYTES[mode] + f", T={TGT}", setup=lambda n=n: inputs(n),
                                warmup=3 if provider == "compile" else 2, repeat=15 if quick else 25))
    return out


def cases(quick: bool, device: str) -> list[Case]:
    """The alignment (N 1k..64k; quick: 1k and 4k) and its loss tail (quick: N=4096) on ``device``."""
    device = torch.device(device)
    return tail_cases(quick, device) + align_cases(quick, device)
