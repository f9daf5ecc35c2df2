"""kernels/_backend.py: the device guard every Triton launch runs under, and the grid-limit check.

The static test reads every module of ``kernels/`` and fails on any Triton launch (``kernel[grid](...)``)
that is not lexically inside ``with device_guard(...)``: Triton launches on the *current* CUDA device, so a
launch outside the guard on a tensor of another GPU reads foreign memory. A CPU cannot show that crash; this
keeps the guard from being dropped.
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

from geoforge.kernels import _backend

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _launches_outside_guard(tree: ast.AST) -> list[int]:
    """Line numbers of ``name[...](...)`` calls whose callee ends in ``_kernel`` outside a device_guard ``with``."""
    bad = []

    def guarded(node: ast.With) -> bool:
        for item in node.items:
            call = item.context_expr
            if isinstance(call, ast.Call):
                f = call.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == "device_guard":
                    return True
        return False

    def visit(node: ast.AST, inside: bool) -> None:
        if isinstance(node, ast.With) and guarded(node):
            inside = True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel") and not inside):
            bad.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return bad


def test_every_triton_launch_is_under_the_tensor_device():
    launches = 0
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        launches += sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                        and isinstance(n.func.value, ast.Name) and n.func.value.id.endswith("_kernel"))
        bad = _launches_outside_guard(tree)
        assert not bad, f"{path.name}: Triton launches outside `with device_guard(t)` at lines {bad}"
    assert launches >= 7, f"found only {launches} launches: the scan no longer sees the kernels"


def test_the_scan_catches_an_unguarded_launch():
    src = ("def f(x):\n"
           "    with device_guard(x):\n"
           "        _a_kernel[(1,)](x)\n"
           "    _b_kernel[(1,)](x)\n")
    assert _launches_outside_guard(ast.parse(src)) == [4]


def test_device_guard_selects_the_tensor_device():
    guard = _backend.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_backend.device_guard(torch.zeros(1)), contextlib.nullcontext)


def test_check_grid_limits():
    assert _backend.check_grid("op", (5, 65535)) == (5, 65535)
    with pytest.raises(ValueError, match=r"op: grid axis 1 holds 65536 programs.*65535"):
        _backend.check_grid("op", (1, 65536))
    with pytest.raises(ValueError, match="axis 0"):
        _backend.check_grid("op", (2**31,))
