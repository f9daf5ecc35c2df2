"""Test-wide set-up. TRITON_INTERPRET must be set before triton is imported anywhere."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- compile lane report
_COMPILE_ROWS: list = []


@pytest.fixture
def compile_report() -> list:
    """Rows (kernels._aot.Compiled) that tests/kernels/test_compile_targets.py compiled; printed at the end."""
    return _COMPILE_ROWS


def pytest_terminal_summary(terminalreporter):
    if _COMPILE_ROWS:
        from kernels._aot import table

        rows = sorted(_COMPILE_ROWS, key=lambda r: (r.arch, r.kernel, r.dtype, r.size, r.constexprs))
        terminalreporter.section("compile lane: registers and spills per thread (cuobjdump of the sm_XX cubins)")
        terminalreporter.write_line(table(rows))
        terminalreporter.write_line(f"{len(rows)} variants, {sum(r.seconds for r in rows):.1f} s compiling")
