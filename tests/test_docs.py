"""The docs promise what the tests show: every test that docs/reliability.md cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cited_tests() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    return re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text)


def test_every_row_of_the_reliability_table_cites_a_test():
    rows = [
        line
        for line in (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and not line.startswith("| input") and "---" not in line
    ]
    assert len(rows) >= 30
    missing = [row for row in rows if not re.search(r"`tests/test_\w+\.py::test_\w+`", row)]
    assert not missing, missing


def test_every_test_the_reliability_table_cites_exists():
    cited = _cited_tests()
    assert cited
    absent = []
    for file, name in cited:
        path = ROOT / file
        if not path.is_file() or not re.search(rf"^def {name}\(", path.read_text(), re.M):
            absent.append(f"{file}::{name}")
    assert not absent, absent
