"""Small pieces of English shared by the messages: counts, lists of alternatives, a close name."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 stage``, ``2 stages`` (``nouns``: an irregular plural)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def one_of(items: Sequence[str], last: str = "or") -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


def close_name(name: str, known: Sequence[str]) -> str:
    """``; did you mean 'x'?`` when a known name is close to ``name``, else empty."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
