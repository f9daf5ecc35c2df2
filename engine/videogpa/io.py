"""Files of the VideoGPA stages: atomic JSON lines (through :mod:`engine.atomic`), JSON lines that survive a kill, stage markers."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from geoforge.engine.atomic import atomic_write_text


def dumps_row(row: dict[str, Any]) -> str:
    """One JSON line (keys in insertion order, floats as Python's shortest round-trip repr)."""
    return json.dumps(row, allow_nan=False)


def atomic_write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(dumps_row(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a complete JSON-lines file; a malformed line raises ValueError naming file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from err
    return rows


class AppendLog:
    """An append-only JSON-lines progress file: one fsynced line per finished item.

    A kill can leave a truncated last line; :meth:`rows` ignores it and :meth:`repair` rewrites the file
    without it, so appending can continue.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the line a kill cut short
        return rows

    def repair(self) -> list[dict[str, Any]]:
        rows = self.rows()
        if self.path.is_file():
            atomic_write_jsonl(self.path, rows)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(dumps_row(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_marker(path: Path, info: dict[str, Any]) -> None:
    """A stage's completion marker (JSON), written last."""
    atomic_write_text(path, json.dumps(info, indent=1, sort_keys=True) + "\n")


def read_marker(path: Path) -> dict[str, Any] | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["atomic_write_jsonl", "read_jsonl", "dumps_row", "AppendLog", "write_marker",
           "read_marker"]
