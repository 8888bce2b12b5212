"""Every failure mode the model zoo met, reproduced on tiny models: through the console script, each
ends with one located error line and no raw traceback (``--debug`` shows it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # one torch subprocess per mode

MODELS = '''
import torch
from torch import nn


def convs():
    """Convolutions only, like dla34's 1x1 conv classifier: dynamic int8 has no Linear to take."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 10, 1),
                         nn.Flatten())


class Fragile(nn.Module):
    """A forward that hard-codes a channel count (poolformer's layer scale): it breaks once channels go."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[1] != 8:
            raise RuntimeError(f"expected 8 channels, got {y.shape[1]}")
        return self.head(y.mean((2, 3)))


def fragile():
    return Fragile()
'''


def recipe(folder: Path, target: str, stage: dict) -> Path:
    data = {
        "name": "mode",
        "model": {"target": target},
        "data": {"target": "torchslim.examples.digits:loaders", "kwargs": {"image": True}},
        "metrics": {"latency": False},
        "stages": [stage],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


MODES = [
    ("no-layer-to-quantize", "zoomodels:convs", {"type": "quantize", "method": "dynamic"}),
    (
        "graph-time-limit",
        "torchslim.examples.digits:resnet",
        {"type": "prune", "method": "structured", "amount": 0.3, "time_limit": 1e-9},
    ),
    ("unmatched-exclude", "zoomodels:fragile", {"type": "prune", "method": "structured", "amount": 0.3, "exclude": ["hed"]}),
    ("forward-breaks-after-cut", "zoomodels:fragile", {"type": "prune", "method": "structured", "amount": 0.3}),
    ("nm-no-fitting-layer", "zoomodels:convs", {"type": "prune", "method": "nm", "modules": ["Conv2d"], "m": 16}),
]


@pytest.mark.parametrize(("target", "stage"), [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_failure_is_one_located_line_without_traceback(tmp_path: Path, target: str, stage: dict) -> None:
    (tmp_path / "zoomodels.py").write_text(MODELS)
    path = recipe(tmp_path, target, stage)
    env = {**os.environ, "TORCHSLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torchslim", "run", str(path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode in (1, 2), done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("torchslim: error:")]
    assert len(errors) == 1 and "stage " in errors[0] and "stages[0]" in done.stderr, done.stderr
