"""``kernels/_cpp.py``: a build killed half-way must not hang every later load.

torch's ``cpp_extension.load`` waits forever on ``<build dir>/lock`` when the process that created it died
mid-build (seen here: a machine restart during a build left one, and the next test run hung in
``file_baton.wait`` until CI's time ran out). The loader clears such a baton under a lock the kernel releases
on death, so the load below finishes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from processes import subprocess_env
from geoforge.kernels import _cpp

LOAD = ("from geoforge.kernels import _cpp; "
        "ext = _cpp.load_extension('align', 'geoforge_align_tail', 'align_tail.cpp'); "
        "print('loaded', hasattr(ext, 'tail'))")


def test_a_stale_build_baton_is_cleared_not_waited_on() -> None:
    baton = _cpp.stale_baton("geoforge_align_tail")
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.touch()   # what a build killed before it finished leaves behind
    proc = subprocess.run([sys.executable, "-c", LOAD], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded True" in proc.stdout
    assert "left by a build that was killed" in proc.stderr
    assert not baton.exists()


def test_a_missing_source_names_the_file_and_the_way_on() -> None:
    with pytest.raises(RuntimeError, match=r"no_such_file\.cpp.*backend='reference'"):
        _cpp.load_extension("align", "geoforge_nothing", "no_such_file.cpp")
