"""The README's results are docs/bench.md's headline, copied: the two never drift apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _block(path: Path) -> str:
    match = re.search(r"<!-- results:start -->\n(.*?)<!-- results:end -->", path.read_text(), re.S)
    assert match, f"{path.name} has no results block"
    return match[1]


def test_readme_results_are_bench_md_headline() -> None:
    headline = _block(ROOT / "docs" / "bench.md")
    assert "|" in headline  # a table, not an empty block
    assert _block(ROOT / "README.md") == headline


def test_readme_reads_in_ten_minutes() -> None:
    words = len((ROOT / "README.md").read_text().split())
    assert words < 2500, words  # about 250 words a minute
