"""Sentences to distil MiniLM on that are not the sentences it is scored on.

The bundled sentences (``torchslim/examples/data/sentences.txt``, everyday English) are the
eval set. Distillation trains on other text: sentences of Python's own reference documentation
(``pydoc_data.topics``, shipped with CPython), so a pruned model is not scored on what it was
trained on. The targets are the float model's embeddings, as in ``torchslim.examples.minilm``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

#: Sentences with markup, code or ellipses read poorly as prose: they are left out.
_CODE = re.compile(r"[{}\[\]=<>_*`|\\#]|\.\.\.|::|--")


@lru_cache(maxsize=4)
def doc_sentences(limit: int | None = None, min_words: int = 6, max_words: int = 30) -> tuple[str, ...]:
    """Prose sentences from Python's reference documentation, in a fixed order (the first ``limit``)."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[key] for key in sorted(topics)))
    found: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        words = len(sentence.split())
        if min_words <= words <= max_words and sentence[:1].isupper() and not _CODE.search(sentence) and sentence not in found:
            found.append(sentence)
    return tuple(found[:limit])


def loaders(train_sentences: int | None = 1000, batch_size: int = 32, max_length: int = 64,
            seed: int = 0) -> dict[str, DataLoader[Any]]:
    """Train and calibration: documentation sentences; eval: the bundled everyday sentences.
    Inputs are token ids, targets the float MiniLM's embeddings (the metric is
    ``torchslim.examples.minilm:cosine``)."""
    from torchslim.examples import minilm

    teacher = minilm.model()
    train = _embedded(teacher, minilm.tokenize(list(doc_sentences(train_sentences)), max_length))
    evaluation = _embedded(teacher, minilm.tokenize(minilm.read_sentences(), 128))
    return {
        "train": DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        "calibration": DataLoader(train, batch_size=batch_size),
        "eval": DataLoader(evaluation, batch_size=batch_size),
    }


def _embedded(model: torch.nn.Module, ids: torch.Tensor) -> TensorDataset:
    with torch.inference_mode():
        targets = torch.cat([model(chunk) for chunk in ids.split(64)])
    return TensorDataset(ids, targets)
