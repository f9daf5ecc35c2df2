"""The README a newcomer reads stays short, its links and the docs pages' links lead somewhere, and it holds
the install and test commands CI runs (``.ci/run`` installs "exactly as the README says", then runs the
README's test command).

- ``README.md`` is at most 160 lines (the rest lives in ``docs/``);
- every relative link in ``README.md`` and ``docs/*.md`` (``[text](path)``, ``![alt](path)``) names a file or
  folder that exists, and a ``#fragment`` into a Markdown file names one of its headings (GitHub's anchors);
- the ``pip install`` and ``pytest`` lines of ``.ci/run`` appear in the README's shell blocks (``python -m pip``
  and ``pip`` are the same command in the activated virtual environment the README creates).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 160

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")          # http:, https:, mailto:, hf:, ...


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where ``[x](y)`` is not a link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, at most {MAX_README_LINES}: move detail to a page under docs/ "
        f"and link it from 'Where to go next'")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    broken = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def ci_commands() -> dict[str, str]:
    """The install and test command lines ``.ci/run`` executes."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    install = [ln for ln in lines if re.match(r"(python3? -m )?pip install\b", ln)]
    tests = [ln for ln in lines if re.match(r"(python3? -m )?pytest\b", ln)]
    assert len(install) == 1 and len(tests) == 1, f".ci/run: expected one pip install and one pytest line, got " \
                                                  f"{install} and {tests}"
    return {"install": install[0], "test": tests[0]}


def shell_commands(text: str) -> list[str]:
    """The commands of the README's shell blocks: each line split at ``&&`` (comments dropped)."""
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out += [part.strip() for part in line.split("&&")]
    return out


def same_command(a: str, b: str) -> bool:
    def norm(command: str) -> str:
        return " ".join(re.sub(r"^python3? -m (pip|pytest)\b", r"\1", command.strip()).split())
    return norm(a) == norm(b)


def test_ci_runs_the_readme_commands():
    ci = ci_commands()
    assert ci["install"].endswith('install -e ".[dev]"') and ci["test"] == "python -m pytest -q -n auto --dist loadfile tests", ci
    commands = shell_commands(README.read_text(encoding="utf-8"))
    for what, line in ci.items():
        assert any(same_command(line, c) for c in commands), (
            f"README.md has no shell command equal to .ci/run's {what} command `{line}`: CI runs the README's "
            f"commands, so change both together")
    # the test command as written, verbatim
    assert ci["test"] in commands
