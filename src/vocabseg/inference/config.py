"""Inference settings: the one place a method's published defaults live.

Every number that changes a segmentation (resize, window, temperature, thresholds, refinement) is a
field here, so a method's defaults are data attached to its registration, a benchmark protocol is a
set of overrides, and a result can always report exactly how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import SettingsError

#: the ways logits become probabilities (see :func:`vocabseg.inference.postprocess.class_probabilities`)
SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class InferenceConfig:
    """How an image is turned into class probabilities (the SCLIP-lineage "shared skeleton").

    Attributes:
        short_side: the image is resized so its short side is this many pixels (0: keep size),
            unless the long side would then exceed ``max_long_side`` (mmseg ``Resize(scale=(2048, S))``).
        max_long_side: upper bound on the resized long side.
        crop: sliding-window size in pixels; 0 runs the whole image in one forward pass.
        stride: sliding-window stride in pixels.
        logit_scale: temperature applied to the method's logits (cosine similarities) before scoring.
        score: how scaled logits become probabilities: ``softmax`` over all names jointly (the
            SCLIP lineage) or ``sigmoid`` per name, independent binary scores (Beyond-Labels; with
            ``prob_threshold`` 0.5 this is its "argmax over [background = 0.5, sigmoid]" rule).
        prob_threshold: pixels whose best class probability is below this go to the background
            class (0 disables; only meaningful when the vocabulary has a background class).
        area_threshold: foreground classes covering less than this fraction of the foreground are
            dropped (SCLIP); 0 disables.
        pamr_steps: iterations of PAMR refinement (0 disables).
        pamr_dilations: PAMR neighbourhood dilations.
        pad_multiple: each window is zero-padded (centred) to a multiple of this (ProxyCLIP: 56).
        batch_size: how many windows go through the model at once.
    """

    short_side: int = 336
    max_long_side: int = 2048
    crop: int = 224
    stride: int = 112
    logit_scale: float = 40.0
    score: str = "softmax"
    prob_threshold: float = 0.0
    area_threshold: float = 0.0
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = field(default=(8, 16))
    pad_multiple: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        checks = {
            "short_side": self.short_side >= 0,
            "max_long_side": self.max_long_side > 0,
            "crop": self.crop >= 0,
            "stride": self.stride > 0,
            "logit_scale": self.logit_scale > 0,
            "score": self.score in SCORES,
            "prob_threshold": 0.0 <= self.prob_threshold <= 1.0,
            "area_threshold": 0.0 <= self.area_threshold <= 1.0,
            "pamr_steps": self.pamr_steps >= 0,
            "pamr_dilations": all(d > 0 for d in self.pamr_dilations),
            "pad_multiple": self.pad_multiple >= 0,
            "batch_size": self.batch_size > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise SettingsError(f"Invalid inference setting(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def updated(self, **overrides: Any) -> InferenceConfig:
        """A copy with the given fields replaced; ``None`` values are ignored (keep the default)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"Unknown inference setting(s): {', '.join(sorted(unknown))}")
        given = {k: (tuple(v) if k == "pamr_dilations" else v) for k, v in overrides.items() if v is not None}
        return replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pamr_dilations"] = list(self.pamr_dilations)
        return d
