"""The backend registry: a name -> :class:`BackendSpec` table, filled by decorators.

A backend decides what computes a training-free method's image side (CLIP's tower with the method's
last block, and the VFM for ProxyCLIP): PyTorch itself, or an ONNX export of it run by another
runtime. Backends are built by name through :func:`get_backend` (``wrap_method`` in
:mod:`vocabseg.backends.method`), never chosen by ``if`` chains; a runtime's Python package is
imported only when a backend that needs it is built, so ``vocabseg`` works without them.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .._names import lookup
from ..errors import SettingsError, VocabsegError

if TYPE_CHECKING:
    from ..methods.base import DenseCLIPMethod, SegmentationMethod

__all__ = [
    "PRECISIONS",
    "BackendOptions",
    "BackendSpec",
    "RuntimeUnavailableError",
    "backend_option",
    "Session",
    "check_precision",
    "get_backend",
    "list_backends",
    "register_backend",
    "require",
]

#: ``"f32"``: exact float32 everywhere; ``"native"``: the runtime's default precision, lower where the
#: CPU has fast kernels for it (OpenVINO: bf16 on CPUs with AVX-512-BF16 or AMX; f32 elsewhere).
#: PyTorch and ONNX Runtime compute in float32 on the CPU either way.
PRECISIONS = ("f32", "native")

#: what to install for the ONNX backends (the ``cpu`` extra of pyproject.toml)
INSTALL_HINT = "pip install 'vocabseg[cpu]'"


class RuntimeUnavailableError(VocabsegError, ImportError):
    """A backend's runtime package is not installed."""


@dataclass(frozen=True)
class BackendOptions:
    """How a backend runs: precision, where exports are cached (``None``: a temporary folder for the
    wrapped method's lifetime), CPU threads (``None``: as many as PyTorch uses), and how many window
    sizes get their own export before further sizes run on PyTorch (each size is one export)."""

    precision: str = "f32"
    cache_dir: Path | None = None
    threads: int | None = None
    max_window_sizes: int = 4


class Session(Protocol):
    """A compiled ONNX model: CLIP-normalised images (B, 3, H, W) float32 -> the model's outputs, as
    arrays the caller owns (not buffers the next call overwrites)."""

    #: what it computes in, as the runtime reports it ("f32", "bf16")
    precision: str

    def __call__(self, images: np.ndarray) -> list[np.ndarray]: ...


#: loads an exported model: (path to the .onnx file, precision, CPU threads) -> a session
SessionLoader = Callable[[Path, str, int], Session]


@dataclass(frozen=True)
class BackendSpec:
    """What the library knows about a backend.

    Attributes:
        build: wraps a training-free method so that its ``logits`` run on this backend.
        module: the Python package the backend needs (``None``: nothing beyond PyTorch).
        load: for ONNX runtimes, the loader of an exported model (``None`` for the others).
    """

    name: str
    summary: str
    build: Callable[[DenseCLIPMethod, BackendOptions], SegmentationMethod]
    module: str | None = None
    load: SessionLoader | None = None

    @property
    def installed(self) -> bool:
        return self.module is None or importlib.util.find_spec(self.module) is not None


_BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    if spec.name in _BACKENDS:
        raise ValueError(f"Backend {spec.name!r} is already registered.")
    _BACKENDS[spec.name] = spec
    return spec


def get_backend(name: str) -> BackendSpec:
    return lookup(_BACKENDS, name, "backend")


def list_backends(runtimes_only: bool = False) -> list[str]:
    """Registered backend names in registration order (only those running ONNX exports if asked)."""
    return [n for n, s in _BACKENDS.items() if not runtimes_only or s.load is not None]


def backend_option(name: str) -> str:
    """How messages name a backend choice: in Python and on the command line."""
    return f"backend={name!r} (--backend)"


def require(module: str, who: str) -> ModuleType:
    """Import a runtime package for ``who`` (see :func:`backend_option`), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"{who} needs the {module} package, which is not installed: {INSTALL_HINT}"
        ) from exc


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SettingsError(f"precision={precision!r} (--precision) must be one of {', '.join(PRECISIONS)}.")
    return precision
