"""Ahead-of-time compilation of every Triton kernel for NVIDIA targets, on a machine without a GPU.

Triton's compiler and NVIDIA's ``ptxas`` ship in the triton wheel (``triton/backends/nvidia/bin``), so
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` produces PTX and a cubin for sm_90 here
as it would on an H100. Each kernel module exports ``compile_specs()``: the variants its wrappers launch at
realistic sizes, with the same launch configuration (blocks, num_warps) the wrappers pick.
``tests/kernels/test_compile_targets.py`` compiles them all for sm_80 and sm_90 and fails on a compile error
or a register spill.

Registers and spills: a ``CompiledKernel``'s ``n_regs`` / ``n_spills`` are filled in only when the cubin is
loaded through the CUDA driver, which needs a GPU. Here they are read from the same cubin with the wheel's
``cuobjdump -res-usage`` (REG, and STACK = the local memory per thread that the driver reports and Triton
divides by 4 into ``n_spills``).

Under ``TRITON_INTERPRET=1`` (the CPU tests) ``@triton.jit`` yields interpreter functions, triton.language's
own jitted helpers (``tl.sum``, ...) included, and nothing can be compiled; the compile lane therefore runs
in a process without it (the test starts ``python -m geoforge.kernels._aot --json``).

    python -m geoforge.kernels._aot [--json out.json] [--workers N]   # the table for sm_80 and sm_90; rc 1 on an
                                                              # error or a spill
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from types import ModuleType

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

ARCHS = (80, 90)
_FLOAT_ARGS = {"eps", "coef", "ang_coef", "scale_coef", "z_min"}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    arch: int
    dtype: str
    size: str
    num_warps: int
    constexprs: str
    n_regs: int
    spill_bytes: int
    seconds: float

    @property
    def n_spills(self) -> int:
        return self.spill_bytes // 4


def nvidia_tool(name: str) -> str:
    """A tool of the triton wheel's NVIDIA backend (``ptxas``, which Triton runs itself; ``cuobjdump``)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return path


def cuobjdump() -> str:
    return nvidia_tool("cuobjdump")


def modules() -> list[ModuleType]:
    from geoforge.kernels import align, film_norm, reproject

    return [align, reproject, film_norm]


def jit_function(module: ModuleType, name: str) -> JITFunction:
    value = getattr(module, name)
    if not isinstance(value, JITFunction):
        raise RuntimeError(f"{module.__name__}.{name} is not a JITFunction: compile ahead of time in a process "
                           "without TRITON_INTERPRET=1 (python -m geoforge.kernels._aot)")
    return value


def signature(fn: JITFunction, types_: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Argument types: ``types_`` by name (``"*"``: every other pointer), floats for the scalar coefficients,
    i32 for the other scalars, ``constexpr`` for the constexprs."""
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in types_:
            sig[arg] = types_[arg]
        elif arg.endswith("_ptr"):
            sig[arg] = types_["*"]
        else:
            sig[arg] = "fp32" if arg in _FLOAT_ARGS else "i32"
    return sig


def compile_spec(fn: JITFunction, spec: dict, arch: int):
    """``triton.compile`` of one spec for ``sm_<arch>``; raises the compiler's error."""
    src = ASTSource(fn=fn, signature=signature(fn, spec["types"], spec["constexprs"]), constexprs=spec["constexprs"])
    options = {"num_warps": spec.get("num_warps", 4), **spec.get("options", {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread) of the cubin Triton built, from ``cuobjdump
    -res-usage``: the values the driver reports as NUM_REGS and LOCAL_SIZE_BYTES, from which Triton fills
    ``n_regs`` and ``n_spills`` (= LOCAL_SIZE_BYTES / 4) on a GPU. These kernels use no local arrays, so local
    memory is spill space."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        proc = subprocess.run([cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", proc.stdout)
    if found is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output: {proc.stdout}")
    return int(found.group(1)), int(found.group(2))


def all_specs() -> list[tuple[ModuleType, dict]]:
    return [(m, spec) for m in modules() for spec in m.compile_specs()]


def spec_id(module: ModuleType, spec: dict) -> str:
    flags = ",".join(f"{k}={int(v)}" for k, v in spec["constexprs"].items() if isinstance(v, bool))
    return f"{module.__name__.split('.')[-1]}.{spec['kernel'].strip('_')}[{spec['dtype']},{spec['size']}{',' if flags else ''}{flags}]"


def compile_one(module: ModuleType, spec: dict, arch: int) -> Compiled:
    import time

    start = time.perf_counter()
    compiled = compile_spec(jit_function(module, spec["kernel"]), spec, arch)
    regs, spills = resource_usage(compiled)
    flags = " ".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    return Compiled(spec["kernel"], arch, spec["dtype"], spec["size"], compiled.metadata.num_warps, flags, regs,
                    spills, time.perf_counter() - start)


def table(rows: list[Compiled]) -> str:
    head = f"{'kernel':<18} {'sm':>3} {'dtype':<5} {'size':<11} {'warps':>5} {'regs':>4} {'spills':>6}  constexprs"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kernel:<18} {r.arch:>3} {r.dtype:<5} {r.size:<11} {r.num_warps:>5} {r.n_regs:>4} "
                     f"{r.n_spills:>6}  {r.constexprs}")
    return "\n".join(lines)


def _compile_case(case: tuple[int, int, int]) -> dict:
    """One (module index, spec index, arch) in a worker process: the row, or the compiler's error."""
    m, i, arch = case
    module = modules()[m]
    spec = module.compile_specs()[i]
    row = {"id": f"sm{arch}-{spec_id(module, spec)}", "expected_warps": spec.get("num_warps", 4)}
    try:
        row.update(asdict(compile_one(module, spec, arch)))
    except Exception as err:  # a compile error fails the lane, named by the test of this case
        row["error"] = f"{type(err).__name__}: {err}"
    return row


def compile_all(workers: int | None = None) -> list[dict]:
    """Every spec of every module for every arch, compiled in ``workers`` processes (default: CPU count)."""
    from concurrent.futures import ProcessPoolExecutor

    cases = [(m, i, arch) for arch in ARCHS for m, module in enumerate(modules())
             for i in range(len(module.compile_specs()))]
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(_compile_case, cases))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description="Compile every Triton kernel of kernels/ for sm_80 and sm_90.")
    parser.add_argument("--json", help="write the rows (and errors) to this file")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = compile_all(args.workers)
    wall = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_seconds": wall, "rows": results}, f, indent=1)
    rows = [Compiled(**{k: r[k] for k in Compiled.__dataclass_fields__}) for r in results if "error" not in r]
    print(table(rows))
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"COMPILE ERROR {r['id']}: {r['error']}")
    spills = sum(r.spill_bytes > 0 for r in rows)
    print(f"{len(rows)} variants compiled in {wall:.1f} s wall ({sum(r.seconds for r in rows):.1f} s of compiling); "
          f"errors: {len(errors)}; spilling: {spills}")
    return 1 if errors or spills else 0


if __name__ == "__main__":
    raise SystemExit(main())
