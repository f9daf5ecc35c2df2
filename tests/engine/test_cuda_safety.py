"""Host conversions that crash on CUDA tensors, checked statically over engine/ and kernels/.

``tensor.numpy()`` raises ``TypeError: can't convert cuda:0 device type tensor to numpy`` on a CUDA tensor.
On a CPU machine every tensor is a CPU tensor, so the suite cannot see it: the training sample step called
``.numpy()`` on the GPU sample and would have crashed rank 0 at the first ``sample_every`` (issue 16 item 1).
Rule: ``.numpy()`` only directly on ``.cpu()`` (a no-op for CPU tensors). ``.tolist()``, ``float()`` and
``.item()`` work on CUDA tensors (they synchronise), so they are not crashes; the per-micro-batch ones in
the training loop are covered by tests/engine/test_train.py.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def numpy_calls_not_on_cpu(source: str) -> list[int]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy":
            recv = node.func.value
            on_cpu = (isinstance(recv, ast.Call) and isinstance(recv.func, ast.Attribute)
                      and recv.func.attr == "cpu")
            if not on_cpu:
                bad.append(node.lineno)
    return bad


def test_numpy_only_on_cpu_tensors():
    files = [p for d in ("engine", "kernels") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    offenders = {str(p.relative_to(ROOT)): lines for p in files if (lines := numpy_calls_not_on_cpu(p.read_text()))}
    assert not offenders, f".numpy() on a tensor that may be on CUDA (write .cpu().numpy()): {offenders}"


def test_the_scan_sees_the_original_bug():
    src = "pixels = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()\nok = x.cpu().numpy()\n"
    assert numpy_calls_not_on_cpu(src) == [1]
