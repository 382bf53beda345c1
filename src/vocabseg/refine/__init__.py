"""Refinements that run on top of any method's scores, chosen by name (``--refine lposs+``).

A refiner is built by :func:`create_refiner` from :data:`REFINERS`, never chosen by ``if`` chains.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .._names import build_by_name
from .lposs import LPOSS

__all__ = ["REFINERS", "create_refiner", "LPOSS"]

#: name -> builder taking the refiner's options as keywords
REFINERS: dict[str, Callable[..., Any]] = {
    "lposs": functools.partial(LPOSS, pixel=False),
    "lposs+": functools.partial(LPOSS, pixel=True),
}


def create_refiner(name: str, **options: Any) -> Any:
    """The refiner ``name`` with ``options`` (e.g. ``k=200``); unknown names and options are refused
    with the valid choices."""
    return build_by_name(REFINERS, name, "refiner", options)
