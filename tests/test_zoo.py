"""The zoo of real architectures (bench/zoo.py): ``--quick`` runs a handful of timm models end to end.

timm is not a dependency of torchslim: it is installed apart (docs/zoo.md) into ``ZOO_SITE``
(default /tmp/zoo-site). Without it the test is skipped, saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import zoo

ROOT = Path(__file__).resolve().parent.parent


def _timm_importable() -> str | None:
    try:
        zoo._timm()
    except ImportError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_zoo_quick_prunes_and_quantizes_real_architectures(tmp_path: Path) -> None:
    problem = _timm_importable()
    if problem:
        pytest.skip(f"timm is not importable ({problem}); see docs/zoo.md")
    out = tmp_path / "zoo.json"
    done = subprocess.run([sys.executable, "-m", "bench.zoo", "--quick", "--timeout", "300", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| model |" in done.stdout and "Traceback" not in done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert {r["model"] for r in results} == set(zoo.QUICK)
    for result in results:
        assert result["ok"], result
        if result["recipe"] == "structured":
            assert result["pruned"] >= 0.8 * zoo.AMOUNT and result["macs"] > 1.3, result
    vit = next(r for r in results if r["model"] == "vit_tiny_patch16_224" and r["recipe"] == "structured")
    assert vit["macs"] >= 1.8  # attention pruned by whole heads, not left as plain Linear groups
