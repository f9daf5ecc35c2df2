"""Atomic writes: the one write-to-a-temporary-then-rename helper of the engine.

A file is written to a temporary name in the target's own folder (same file system, so the rename is
atomic), fsynced and renamed over the target; a reader sees the old file or the new one, never half of
one. A folder is filled under a temporary name and renamed into place when complete.

One naming scheme: temporaries start with :data:`TEMP_PREFIX` (hidden, and never matching a target's
glob): ``.tmp-<pid>-<name>`` for files (several processes may write the same target), ``.tmp-<name>`` for
a folder with one writer (a leftover of a killed writer is found and replaced by the next one), and
``.tmp-<name>-<random>`` for a folder that racing processes may all try to create.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def temp_path(target: str | os.PathLike, unique: bool = True) -> Path:
    """The temporary name beside ``target``: ``.tmp-<pid>-<name>`` (``unique``) or ``.tmp-<name>``.

    The name keeps ``target``'s suffix, so writers that pick a format by extension still work."""
    target = Path(target)
    return target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{target.name}" if unique else f"{TEMP_PREFIX}{target.name}")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass   # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def atomic_save(path: str | os.PathLike, write: Callable[[Path], Any], fsync: bool = True) -> Path:
    """Call ``write(tmp)`` to write the file ``tmp``, then rename it to ``path`` (its folder is created).

    On an error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    """``data`` as indented JSON (``indent=1`` unless given) and a final newline."""
    dumps_kwargs.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs) + "\n")


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike, replace: bool = True) -> bool:
    """Rename the complete folder ``tmp`` to ``target``. ``replace``: an existing ``target`` is removed
    first. Otherwise, if ``target`` exists (another process won the race), ``tmp`` is discarded.
    Returns whether ``tmp`` became ``target``."""
    tmp, target = Path(tmp), Path(target)
    if replace and target.exists():
        shutil.rmtree(target)
    try:
        os.rename(tmp, target)
    except OSError:
        if replace or not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    _fsync(target.parent)
    return True


@contextmanager
def atomic_dir(target: str | os.PathLike, unique: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without an error, rename it
    to ``target`` (see :func:`publish_dir` for ``replace``). On an error it is removed.

    ``unique=False``: the folder is ``.tmp-<name>`` (one writer per target; a killed writer's leftover is
    removed first). ``unique=True``: a fresh ``.tmp-<name>-<random>``, for processes racing to create it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent))
    else:
        tmp = temp_path(target, unique=False)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["TEMP_PREFIX", "temp_path", "atomic_save", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "publish_dir", "atomic_dir"]
