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
    close = difflib.get_close_matches(name, list(table), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(f"Unknown {what} {name!r}.{hint} Available: {', '.join(sorted(table))}.")
