"""No benchmark calibrates, trains or chooses on what it is scored on: every eval sample is checked
against every other split's samples, and an overlap raises :class:`DataOverlap`.

A sample is its input: a row of the inputs tensor (token ids without their trailing padding, so a
sentence padded to another length is still the same sentence), or a string. Loaders are read
without drawing from any random generator (a shuffled loader's order, and so the training, is the
same as if it had not been checked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from torchslim.engine.specs import DataSpec, build_data

EVAL = "eval"


class DataOverlap(ValueError):
    """Some evaluation samples are also calibration, training or validation samples."""


def check_disjoint(evaluation: Any, **others: Any) -> None:
    """Raise :class:`DataOverlap` if any sample of ``evaluation`` is a sample of one of ``others``
    (``calibration=loader, train=loader``: a loader, a list of batches, a tensor or a list of strings)."""
    keys = sample_keys(evaluation)
    seen = set(keys)
    for name, split in others.items():
        shared = seen.intersection(sample_keys(split))
        if shared:
            first = next(i for i, key in enumerate(keys) if key in shared)
            raise DataOverlap(
                f"{len(shared)} of the {len(seen)} distinct eval samples are also {name} samples "
                f"(the first: eval sample {first}); a benchmark's calibration, training and validation "
                "data must never overlap its evaluation data"
            )


def check_splits(data: Mapping[str, Any]) -> None:
    """Every split of a recipe's data (``train``, ``calibration``, ``validation``, ...) disjoint from ``eval``."""
    check_disjoint(data[EVAL], **{name: split for name, split in data.items() if name != EVAL and split is not None})


def checked_data(target: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A recipe's data factory (``target`` called with ``kwargs``), its splits checked by :func:`check_splits`
    before any stage sees them. Bench recipes name this as their data target (:func:`checked_spec`)."""
    data = build_data(DataSpec(target=target, kwargs=dict(kwargs or {})))
    check_splits(data)
    return data


def checked_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe's ``data`` section rewritten so that the run builds it through :func:`checked_data`."""
    if spec.get("target") == f"{__name__}:checked_data":
        return dict(spec)
    return {"target": f"{__name__}:checked_data", "kwargs": {"target": spec["target"], "kwargs": dict(spec.get("kwargs") or {})}}


def sample_keys(split: Any) -> list[bytes | str]:
    """One key per sample of ``split``, in order (equal keys: the same sample)."""
    return [_key(sample) for sample in _samples(split)]


def _samples(split: Any) -> Iterator[Any]:
    if isinstance(split, str):
        yield split
    elif isinstance(split, torch.Tensor):
        yield from split.reshape(len(split), -1)
    elif isinstance(split, DataLoader):
        yield from _dataset_samples(split.dataset)
    else:
        with _generators_kept(split):
            batches = list(split)
        for batch in batches:
            yield from _samples(_inputs(batch))


def _dataset_samples(dataset: Any) -> Iterator[Any]:
    # The dataset, not the loader: iterating a shuffling loader would draw from its generator.
    if isinstance(dataset, TensorDataset):
        yield from _samples(dataset.tensors[0])
    else:
        yield from (_inputs(dataset[index]) for index in range(len(dataset)))


def _inputs(batch: Any) -> Any:
    """The inputs of a batch: the first element of an ``(inputs, targets)`` pair."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], str) else batch


def _key(sample: Any) -> bytes | str:
    if isinstance(sample, str):
        return " ".join(sample.lower().split()).rstrip(".!?")
    values = sample.detach().cpu().reshape(-1)
    if not values.is_floating_point():
        nonzero = torch.nonzero(values)
        values = values[: int(nonzero[-1]) + 1] if len(nonzero) else values[:0]  # token ids: trailing padding dropped
    return str(values.dtype).encode() + hashlib.blake2b(values.contiguous().numpy().tobytes(), digest_size=16).digest()


@contextmanager
def _generators_kept(split: Iterable[Any]) -> Iterator[None]:
    """Put back torch's global generator and ``split.generator`` as they were: reading the samples
    must not change the order a later pass draws."""
    own = getattr(split, "generator", None)
    saved = torch.random.get_rng_state(), own.get_state() if isinstance(own, torch.Generator) else None
    try:
        yield
    finally:
        torch.random.set_rng_state(saved[0])
        if isinstance(own, torch.Generator) and saved[1] is not None:
            own.set_state(saved[1])
