"""Method registry: a name -> (module class, inference defaults) table, filled by decorators.

Methods are created by name through :func:`create_method`, never chosen by ``if`` chains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from .._names import lookup
from ..inference.config import InferenceConfig

__all__ = ["MethodSpec", "register_method", "create_method", "list_methods", "get_method_spec"]


@dataclass(frozen=True)
class MethodSpec:
    """What the library knows about a method: its class, its defaults and a one-line summary."""

    name: str
    cls: type[nn.Module]
    defaults: InferenceConfig
    summary: str
    reference: str


_METHODS: dict[str, MethodSpec] = {}

M = TypeVar("M", bound=type[nn.Module])


def register_method(name: str, *, defaults: InferenceConfig, summary: str, reference: str) -> Callable[[M], M]:
    """Class decorator registering a dense method under ``name``."""

    def wrap(cls: M) -> M:
        if name in _METHODS:
            raise ValueError(f"Method {name!r} is already registered ({_METHODS[name].cls.__name__}).")
        _METHODS[name] = MethodSpec(name, cls, defaults, summary, reference)
        return cls

    return wrap


def get_method_spec(name: str) -> MethodSpec:
    return lookup(_METHODS, name, "method")


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def create_method(name: str, clip: nn.Module, **kwargs: Any) -> nn.Module:
    """Build method ``name`` on an open_clip CLIP model (any weights).

    The returned module maps CLIP-normalised images (B, 3, H, W) to dense features (B, D, h, w) in
    CLIP's joint embedding space (after ``ln_post`` and ``proj``, before L2 normalisation).
    Method-specific options (e.g. ``vfm=`` for ProxyCLIP, ``gaussian_std=`` for NACLIP) go in kwargs.
    """
    return get_method_spec(name).cls(clip, **kwargs)
