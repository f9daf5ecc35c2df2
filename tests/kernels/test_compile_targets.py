"""The compile lane: every Triton kernel of kernels/ compiled ahead of time for sm_80 (A100) and sm_90 (H100 /
H200) without a GPU, with the launch configurations the wrappers pick at realistic sizes (``kernels._aot``).

Fails on a compile error (Triton's front end, its MLIR passes or ptxas) and on register spills; prints the
registers and spills of every variant at the end of the run (``compile lane`` section, tests/conftest.py).
This is what the interpreter cannot see: it runs kernels as numpy, with no registers, no warps and no PTX.

The kernels are compiled in one child process (``python -m geoforge.kernels._aot --json``) without TRITON_INTERPRET,
which this test session sets and under which nothing can be compiled; each variant is then its own test.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the compile lane needs the triton package")

from geoforge.kernels import _aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
try:
    _aot.cuobjdump()
    TOOLS = ""
except FileNotFoundError as err:  # pragma: no cover - a triton wheel without the NVIDIA backend tools
    TOOLS = str(err)
pytestmark = pytest.mark.skipif(bool(TOOLS), reason=f"compile lane: {TOOLS}")

IDS = [f"sm{arch}-{_aot.spec_id(m, spec)}" for arch in _aot.ARCHS for m, spec in _aot.all_specs()]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "geoforge.kernels._aot", "--json", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    if not out.is_file():
        pytest.fail(f"python -m geoforge.kernels._aot did not run (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {r["id"]: r for r in json.loads(out.read_text())["rows"]}


@pytest.mark.parametrize("case", IDS)
def test_compiles_without_spills(case, compiled, compile_report):
    row = compiled[case]
    assert "error" not in row, f"{case} does not compile: {row.get('error')}"
    compile_report.append(_aot.Compiled(**{k: row[k] for k in _aot.Compiled.__dataclass_fields__}))
    assert row["num_warps"] == row["expected_warps"]
    assert row["spill_bytes"] == 0, (f"{case} spills {row['spill_bytes']} bytes per thread ({row['n_regs']} "
                                     f"registers, {row['num_warps']} warps)")


def test_every_kernel_is_in_the_lane():
    """A new @triton.jit kernel in kernels/ must get compile specs."""
    jitted = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    ast.unparse(d).endswith("jit") for d in node.decorator_list):
                jitted.add(node.name)
    covered = {spec["kernel"] for _, spec in _aot.all_specs()}
    assert jitted and jitted == covered, f"kernels without compile specs: {sorted(jitted - covered)}"


BROKEN = textwrap.dedent('''
    import sys
    import triton
    import triton.language as tl
    from geoforge.kernels import _aot

    @triton.jit
    def _broken_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)  # arange needs a power of two
        tl.store(x_ptr + offs, tl.sum(tl.load(x_ptr + offs, mask=offs < n), axis=0), mask=offs < n)

    spec = {"kernel": "_broken_kernel", "constexprs": {"BLOCK": int(sys.argv[1])}, "types": {"*": "*fp32"}}
    print("registers", _aot.resource_usage(_aot.compile_spec(_broken_kernel, spec, 90))[0])
''')


@pytest.mark.parametrize("block, ok", [(4, True), (3, False)])
def test_a_broken_kernel_fails_the_lane(tmp_path, block, ok):
    """The lane's compile path raises the compiler's error (the same kernel compiles with a valid block)."""
    script = tmp_path / "broken.py"
    script.write_text(BROKEN)
    proc = subprocess.run([sys.executable, str(script), str(block)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    if ok:
        assert proc.returncode == 0 and "registers" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and "CompilationError" in proc.stderr and "power of 2" in proc.stderr, \
            proc.stderr[-2000:]
