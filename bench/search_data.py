"""The data of bench/search_bench.py: a search chooses on a selection split and is scored on a test split it never saw.

A search maximises the recipe's metric on the ``eval`` split, so that split is the one it chooses on. Here the
recipes' ``eval`` is a *selection* split, and :func:`held_out` gives the held-out test split the benchmark scores
the chosen trials (and the hand-written recipes) on. Every split is disjoint from the others (checked by
:mod:`bench.disjoint` when the data is built and again before the test scoring):

- digits: the bundled 1,797 images' usual split (:func:`torchslim.examples.digits.split`: the residual CNN trains on
  its 1,437 train images); its 360 eval images are halved, the first 180 to select, the last 180 to test.
- MNIST: train on the 50,000 training images, calibrate on the first 2,048 validation images (as
  :func:`torchslim.examples.mnist.loaders`); the 10,000 test images are halved, the first 5,000 to select, the last
  5,000 to test. Not the validation images: ccexam's CNN scores 99.86% on them against 99.05% on the test images
  (most likely it was trained on MNIST's 60,000 training images, which hold them), so a search would choose on images
  the model learnt.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, TensorDataset

from torchslim.examples import digits as digits_data
from torchslim.examples import mnist as mnist_data

#: MNIST test images the search selects on, and those the benchmark scores on.
MNIST_SELECTION, MNIST_TEST = slice(0, 5000), slice(5000, 10000)


def digits(batch_size: int = 64) -> dict[str, DataLoader[Any]]:
    """The digits residual CNN's loaders (``image=True``) with ``eval`` the selection half of the eval split."""
    data = digits_data.loaders(batch_size=batch_size, image=True)
    data["eval"] = DataLoader(_digits_half(first=True), batch_size=256)
    return data


def mnist(batch_size: int = 64) -> dict[str, DataLoader[Any]]:
    """The MNIST CNN's train and calibration loaders, with ``eval`` the selection half of the test images."""
    data = mnist_data.loaders(batch_size=batch_size)
    data["eval"] = DataLoader(_mnist_test(MNIST_SELECTION), batch_size=500)
    return data


def held_out(name: str) -> DataLoader[Any]:
    """The held-out test split of ``digits`` or ``mnist``."""
    if name == "digits":
        return DataLoader(_digits_half(first=False), batch_size=256)
    if name == "mnist":
        return DataLoader(_mnist_test(MNIST_TEST), batch_size=500)
    raise ValueError(f"unknown data {name!r}: digits or mnist")


def _mnist_test(part: slice) -> TensorDataset:
    return TensorDataset(*(t[part] for t in mnist_data.dataset("test").tensors))


def _digits_half(first: bool) -> TensorDataset:
    images, labels = digits_data.split()["eval"].tensors
    half = len(labels) // 2
    part = slice(0, half) if first else slice(half, None)
    return TensorDataset(images[part].view(-1, 1, 8, 8), labels[part])
