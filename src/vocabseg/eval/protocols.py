"""Evaluation protocols: which inference settings a method runs with on a benchmark.

* ``paper``: each method's published per-dataset settings, as committed in its official
  ``configs/cfg_<dataset>.py``, registered with the method (``MethodSpec.paper``). The base is the
  method's registered defaults; the spec holds only what a paper changes per benchmark, method
  options included (:func:`protocol_method_options`: the method is built with them).
* ``unified``: one shared protocol for like-for-like comparison: short side 336 (Cityscapes 560,
  as most of the lineage), 224 windows with stride 112, logit scale 40, no PAMR, no area threshold,
  and on datasets with a background class a probability threshold of 0.1 (the most common value:
  SCLIP, NACLIP, CASS). Architecture-bound settings (ProxyCLIP's window padding) stay the method's.
* ``default``: the method's registered defaults, unchanged (no threshold).

Only ``paper`` changes method options; the others build every method with its constructor's defaults.
Only ``paper`` changes the headline metric convention too, to the one the method's numbers were
published with (``PaperSettings.convention``: detectron2's ``SemSegEvaluator`` for CAT-Seg and the
methods evaluated with its code); otherwise it is mmseg's.

Command-line settings (``--short-side 448``...) are applied on top and recorded as overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._names import lookup
from ..data.registry import STANDARD_BENCHMARKS
from ..inference.config import InferenceConfig
from ..methods import get_method_spec
from .metrics import CONVENTIONS

UNIFIED_BASE: dict[str, Any] = {
    "short_side": 336,
    "max_long_side": 2048,
    "crop": 224,
    "stride": 112,
    "logit_scale": 40.0,
    "area_threshold": 0.0,
    "pamr_steps": 0,
}
UNIFIED_BENCHMARK: dict[str, dict[str, Any]] = {"cityscapes": {"short_side": 560}}
UNIFIED_BACKGROUND_THRESHOLD = 0.1
#: the headline metric convention of every protocol but a method's paper protocol that states another
DEFAULT_CONVENTION = "mmseg"


@dataclass(frozen=True)
class ResolvedProtocol:
    """The settings one evaluation ran with, and where they came from (printed in every report)."""

    name: str
    config: InferenceConfig
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)
    convention: str = DEFAULT_CONVENTION  # the headline metric convention (vocabseg.eval.metrics.CONVENTIONS)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "overrides": dict(self.overrides)}

    @property
    def label(self) -> str:
        """``paper``, or ``paper+overrides`` when command-line settings changed it."""
        return self.name + ("+overrides" if self.overrides else "")


def _paper(method: str, benchmark: str, has_background: bool) -> tuple[dict[str, Any], str]:
    paper = get_method_spec(method).paper
    if paper is None:
        return {}, f"{method} has no published per-benchmark protocol: the method's defaults"
    if benchmark not in paper.settings and benchmark not in STANDARD_BENCHMARKS:
        return {}, f"{paper.source}; no published setting for {benchmark}: the method's defaults"
    return dict(paper.settings.get(benchmark, {})), f"{paper.source} ({benchmark})"


def _unified(method: str, benchmark: str, has_background: bool) -> tuple[dict[str, Any], str]:
    settings = {**UNIFIED_BASE, **UNIFIED_BENCHMARK.get(benchmark, {})}
    settings["prob_threshold"] = UNIFIED_BACKGROUND_THRESHOLD if has_background else 0.0
    return settings, "vocabseg unified protocol"


def _default(method: str, benchmark: str, has_background: bool) -> tuple[dict[str, Any], str]:
    return {}, f"{method} registered defaults"


PROTOCOLS: dict[str, Callable[[str, str, bool], tuple[dict[str, Any], str]]] = {
    "paper": _paper,
    "unified": _unified,
    "default": _default,
}


def protocol_method_options(name: str, method: str, benchmark: str) -> dict[str, Any]:
    """The method options ``method`` is built with on ``benchmark`` under protocol ``name``: under
    ``paper`` the published ones for that benchmark (a dataset's ``settings_key``), else none. They
    are constructor options, so unlike :func:`resolve_protocol`'s settings they need the caller to
    build the method with them (``vocabseg eval`` builds one per distinct set)."""
    lookup(PROTOCOLS, name, "protocol")
    paper = get_method_spec(method).paper
    if name != "paper" or paper is None:
        return {}
    return dict(paper.options.get(benchmark, {}))


def resolve_protocol(
    name: str,
    method: str,
    benchmark: str,
    has_background: bool,
    overrides: dict[str, Any] | None = None,
) -> ResolvedProtocol:
    """The :class:`InferenceConfig` of ``method`` on ``benchmark`` under protocol ``name``.

    Args:
        benchmark: the benchmark whose published settings apply (a dataset's ``settings_key``).
        has_background: the vocabulary has a background class (thresholds apply only then).
        overrides: settings given explicitly (command line), applied last.
    """
    settings, source = lookup(PROTOCOLS, name, "protocol")(method, benchmark, has_background)
    spec = get_method_spec(method)
    config = spec.defaults.updated(**settings)
    convention = (spec.paper.convention if name == "paper" and spec.paper is not None else None) or DEFAULT_CONVENTION
    lookup(CONVENTIONS, convention, f"metric convention of {method}'s paper protocol")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        config = config.updated(**given)
    if not has_background and config.prob_threshold > 0:
        raise ValueError(
            f"prob_threshold={config.prob_threshold} needs a background class, and {benchmark} has none "
            "(SCLIP issue #2: do not threshold datasets without background)."
        )
    return ResolvedProtocol(name, config, source, given, convention)
