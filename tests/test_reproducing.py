"""The reproduction tables (docs/reproducing.yaml) hold against the paper recipes, and the page is their rendering.

- every table names a recipe that exists;
- every row marked ``same`` with a ``geoforge_key`` finds, at that dotted key of the loaded recipe, the table's
  ``geoforge_value`` (the failure names recipe, key, expected and found);
- every ``geoforge_key`` resolves in its recipe;
- every ``key`` row's ``--set`` overrides load (alone, and a table's non-evaluation ones all together, as the page
  prints them) and set the row's key;
- docs/reproducing.md is exactly ``python docs/render_reproducing.py``'s output.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest

from geoforge.engine.config import ConfigError, find_recipe, load_recipe, parse_override
from geoforge.engine.schema import to_dict

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("same", "different", "key")
FIELDS = {"area", "setting", "official", "source", "geoforge_key", "geoforge_value", "status", "note"}


def _renderer():
    spec = importlib.util.spec_from_file_location("render_reproducing", ROOT / "docs" / "render_reproducing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDER = _renderer()
DATA = RENDER.load()
TABLES = DATA["tables"]
IDS = [t["recipe"] + (f"-{t['variant']}" if t.get("variant") else "") for t in TABLES]


def lookup(tree: Any, key: str) -> Any:
    """The value at dotted ``key`` of a recipe dict; KeyError naming the first missing part."""
    node = tree
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(".".join(key.split(".")[: i + 1]))
        node = node[part]
    return node


def normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            return value
    return value


def equal(a: Any, b: Any) -> bool:
    a, b = normalise(a), normalise(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return type(a) is type(b) and a == b


def recipe_dict(name: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    return to_dict(load_recipe(name, list(overrides)))


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_rows_are_well_formed(table):
    assert table["official"]["repo"] and len(table["official"]["commit"]) == 40, table["official"]
    for row in table["rows"]:
        where = f"{table['recipe']}: {row.get('area')} / {row.get('setting')}"
        assert FIELDS <= set(row) <= FIELDS | {"set"}, f"{where}: fields {sorted(row)}"
        assert row["status"] in STATUSES, f"{where}: status {row['status']!r} (one of {STATUSES})"
        assert row["source"], f"{where}: no source"
        if row["status"] == "key":
            assert row["geoforge_key"] and row.get("set"), f"{where}: a key row needs geoforge_key and set"
        else:
            assert "set" not in row, f"{where}: set belongs to key rows only"


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_the_recipe_exists(table):
    try:
        find_recipe(table["recipe"])
    except ConfigError as err:
        pytest.fail(f"docs/reproducing.yaml lists recipe {table['recipe']!r}, which does not exist: {err}")


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_same_rows_match_the_recipe(table):
    name = table["recipe"]
    tree = recipe_dict(name)
    drift = []
    for row in table["rows"]:
        key = row["geoforge_key"]
        if row["status"] != "same" or not key:
            continue
        try:
            found = lookup(tree, key)
        except KeyError as err:
            drift.append(f"{name}: {key}: no such key ({err.args[0]} is missing)")
            continue
        if not equal(found, row["geoforge_value"]):
            drift.append(f"{name}: {key}: expected {row['geoforge_value']!r} (docs/reproducing.yaml, "
                         f"{row['setting']!r}), found {found!r}")
    assert not drift, "recipe values marked 'same' drifted from the reproduction table:\n" + "\n".join(drift)


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_every_key_resolves(table):
    tree = recipe_dict(table["recipe"])
    missing = []
    for row in table["rows"]:
        if row["geoforge_key"]:
            try:
                lookup(tree, row["geoforge_key"])
            except KeyError:
                missing.append(f"{table['recipe']}: {row['geoforge_key']} ({row['setting']!r})")
    assert not missing, "geoforge_key not in the recipe:\n" + "\n".join(missing)


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_key_rows_overrides_load_and_set_the_key(table):
    name = table["recipe"]
    for row in table["rows"]:
        if row["status"] != "key":
            continue
        tree = recipe_dict(name, row["set"])
        for text in row["set"]:
            keys, value = parse_override(text)
            key = ".".join(keys)
            assert equal(lookup(tree, key), value), f"{name}: --set {text} left {key} = {lookup(tree, key)!r}"
        assert any(parse_override(t)[0] == row["geoforge_key"].split(".") for t in row["set"]), (
            f"{name}: the key row {row['setting']!r} sets none of its geoforge_key {row['geoforge_key']}")
    together = RENDER.training_overrides(table)
    if together:
        recipe_dict(name, together)   # the page's all-at-once command loads


def test_page_is_the_rendering_of_the_table():
    page = (ROOT / "docs" / "reproducing.md").read_text()
    assert page == RENDER.render(DATA), ("docs/reproducing.md is not the rendering of docs/reproducing.yaml: "
                                         "run python docs/render_reproducing.py")
