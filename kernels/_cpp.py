"""Build (once) and load the C++/OpenMP CPU paths in ``csrc/``: one helper for every kernel module.

``torch.utils.cpp_extension.load`` guards a build with a "baton": it creates ``<build dir>/lock`` and
deletes it when the build ends. A process killed mid-build (Ctrl-C, a job timeout, a machine restart) leaves
that file behind, and every later process that loads the extension waits on it forever - a test suite or a
training run hangs without a word. Here each build first takes an ``fcntl`` lock on ``<build dir>.geoforge-lock``,
which the kernel releases when its holder dies, so whoever holds it knows no other GeoForge process is
building: a baton still present then is stale and is removed (with a warning) before torch looks at it.
"""
from __future__ import annotations

import fcntl
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _build_directory(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@functools.lru_cache(maxsize=None)
def load_extension(op: str, name: str, source: str, extra_cflags: tuple[str, ...] = ()):
    """Compile ``csrc/<source>`` as the Python extension ``name`` (``-O3 -fopenmp`` plus ``extra_cflags``) or load
    the cached build. ``op`` names the kernel in errors, which say how to go on without the build."""
    from torch.utils import cpp_extension

    path = CSRC / source
    if not path.is_file():
        raise RuntimeError(f"{op}: the cpu backend compiles {path}, which is missing (a source checkout or an "
                           "editable install is needed); use backend='reference'")
    build = _build_directory(name)
    build.mkdir(parents=True, exist_ok=True)
    with open(build.parent / f"{name}.geoforge-lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)   # released by the kernel if this process dies
        baton = build / "lock"
        if baton.exists():
            log.warning("%s: removing %s, left by a build that was killed before it finished", op, baton)
            baton.unlink(missing_ok=True)
        try:
            return cpp_extension.load(name=name, sources=[str(path)], build_directory=str(build),
                                      extra_cflags=["-O3", "-fopenmp", *extra_cflags], extra_ldflags=["-fopenmp"])
        except Exception as err:  # compiler missing, no OpenMP, ...
            raise RuntimeError(f"{op}: building the cpu backend from {path} failed (needs a C++ compiler with "
                               f"OpenMP); use backend='reference'. Cause: {err}") from err
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def stale_baton(name: str) -> Path:
    """Where torch's build baton for ``name`` lives (tests plant one there to check that it is cleared)."""
    return _build_directory(name) / "lock"


