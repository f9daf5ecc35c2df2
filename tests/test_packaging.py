"""GeoForge's import names never collide with another distribution's, whatever the current directory.

GeoForge's folders ``engine/`` and ``kernels/`` are imported as ``geoforge.engine`` and ``geoforge.kernels``
(pyproject.toml, docs/architecture.md); neither folder is a regular package, so from the repository root (first
on ``sys.path`` under ``python -c`` and ``python -m``) the bare name ``kernels`` is still Hugging Face's kernel-hub
package, which transformers 5.x imports. Before the namespace, ``import peft`` failed from the root
(``cannot import name 'CUDAProperties' from 'kernels' (.../kernels/__init__.py)``) and, from elsewhere,
``kernels.align`` was found as a stray submodule of Hugging Face's package.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "kernels")   # imported as geoforge.engine, geoforge.kernels

# Runs in a fresh interpreter: GeoForge's kernels first, then the stack that imports Hugging Face's `kernels`.
PROBE = """
import json, sys
import geoforge.kernels.align, geoforge.kernels.reproject, geoforge.kernels.film_norm, geoforge.engine.config
import peft, diffusers
import transformers.integrations.hub_kernels
from transformers.utils.import_utils import is_kernels_available
import geoforge.engine.videogpa.lora   # GeoForge's own use of peft
mods = ("geoforge.kernels.align", "geoforge.engine.config", "geoforge.engine.videogpa.lora", "peft", "diffusers",
        "transformers", "kernels")
print("PROBE " + json.dumps({"files": {m: sys.modules[m].__file__ for m in mods},
                            "hub_kernels": is_kernels_available(),
                            "stray": sorted(m for m in sys.modules if m.split(".")[0] == "engine"
                                            or m in {"kernels." + s for s in OURS})}))
"""


def _site_file(dist: str, relative: str) -> Path:
    return Path(importlib.metadata.distribution(dist).locate_file(relative)).resolve()


@pytest.mark.parametrize("where,pythonpath", [("root", False), ("elsewhere", False), ("root", True)],
                         ids=["repo-root", "other-dir", "repo-root-on-PYTHONPATH"])
def test_geoforge_and_the_hugging_face_stack_import_side_by_side(where, pythonpath, tmp_path):
    """``python -c`` from the repository root (the root first on sys.path), from another directory, and with the
    root on PYTHONPATH (as profiling/gpu_check.sh sets it): every name resolves to the file it should."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    ours = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))
    proc = subprocess.run([sys.executable, "-c", f"OURS = {ours!r}\n" + PROBE],
                          cwd=ROOT if where == "root" else tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("PROBE ")))
    files = {k: Path(v).resolve() for k, v in probe["files"].items()}
    assert files["geoforge.kernels.align"] == ROOT / "kernels" / "align.py"      # this checkout, installed editable
    assert files["geoforge.engine.config"] == ROOT / "engine" / "config.py"
    assert files["geoforge.engine.videogpa.lora"] == ROOT / "engine" / "videogpa" / "lora.py"
    assert files["kernels"] == _site_file("kernels", "kernels/__init__.py")       # Hugging Face's, not ours
    assert files["peft"] == _site_file("peft", "peft/__init__.py")
    assert files["diffusers"] == _site_file("diffusers", "diffusers/__init__.py")
    assert files["transformers"] == _site_file("transformers", "transformers/__init__.py")
    assert probe["hub_kernels"] is True
    assert probe["stray"] == [], probe["stray"]   # no module of GeoForge's imported under a bare folder name


def test_no_folder_of_the_checkout_is_a_top_level_package():
    """A folder with an ``__init__.py`` at the root would be a regular package named by the folder whenever the
    root is on sys.path, and would shadow any installed package of that name."""
    regular = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert regular == [], regular


def test_geoforge_is_the_only_top_level_name_it_installs():
    provided = {name for name, dists in importlib.metadata.packages_distributions().items() if "geoforge" in dists}
    assert provided == {"geoforge"}, provided
    others = [d for d in importlib.metadata.packages_distributions().get("geoforge", []) if d != "geoforge"]
    assert others == [], f"another distribution also installs a top-level 'geoforge': {others}"


def _listed_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_pyproject_lists_every_package_folder():
    """setuptools gets an explicit list (a mapped namespace cannot be found automatically): it must match the tree."""
    tree = {"geoforge." + ".".join(p.relative_to(ROOT).parts) for top in FOLDERS
            for p in [ROOT / top, *(ROOT / top).rglob("*")] if p.is_dir() and any(p.glob("*.py"))}
    listed = set(_listed_packages())
    assert tree <= listed, f"package folders missing from pyproject.toml: {sorted(tree - listed)}"
    assert listed - tree == {"geoforge.csrc", "geoforge.recipes"}, sorted(listed - tree)


def test_no_code_imports_a_bare_folder_name():
    """``from engine.x import y`` would load a second copy of a module under another name (from the root only)."""
    bare = re.compile(r"^\s*(from|import)\s+(engine|kernels)(\.|\s|$)", re.M)
    bad = [f"{p.relative_to(ROOT)}:{src[:m.start()].count(chr(10)) + 1}"
           for top in ("engine", "kernels", "profiling", "tests") for p in (ROOT / top).rglob("*.py")
           for src in [p.read_text()] for m in bare.finditer(src)]
    assert bad == [], bad


def test_a_plain_install_holds_only_the_namespace_and_finds_its_data(tmp_path):
    """A non-editable install (a wheel) puts every file under ``geoforge/`` (no ``kernels/`` folder shared with
    Hugging Face's) and brings the C++ sources and recipes that the modules look for beside them."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("geoforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"geoforge", wheel.name.split("-py")[0] + ".dist-info"}
    for top in ("csrc", "recipes"):
        shipped = {n.split("/")[-1] for n in names if n.startswith(f"geoforge/{top}/")}
        assert shipped == {p.name for p in (ROOT / top).iterdir() if p.is_file()}, top
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = ("import json, geoforge.kernels.align as a, geoforge.engine.config as c, kernels;"
             "print(json.dumps([a.__file__, str(a.CSRC), str(c.RECIPES_DIR), kernels.__file__]))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    align, csrc, recipes, hf = map(Path, json.loads(proc.stdout.splitlines()[-1]))
    assert align.is_relative_to(target) and csrc.is_file() and (recipes / "gf_tiny.yaml").is_file()
    assert hf == _site_file("kernels", "kernels/__init__.py")
