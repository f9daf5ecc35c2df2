"""Choosing the backend of a fused kernel, in one place.

Every fused op in ``kernels/`` has the same four choices:

- ``reference``: plain PyTorch, the oracle the tests compare against;
- ``triton``: the fused GPU path. It runs on CUDA tensors, and on CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported (how the tests exercise it);
- ``cpu``: the fast CPU path (C++/OpenMP from ``csrc/`` or torch.compile);
- ``auto``: ``triton`` on CUDA tensors when triton imports, ``cpu`` otherwise.

The first time an op resolves ``auto`` (or a forced backend) the choice is logged once.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")
log = logging.getLogger("geoforge.kernels")
_announced: set[tuple[str, str, str]] = set()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Triton can launch on tensors of ``device``: CUDA, or CPU under the interpreter."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend (``triton`` / ``cpu`` / ``reference``) for ``op`` on ``device``.

    ``auto`` picks triton on CUDA, the CPU fast path on CPU. A forced ``triton`` on a device where
    Triton cannot launch is an error, not a silent fallback; a forced ``cpu`` on a CUDA tensor is
    an error too (the CPU path would copy to host).
    """
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        chosen = "triton" if device.type == "cuda" and triton_usable(device) else (
            "cpu" if device.type == "cpu" else "reference")
    else:
        chosen = backend
    if chosen == "triton" and not triton_usable(device):
        raise RuntimeError(
            f"{op}: backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
            f"imported for CPU tensors (got a {device.type} tensor; triton importable: {triton_importable()})")
    if chosen == "cpu" and device.type != "cpu":
        raise RuntimeError(f"{op}: backend 'cpu' takes CPU tensors, got {device.type}")
    key = (op, backend, chosen)
    if key not in _announced:
        _announced.add(key)
        log.info("%s: backend %s (requested %s, device %s)", op, chosen, backend, device.type)
    return chosen


MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 allows 2**31 - 1)


def device_guard(t: torch.Tensor | torch.device):
    """The context a Triton launch on ``t`` runs under: ``torch.cuda.device(t.device)`` for CUDA tensors.

    Triton launches on the *current* CUDA device and its stream, not on the tensor's; a kernel given a
    tensor of ``cuda:1`` while ``cuda:0`` is current reads foreign memory (an illegal address, or wrong
    results under peer access). Every launch in ``kernels/`` goes through this guard
    (tests/kernels/test_backend.py checks that statically). A no-op for CPU tensors (the interpreter).
    """
    device = t if isinstance(t, torch.device) else t.device
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_grid(op: str, grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` unchanged, or a ValueError naming ``op`` when an axis exceeds CUDA's limits.

    Checked on every device (the interpreter has no limit, but a size that fails on the GPU must fail in the
    CPU tests too)."""
    if grid and grid[0] > 2**31 - 1:
        raise ValueError(f"{op}: grid axis 0 holds {grid[0]} programs, CUDA allows at most {2**31 - 1}")
    for axis, size in enumerate(grid[1:], start=1):
        if size > MAX_GRID_YZ:
            raise ValueError(f"{op}: grid axis {axis} holds {size} programs, CUDA allows at most {MAX_GRID_YZ} "
                             f"(split the call, e.g. fewer frames per call)")
    return grid
