"""Built-in ``prune`` stage family: unstructured (``magnitude``, activation-aware ``wanda``),
structured (whole channels removed) and N:M pruning, one config class per method."""

from __future__ import annotations

from ._structured_layers import LayerPruner
from .base import PruneStage
from .nm import NMPrune
from .structured import StructuredPrune
from .unstructured import MagnitudePrune, WandaPrune

PruneStage.methods = (MagnitudePrune, WandaPrune, StructuredPrune, NMPrune)

__all__ = ["LayerPruner", "MagnitudePrune", "NMPrune", "PruneStage", "StructuredPrune", "WandaPrune"]
