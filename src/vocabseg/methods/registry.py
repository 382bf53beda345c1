"""Method registry: a name -> :class:`MethodSpec` table, filled by decorators.

Methods are created by name through :func:`create_method`, never chosen by ``if`` chains. A spec
carries every fact a caller needs about a method (timm's pretrained-config idea): its inference
defaults, the options its constructor takes, its published per-benchmark settings, whether it is
trained and where its trained weights come from, and which text embeddings it consumes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from torch import nn

from .._names import lookup
from ..errors import MethodOptionError
from ..inference.config import InferenceConfig

__all__ = [
    "MethodSpec",
    "PaperSettings",
    "TEXT_INPUTS",
    "register_method",
    "create_method",
    "list_methods",
    "get_method_spec",
]

#: what a method's ``logits`` receives as text: "mean" = (K, D) prompt-ensembled unit embeddings,
#: "per_template" = (K, P, D) unit embeddings of every template.
TEXT_INPUTS = ("mean", "per_template")


class PaperSettings(NamedTuple):
    """A method's published evaluation settings: inference settings, and the constructor options some
    papers also change per benchmark (Trident's ``cos_fac``, CLIPer's ``softmax_scale``), and the metric
    convention its numbers were computed with (``None``: the harness's, mmseg)."""

    source: str  # where the settings are committed (repository and config files, or the paper)
    settings: Mapping[str, Mapping[str, Any]]  # benchmark -> settings that differ from the defaults
    options: Mapping[str, Mapping[str, Any]] = MappingProxyType({})  # benchmark -> method options likewise
    convention: str | None = None  # vocabseg.eval.metrics.CONVENTIONS: "detectron2" for CAT-Seg's lineage


@dataclass(frozen=True)
class MethodSpec:
    """What the library knows about a method.

    Attributes:
        options: the constructor's keyword options and their defaults (besides ``clip``), read once
            from its signature at registration so callers never inspect classes themselves.
        paper: published per-benchmark settings and method options (``None``: the defaults are all there
            is); its options are checked against ``options`` at registration.
        trainable: the method has parameters trained by ``vocabseg train`` and needs ``weights``.
        weights: where trained weights come from, for messages (a hub id, a release, or a recipe).
        text_input: which text embeddings :meth:`logits` takes (see :data:`TEXT_INPUTS`).
        templates: the prompt-template set the method was published (or trained) with.
    """

    name: str
    cls: type[nn.Module]
    defaults: InferenceConfig
    summary: str
    reference: str
    options: Mapping[str, Any] = field(default_factory=dict)
    paper: PaperSettings | None = None
    trainable: bool = False
    weights: str | None = None
    text_input: str = "mean"
    templates: str = "openai80"

    @property
    def uses_vfm(self) -> bool:
        return "vfm" in self.options

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse options the method does not take, naming the ones it does."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "no options"
            raise MethodOptionError(f"Method {self.name!r} does not take {', '.join(unknown)}; it takes {takes}.")


_METHODS: dict[str, MethodSpec] = {}

M = TypeVar("M", bound=type[nn.Module])


def _constructor_options(cls: type) -> dict[str, Any]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, clip
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def register_method(
    name: str,
    *,
    defaults: InferenceConfig,
    summary: str,
    reference: str,
    paper: PaperSettings | None = None,
    trainable: bool = False,
    weights: str | None = None,
    text_input: str = "mean",
    templates: str = "openai80",
) -> Callable[[M], M]:
    """Class decorator registering a method under ``name``."""
    if text_input not in TEXT_INPUTS:
        raise ValueError(f"text_input must be one of {TEXT_INPUTS}, got {text_input!r}")

    def wrap(cls: M) -> M:
        if name in _METHODS:
            raise ValueError(f"Method {name!r} is already registered ({_METHODS[name].cls.__name__}).")
        options = MappingProxyType(_constructor_options(cls))
        spec = MethodSpec(
            name, cls, defaults, summary, reference, options, paper, trainable, weights, text_input, templates
        )
        for benchmark, published in (paper.options if paper else {}).items():
            try:
                spec.check_options(published)
            except MethodOptionError as exc:
                raise MethodOptionError(f"paper options for {benchmark}: {exc}") from None
        _METHODS[name] = spec
        cls.method_name = name
        return cls

    return wrap


def get_method_spec(name: str) -> MethodSpec:
    return lookup(_METHODS, name, "method")


def list_methods(trainable: bool | None = None) -> list[str]:
    """Registered method names: training-free ones first, each kind in registration order (only one
    kind if ``trainable`` says which)."""
    names = [n for n, s in _METHODS.items() if trainable is None or s.trainable == trainable]
    return sorted(names, key=lambda n: _METHODS[n].trainable)


def create_method(name: str, clip: nn.Module, **kwargs: Any) -> nn.Module:
    """Build method ``name`` on an open_clip CLIP model (any weights).

    The returned module's :meth:`~vocabseg.methods.base.SegmentationMethod.logits` maps
    CLIP-normalised windows and text embeddings to per-name logits; dense CLIP methods' ``forward``
    also gives their features (B, D, h, w) in CLIP's joint space (after ``ln_post`` and ``proj``).
    Method-specific options (``vfm=`` for ProxyCLIP, ``gaussian_std=`` for NACLIP) go in kwargs.
    """
    spec = get_method_spec(name)
    spec.check_options(kwargs)
    method = spec.cls(clip, **kwargs)
    method.method_options = {**spec.options, **kwargs}  # what it was built with (trained checkpoints store it)
    return method
