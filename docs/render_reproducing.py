"""Render docs/reproducing.md from docs/reproducing.yaml (the reproduction tables of the paper recipes).

    python docs/render_reproducing.py           # rewrite docs/reproducing.md
    python docs/render_reproducing.py --check   # exit 1 when the page is not the rendering of the table

tests/test_reproducing.py checks the same, and the table's rows against the recipes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TABLE = HERE / "reproducing.yaml"
PAGE = HERE / "reproducing.md"
HEADER = ("area", "setting", "official", "source", "GeoForge", "status", "note")


def load(path: Path = TABLE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def value_text(value: Any) -> str:
    """A YAML value as one line of text (lists in brackets, floats in their short form)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return " ".join(str(value).split())


MARKDOWN_ESCAPES = {"|": "\\|", "<": "&lt;", ">": "&gt;", "*": "\\*", "__": "\\_\\_"}


def cell(text: str) -> str:
    """Text for a Markdown table cell: pipes, angle brackets, stars and double underscores escaped."""
    for raw, escaped in MARKDOWN_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


def training_overrides(table: dict[str, Any]) -> list[str]:
    """The ``--set`` of the table's ``key`` rows outside evaluation (those bring training to the published run)."""
    return [s for row in table["rows"] if row["status"] == "key" and row["area"] != "evaluation" for s in row["set"]]


def row_line(row: dict[str, Any]) -> str:
    key = row.get("geoforge_key")
    value = cell(value_text(row["geoforge_value"]))
    geoforge = f"`{key}` = {value}" if key else value
    note = cell(value_text(row.get("note") or ""))
    if row["status"] == "key":
        sets = " ".join(f"`--set {s}`" for s in row["set"])
        note = f"{sets}. {note}" if note else sets
    cells = (cell(value_text(row["area"])), cell(value_text(row["setting"])), cell(value_text(row["official"])),
             cell(value_text(row["source"])), geoforge, f"**{row['status']}**", note)
    return "| " + " | ".join(cells) + " |"


def render_table(table: dict[str, Any]) -> list[str]:
    name = table["recipe"] + (f" - {table['variant']}" if table.get("variant") else "")
    off = table["official"]
    rows = table["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("same", "different", "key")}
    out = [f"## `{name}`", "", table["title"], "",
           f"Official code: `{off['repo']}` at `{off['commit']}` ({off['date']}; {off['read']}).", "",
           value_text(table["note"]), "",
           f"{len(rows)} rows: {counts['same']} same, {counts['different']} different, {counts['key']} key.", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += [row_line(r) for r in rows]
    sets = training_overrides(table)
    if sets:
        command = [f"deepspeed --num_gpus 8 engine/train.py --recipe {table['recipe']}"]
        command += [f"    --set '{s}'" for s in sets]
        out += ["", "The `key` rows' overrides (evaluation rows aside), all at once:", "",
                "```bash", " \\\n".join(command), "```"]
    return out + [""]


def render(data: dict[str, Any]) -> str:
    lines = [data["intro"].rstrip("\n"), ""]
    for table in data["tables"]:
        lines += render_table(table)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render(load())
    if "--check" in argv:
        if PAGE.read_text() != text:
            print(f"{PAGE} is not the rendering of {TABLE}: run python docs/render_reproducing.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
