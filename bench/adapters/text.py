"""Sentences to distil MiniLM on that are not the sentences it is scored on.

The bundled sentences (``torchslim/examples/data/sentences.txt``, everyday English) are the
eval set. Distillation trains on other text: sentences of Python's own reference documentation
(``pydoc_data.topics``, shipped with CPython), so a pruned model is not scored on what it was
trained on. The targets are the float model's embeddings, as in ``torchslim.examples.minilm``.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
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


@lru_cache(maxsize=1)
def docstring_sentences(min_words: int = 6, max_words: int = 30) -> tuple[str, ...]:
    """Prose sentences of the docstrings of CPython's standard library (its top-level ``.py`` files, read
    with ``ast``, nothing imported), sorted: about 4,700 for CPython 3.12. More text to distil on than the
    documentation alone, from the same Python, so the same on every machine with that version."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    found: set[str] = set()
    for path in paths:
        try:
            tree = ast.parse(path.read_text("utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and (doc := ast.get_docstring(node)):
                found.update(_prose(doc, min_words, max_words))
    return tuple(sorted(found))


def _prose(text: str, min_words: int, max_words: int) -> list[str]:
    sentences = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return [s for s in sentences if min_words <= len(s.split()) <= max_words and s[:1].isupper() and not _CODE.search(s)]


def loaders(train_sentences: int | None = 1000, batch_size: int = 32, max_length: int = 64,
            seed: int = 0, docstrings: bool = False) -> dict[str, Any]:
    """Train and calibration: documentation sentences (and, with ``docstrings``, the standard library's
    docstrings); eval: the bundled everyday sentences. Inputs are token ids, targets the float MiniLM's
    embeddings (the metric is ``torchslim.examples.minilm:cosine``). With ``docstrings`` each training
    batch is padded to its own longest sentence (sorted by length), not to the longest of all."""
    from torchslim.examples import minilm

    teacher = minilm.model()
    sentences = list(doc_sentences(train_sentences)) + (list(docstring_sentences()) if docstrings else [])
    evaluation = _embedded(teacher, minilm.tokenize(minilm.read_sentences(), 128))
    if docstrings:
        train: Any = _batches(teacher, sentences, batch_size, max_length)
        return {"train": _Shuffled(train, seed), "calibration": train, "eval": DataLoader(evaluation, batch_size=batch_size)}
    dataset = _embedded(teacher, minilm.tokenize(sentences, max_length))
    return {
        "train": DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        "calibration": DataLoader(dataset, batch_size=batch_size),
        "eval": DataLoader(evaluation, batch_size=batch_size),
    }


Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(teacher: torch.nn.Module, sentences: list[str], size: int, max_length: int) -> list[Batch]:
    """(ids, targets) batches of sentences of similar length, each padded to its own longest."""
    from torchslim.examples import minilm

    ordered = sorted(sentences, key=len)
    batches = []
    for start in range(0, len(ordered), size):
        ids = minilm.tokenize(ordered[start:start + size], max_length)
        with torch.no_grad():  # not inference_mode: the targets enter the distillation loss, under autograd
            batches.append((ids, teacher(ids)))
    return batches


class _Shuffled:
    """The batches in a new seeded order on every pass (an epoch)."""

    def __init__(self, batches: list[Batch], seed: int) -> None:
        self.batches, self.generator = batches, torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.batches), generator=self.generator).tolist()
        return iter([self.batches[i] for i in order])

    def __len__(self) -> int:
        return len(self.batches)


def _embedded(model: torch.nn.Module, ids: torch.Tensor) -> TensorDataset:
    with torch.inference_mode():
        targets = torch.cat([model(chunk) for chunk in ids.split(64)])
    return TensorDataset(ids, targets)
