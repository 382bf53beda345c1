"""Inference settings: the one place a method's published defaults live.

Every number that changes a segmentation (resize, window, temperature, thresholds, refinement) is a
field here, so a method's defaults are data attached to its registration, a benchmark protocol is a
set of overrides, and a result can always report exactly how it was made. Each field carries its
help text and its allowed values as metadata: the checks, the error messages, the class's
documentation and the command line's ``--help`` are all made from it.
"""

from __future__ import annotations

import math
import numbers
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ..errors import SettingsError

if TYPE_CHECKING:
    import torch

#: the ways logits become probabilities (see :func:`vocabseg.inference.postprocess.class_probabilities`)
SCORES = ("softmax", "sigmoid")
#: how the image is resized to ``short_side``: ``bilinear`` on the normalised float image without
#: antialiasing (mmseg / cv2), or ``pil``: PIL's bilinear on the uint8 image, antialiased when shrinking
#: and rounded to uint8 (detectron2's ``ResizeShortestEdge``, CAT-Seg's test-time resize)
RESIZE_FILTERS = ("bilinear", "pil")
#: what the sliding windows average: logits (scored once at the input's size) or each window's scores
AVERAGES = ("logits", "scores")
#: which names of a class are scored: every synonym (max-merged) or the first only
SYNONYMS = ("all", "first")
#: settings added after evaluation records existed: left out of a run's identity while they keep their
#: default (:func:`vocabseg.eval.records.run_identity`), so the records of earlier runs stay valid
LATER_SETTINGS = ("resize_filter", "square_size", "global_weight", "average", "synonyms")

#: the largest ``pad_multiple``. ProxyCLIP needs 56 (its VFM grid); padding every window to a multiple
#: of more than 1024 px would make each forward pass mostly zeros and its memory unbounded.
MAX_PAD_MULTIPLE = 1024


def option_flag(name: str) -> str:
    """The command-line spelling of a setting (``crop_size`` -> ``--crop-size``), for help and errors."""
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _setting(default: Any, help: str, allowed: str, valid: Callable[[Any], bool]) -> Any:
    """A field with its help text, a description of its allowed values, and the check of them."""
    return field(default=default, metadata={"help": help, "allowed": allowed, "valid": valid})


def _choice(default: str, help: str, choices: tuple[str, ...]) -> Any:
    """A setting that takes one of a few names (the command line offers them as its choices)."""
    return field(
        default=default,
        metadata={
            "help": help,
            "allowed": f"one of {', '.join(choices)}",
            "valid": lambda v: v in choices,
            "choices": choices,
        },
    )


#: windows per forward pass when ``batch_size`` is 0 ("by device"), per torch device type. A GPU is
#: busy only with many windows at once; on the CPU 4 windows of 224 px ran as fast as 16 (and faster
#: than 1) for less memory (measured: benchmarks/results/batch_size_cpu.md).
WINDOWS_PER_FORWARD = {"cpu": 4, "cuda": 16, "mps": 16}


