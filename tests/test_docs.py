"""Tier 1: the docs say what the tree holds. Every worker module is on the architecture map,
every result file the docs cite exists and every result file is cited, and the README and the
benchmark page stay within the length a reader gets through."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_worker_module_is_on_the_architecture_map():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [p.name for p in sorted((ROOT / "worker").glob("*.py"))
               if p.name != "__init__.py" and f"worker/{p.name}" not in text]
    assert not missing, f"docs/architecture.md does not map {missing}"


def test_every_cited_result_exists_and_every_result_is_cited():
    cited = set()
    for doc in DOCS:
        cited |= set(re.findall(r"(?:bench/results/)?((?:[a-z_]+)-20\d\d-[\w.-]+\.(?:json|txt))",
                                doc.read_text()))
    present = {p.name for p in (ROOT / "bench" / "results").iterdir() if p.is_file()}
    assert not cited - present, f"cited but missing: {sorted(cited - present)}"
    assert not present - cited, f"not cited by any doc: {sorted(present - cited)}"


def test_the_readme_and_the_benchmark_page_stay_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    assert len((ROOT / "docs" / "benchmarks.md").read_text().splitlines()) <= 250
