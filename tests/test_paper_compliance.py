"""docs/PAPER_COMPLIANCE.md claims only what its tests check: every row of its tables and every item of its lists
cites a test (or says "No test:" and why), and every test it cites exists and is collected by pytest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "docs" / "PAPER_COMPLIANCE.md"
# a cited test: `test_name` or `tests/path/test_file.py::test_name` (backticked)
CITATION = re.compile(r"`((?:tests/[\w/]+\.py::)?test_\w+)`")
NO_TEST = "No test:"


def table_rows(text: str) -> list[tuple[str, str]]:
    """(the row, its test cell) for every body row of every table whose header has a "test" column."""
    rows, column = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is a "|" in a cell
        if column is None:  # a header
            column = cells.index("test") if "test" in cells else -1
            continue
        if set(line) <= set("|-: "):  # the separator
            continue
        if column >= 0:
            rows.append((line, cells[column] if column < len(cells) else ""))
    return rows


def list_items(text: str) -> list[str]:
    """Every top-level list item ("- " or "N. " at the start of a line) with its indented continuation lines."""
    items: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"(- |\d+\. )", line):
            current = [line]
            items.append(current)  # type: ignore[arg-type]
        elif current is not None and line.startswith("  ") and line.strip():
            current.append(line)
        else:
            current = None
    return ["\n".join(item) for item in items]


@pytest.fixture(scope="module")
def collected() -> set[str]:
    """Every test pytest collects (gpu-marked ones included), as "file::name" and bare "name" (parameters dropped)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = set()
    for line in proc.stdout.splitlines():
        if "::" in line and line.startswith("tests/"):
            path, name = line.split("::", 1)
            name = name.split("[")[0].split("::")[-1]
            names |= {f"{path}::{name}", name}
    return names


@pytest.mark.slow
def test_every_row_and_item_of_the_compliance_map_cites_a_test_that_is_collected(collected):
    """Each table row's test cell and each list item name at least one test (an item may instead say "No test:"
    and why), and every test named anywhere in the map is one pytest collects."""
    text = MAP.read_text()
    rows = table_rows(text)
    items = list_items(text)
    assert len(rows) > 50 and len(items) > 40  # the parser reads the map's tables and lists
    bare = [row for row, cell in rows if not CITATION.search(cell)]
    assert not bare, "table rows citing no test:\n" + "\n".join(bare)
    uncited = [item for item in items if not CITATION.search(item) and NO_TEST not in item]
    assert not uncited, "list items citing no test:\n\n" + "\n\n".join(uncited)
    missing = sorted({c for c in CITATION.findall(text) if c not in collected})
    assert not missing, f"cited but not collected by pytest: {missing}"
