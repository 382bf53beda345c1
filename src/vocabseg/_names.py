"""Looking names up in a table, with a helpful error when the name is unknown."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import SettingsError, UnknownNameError

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


def build_by_name(table: Mapping[str, Callable[..., T]], name: str, what: str, options: Mapping[str, Any]) -> T:
    """``table[name](**options)``, refusing an unknown name (see :func:`lookup`) or an option the
    builder does not take, naming the ones it takes (options a ``functools.partial`` fixes are the
    name's own and not offered)."""
    builder = lookup(table, name, what)
    fixed = getattr(builder, "keywords", {})
    params = {n: p for n, p in inspect.signature(builder).parameters.items() if n not in fixed}
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = len(named) < len(params) and any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [] if takes_any else sorted(set(options) - set(named))
    missing = [n for n, p in named.items() if p.default is p.empty and n not in options]
    if unknown or missing:
        takes = ", ".join(n if p.default is p.empty else f"{n}={p.default!r}" for n, p in named.items()) or "nothing"
        problem = f"does not take {', '.join(unknown)}" if unknown else f"needs {', '.join(missing)}"
        raise SettingsError(f"{what[:1].upper()}{what[1:]} {name!r} {problem}; it takes {takes}.")
    return builder(**options)