@dataclass(frozen=True)
class InferenceConfig:
    """How an image is turned into class probabilities (the SCLIP-lineage "shared skeleton").

    The field defaults are the SCLIP lineage's settings (short side 336, 224-px windows with stride
    112, logit scale 40); a method's registration passes only what it changes. Invalid values raise
    :class:`~vocabseg.errors.SettingsError` naming the setting, its flag and the allowed values.
    """

    short_side: int = _setting(
        336,
        "resize so the short side has this many pixels, unless the long side would then exceed "
        "max_long_side (mmseg Resize(scale=(2048, S)))",
        "an integer >= 0 (0: keep the size)",
        lambda v: _is_int(v) and v >= 0,
    )
    max_long_side: int = _setting(
        2048, "cap on the resized long side", "an integer > 0", lambda v: _is_int(v) and v > 0
    )
    resize_filter: str = _choice(
        "bilinear",
        "how the image is resized to short_side: bilinear on the normalised image without antialiasing "
        "(mmseg, cv2) or pil, PIL's bilinear on the 8-bit image, antialiased when shrinking and rounded to "
        "8 bits (detectron2's ResizeShortestEdge, as CAT-Seg evaluates)",
        RESIZE_FILTERS,
    )
    square_size: int = _setting(
        0,
        "after the short-side resize, squash the image to this many pixels a side (aspect ratio not kept) "
        "and run the windows on that; the result is resized back to the input (CAT-Seg's sliding window: 640)",
        "an integer >= 0 (0: off)",
        lambda v: _is_int(v) and v >= 0,
    )
    crop: int = _setting(
        224,
        "sliding-window size in pixels",
        "an integer >= 0 (0: the whole image in one forward pass)",
        lambda v: _is_int(v) and v >= 0,
    )
    stride: int = _setting(
        112,
        "sliding-window stride in pixels",
        "an integer > 0, at most crop when crop > 0",
        lambda v: _is_int(v) and v > 0,
    )
    global_weight: float = _setting(
        0.0,
        "weight w of one more view: the short-side-resized image squashed to crop x crop, its output resized "
        "to the windows' image and blended as (1 - w) windows + w view (CAT-Seg: 0.5); needs crop > 0",
        "a number from 0 (off) to 1",
        lambda v: _is_number(v) and 0.0 <= v <= 1.0,
    )
    average: str = _choice(
        "logits",
        "what the windows (and the global view) average: logits, scaled and scored once at the input's size "
        "(the SCLIP lineage), or scores, each window's logits scaled and scored (softmax or sigmoid) before "
        "averaging (CAT-Seg averages sigmoids)",
        AVERAGES,
    )
    logit_scale: float = _setting(
        40.0,
        "temperature applied to the method's logits (cosine similarities) before scoring",
        "a finite number > 0",
        lambda v: _is_number(v) and v > 0,
    )
    score: str = _choice(
        "softmax",
        "how scaled logits become probabilities: softmax over all names jointly (the SCLIP lineage) or "
        "sigmoid per name, independent binary scores (Beyond-Labels; with prob_threshold 0.5 this is its "
        "argmax over [background = 0.5, sigmoid] rule)",
        SCORES,
    )
    synonyms: str = _choice(
        "all",
        "which names of a class are scored: all its synonyms, max-merged, or only the first (CAT-Seg "
        "prompts a class by its first name); a background class keeps all its names, each a thing of its own",
        SYNONYMS,
    )
    prob_threshold: float = _setting(
        0.0,
        "pixels whose best class probability is below this go to the background class (only meaningful "
        "when the vocabulary has a background class)",
        "a number from 0 (off) to 1",
        lambda v: _is_number(v) and 0.0 <= v <= 1.0,
    )
    area_threshold: float = _setting(
        0.0,
        "foreground classes covering less than this fraction of the foreground are dropped (SCLIP)",
        "a number from 0 (off) to 1",
        lambda v: _is_number(v) and 0.0 <= v <= 1.0,
    )
    pamr_steps: int = _setting(
        0, "iterations of PAMR refinement", "an integer >= 0 (0: off)", lambda v: _is_int(v) and v >= 0
    )
    pamr_dilations: tuple[int, ...] = _setting(
        (8, 16),
        "PAMR neighbourhood dilations",
        "one or more integers > 0",
        lambda v: isinstance(v, tuple) and len(v) > 0 and all(_is_int(d) and d > 0 for d in v),
    )
    pad_multiple: int = _setting(
        0,
        "each window is zero-padded (centred) to a multiple of this (ProxyCLIP: 56)",
        f"an integer from 0 (off) to {MAX_PAD_MULTIPLE}",
        lambda v: _is_int(v) and 0 <= v <= MAX_PAD_MULTIPLE,
    )
    batch_size: int = _setting(
        0,
        "how many windows go through the model at once; 0 picks it by device: "
        + ", ".join(f"{n} on {kind}" for kind, n in WINDOWS_PER_FORWARD.items()),
        "an integer >= 0 (0: by device)",
        lambda v: _is_int(v) and v >= 0,
    )

    def __post_init__(self) -> None:
        if isinstance(self.pamr_dilations, list):  # from JSON or a command line
            object.__setattr__(self, "pamr_dilations", tuple(self.pamr_dilations))
        problems = [
            f"{f.name}={getattr(self, f.name)!r} ({option_flag(f.name)}) must be {f.metadata['allowed']}"
            for f in fields(self)
            if not f.metadata["valid"](getattr(self, f.name))
        ]
        if not problems and 0 < self.crop < self.stride:  # windows further apart than wide leave gaps
            problems.append(
                f"stride={self.stride!r} ({option_flag('stride')}) must not exceed crop={self.crop!r} "
                f"({option_flag('crop')}): pixels between windows would get no prediction"
            )
        if not problems and self.global_weight > 0 and self.crop == 0:  # the view is crop x crop
            problems.append(
                f"global_weight={self.global_weight!r} ({option_flag('global_weight')}) needs windows: the global "
                f"view is crop x crop, and crop=0 ({option_flag('crop')}) already runs the whole image at once"
            )
        if problems:
            raise SettingsError("Invalid inference setting: " + "; ".join(problems) + ".")
        for f in fields(self):  # numpy scalars -> Python numbers, so results serialise to JSON
            value = getattr(self, f.name)
            if isinstance(f.default, (int, float)) and not isinstance(value, type(f.default)):
                object.__setattr__(self, f.name, type(f.default)(value))
            elif f.name == "pamr_dilations":
                object.__setattr__(self, f.name, tuple(int(d) for d in value))

    def updated(self, **overrides: Any) -> InferenceConfig:
        """A copy with the given fields replaced; ``None`` values are ignored (keep the default)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"Unknown inference setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def for_device(self, device: torch.device) -> InferenceConfig:
        """This config with ``batch_size`` 0 ("by device") replaced by ``device``'s number of windows
        per forward pass (:data:`WINDOWS_PER_FORWARD`); an explicit batch size is kept."""
        if self.batch_size:
            return self
        return replace(self, batch_size=WINDOWS_PER_FORWARD.get(device.type, WINDOWS_PER_FORWARD["cuda"]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pamr_dilations"] = list(self.pamr_dilations)
        return d


def _document_fields(cls: type) -> None:
    """Append the ``Attributes`` section, made from the fields' metadata, to the class docstring."""
    lines = [
        textwrap.fill(
            f"{f.name}: {f.metadata['help']}. Allowed: {f.metadata['allowed']}.",
            100,
            initial_indent=" " * 8,
            subsequent_indent=" " * 12,
        )
        for f in fields(cls)
    ]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Attributes:\n" + "\n".join(lines) + "\n"


_document_fields(InferenceConfig)
