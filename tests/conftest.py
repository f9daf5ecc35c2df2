"""Test-wide set-up. TRITON_INTERPRET must be set before triton is imported anywhere.

Two lanes:
- CPU (no CUDA device): ``TRITON_INTERPRET=1``, so the Triton kernels run through the interpreter on CPU
  tensors and are compared with their references; the GPU-lane tests skip, saying why.
- GPU (a CUDA device): the interpreter stays off, Triton compiles for the device, and the GPU-lane tests
  (``gpu`` marker: compiled Triton vs the references on CUDA tensors, flash-attn, a bf16 GF training run)
  run; the interpreter-only tests skip. ``profiling/gpu_check.sh`` runs this lane.
An explicit TRITON_INTERPRET in the environment wins either way.
"""
import os

import torch  # torch does not import triton; checking for CUDA here is safe

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# pytest-xdist (the README's ``-n auto``): each worker gets its share of the cores, never more threads than cores
# in all (two OpenMP threads on one oversubscribed core wait on each other, ~10x slower)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

GPU_SKIP_REASON = ("GPU lane: needs a CUDA device (compiled Triton, flash-attn, NVDEC); on a GPU machine run "
                   "profiling/gpu_check.sh")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_precision_leak():
    """Entry points run in-process must restore the process precision (``engine.precision.use_precision`` as a
    context manager): a leaked bf16 would silently change every later test's arithmetic."""
    from geoforge.engine.precision import FP32, current_precision, use_precision

    yield
    leaked = current_precision()
    if leaked != FP32:
        use_precision(FP32)
        pytest.fail(f"the test left the process precision installed: {leaked.describe()}")


# ----------------------------------------------------------------------------- compile lane report
_COMPILE_ROWS: list = []


@pytest.fixture
def compile_report() -> list:
    """Rows (kernels._aot.Compiled) that tests/kernels/test_compile_targets.py compiled; printed at the end."""
    return _COMPILE_ROWS


def pytest_terminal_summary(terminalreporter):
    if _COMPILE_ROWS:
        from geoforge.kernels._aot import table

        rows = sorted(_COMPILE_ROWS, key=lambda r: (r.arch, r.kernel, r.dtype, r.size, r.constexprs))
        terminalreporter.section("compile lane: registers and spills per thread (cuobjdump of the sm_XX cubins)")
        terminalreporter.write_line(table(rows))
        terminalreporter.write_line(f"{len(rows)} variants, {sum(r.seconds for r in rows):.1f} s compiling")
