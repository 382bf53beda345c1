"""Looking names up in a table, with a helpful error when the name is unknown."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """Return ``table[name]``; otherwise raise :class:`UnknownNameError` naming the valid choices."""
    try:
        return table[name]
    except KeyError:
        pass
    by_folded: dict[str, list[str]] = {}  # case-insensitive: 'vit-b-16' suggests 'ViT-B-16'
    for key in table:
        by_folded.setdefault(key.casefold(), []).append(key)
    close = [k for f in difflib.get_close_matches(name.casefold(), list(by_folded), n=3) for k in by_folded[f]]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(f"Unknown {what} {name!r}.{hint} Available: {', '.join(sorted(table))}.")
