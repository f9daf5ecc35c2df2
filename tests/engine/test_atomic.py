"""engine.atomic: files and folders appear whole or not at all; temporaries follow one naming scheme."""
from __future__ import annotations

import json
import os

import pytest

from geoforge.engine.atomic import (TEMP_PREFIX, atomic_dir, atomic_save, atomic_write_json, atomic_write_text, publish_dir,
                           temp_path)


def test_temp_names_sit_beside_the_target_and_keep_its_suffix(tmp_path):
    target = tmp_path / "clip.mp4"
    assert temp_path(target) == tmp_path / f"{TEMP_PREFIX}{os.getpid()}-clip.mp4"
    assert temp_path(target, unique=False) == tmp_path / f"{TEMP_PREFIX}clip.mp4"


def test_files_are_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_save(path, broken)
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_folders_appear_complete_replace_or_lose_the_race(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        assert tmp.name == f"{TEMP_PREFIX}out" and not target.exists()
        (tmp / "f").write_text("1")
    assert (target / "f").read_text() == "1"
    with atomic_dir(target) as tmp:          # replace=True: the new folder wins
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["g"]
    with atomic_dir(target, unique=True, replace=False) as tmp:   # another writer made it first: ours goes
        (tmp / "h").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["g"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "never") as tmp:
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_dir_replaces_by_default(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("")
    assert publish_dir(tmp_path / "a", tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []
