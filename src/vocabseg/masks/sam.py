"""SAM and SAM 2 automatic mask generation through Hugging Face ``transformers``.

A grid of ``points_per_side``² point prompts is decoded into masks, filtered by the model's
predicted IoU and by stability, and de-duplicated by non-maximum suppression: transformers'
``mask-generation`` pipeline, which serves both families. Weights load by hub id (downloaded once
into the Hugging Face cache, with the same offline rules and message as CLIP's weights) or from a
local folder written by ``save_pretrained`` (config.json, model.safetensors, preprocessor_config.json).
``pretrained=False`` builds the family's default architecture with random weights, for a run
without any download (the masks are then meaningless).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._names import lookup
from ..errors import SettingsError, WeightsUnavailableError
from ..models.clip import hub_access, weights_unavailable
from ..models.fingerprint import weights_fingerprint
from .base import MaskGeneratorError, as_masks, check_image

__all__ = ["SAM_FAMILIES", "SamFamily", "SamMasks", "MASK_MODEL_FLAG"]

#: The command-line option that names a mask generator's weights (a hub id or a local folder).
MASK_MODEL_FLAG = "--mask-model"


@dataclass(frozen=True)
class SamFamily:
    """A family's default weights and the transformers classes of its random-weight architecture."""

    default_model: str
    config_class: str
    model_class: str
    processor_class: str


SAM_FAMILIES: dict[str, SamFamily] = {
    "sam": SamFamily("facebook/sam-vit-base", "SamConfig", "SamModel", "SamImageProcessor"),
    "sam2": SamFamily("facebook/sam2.1-hiera-large", "Sam2Config", "Sam2Model", "Sam2ImageProcessor"),
}

_LOCAL_HINT = (
    f"Pass a local folder saved with `save_pretrained` (config.json, model.safetensors, preprocessor_config.json): "
    f"`{MASK_MODEL_FLAG} /path/to/folder` (Python: `model='/path/to/folder'`)."
)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MaskGeneratorError(
            "The SAM and SAM 2 mask generators need the transformers package: pip install 'vocabseg[masks]'."
        ) from exc
    return transformers


def _is_path(ref: str) -> bool:
    """A folder rather than a hub id (``org/name``): absolute, relative with ./ ../ ~, or deeper."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref or Path(ref).expanduser().is_dir()


def _load(family: str, ref: str) -> tuple[Any, Any]:
    """(model, image processor) from a local folder or a hub id, with one clear error either way."""
    transformers = _transformers()
    load_model = transformers.AutoModelForMaskGeneration.from_pretrained
    load_processor = transformers.AutoImageProcessor.from_pretrained
    if _is_path(ref):
        folder = Path(ref).expanduser()
        if not (folder / "config.json").is_file():
            problem = "no such folder" if not folder.is_dir() else "the folder has no config.json"
            default = SAM_FAMILIES[family].default_model
            raise WeightsUnavailableError(
                f"{MASK_MODEL_FLAG} {ref}: {problem}; pass a folder saved with `save_pretrained` or a hub id "
                f"(default {default})."
            )
        try:
            return load_model(folder), load_processor(folder)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for bad folders
            raise WeightsUnavailableError(
                f"Could not load the {family} mask generator from {folder} ({MASK_MODEL_FLAG}): "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            ) from exc
    try:
        with hub_access():
            return load_model(ref), load_processor(ref)
    except Exception as exc:  # network, cache misses, missing files: all told in one message
        raise weights_unavailable(f"mask generator {family!r} ({ref})", None, exc, _LOCAL_HINT) from exc


def _random(family: str) -> tuple[Any, Any]:
    transformers = _transformers()
    spec = SAM_FAMILIES[family]
    warnings.warn(f"Mask generator {family}: pretrained=False, using RANDOM weights.", stacklevel=3)
    config = getattr(transformers, spec.config_class)()
    return getattr(transformers, spec.model_class)(config), getattr(transformers, spec.processor_class)()


class SamMasks:
    """Automatic mask generation with a SAM-family model.

    Args:
        family: ``sam`` or ``sam2`` (the default weights and the random-weight architecture).
        model: a hub id or a local ``save_pretrained`` folder; None for the family's default.
        pretrained: False for random weights (nothing is loaded or downloaded).
        points_per_side: the prompt grid is points_per_side x points_per_side (CorrCLIP: 8).
        pred_iou_thresh, stability_score_thresh: drop masks below these scores.
        points_per_batch: prompts decoded at once (memory only).
        crops_nms_thresh: box IoU above which duplicate masks are dropped.
        device: where the model runs.
    """

    def __init__(
        self,
        family: str = "sam",
        model: str | os.PathLike | None = None,
        *,
        pretrained: bool = True,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        points_per_batch: int = 64,
        crops_nms_thresh: float = 0.7,
        device: str = "cpu",
    ):
        spec = lookup(SAM_FAMILIES, family, "SAM family")
        if points_per_side < 1 or points_per_batch < 1:
            raise SettingsError(
                f"points_per_side={points_per_side} and points_per_batch={points_per_batch} must be at least 1."
            )
        self.family = family
        self.ref = os.fspath(model) if model is not None else spec.default_model
        self.pretrained = pretrained
        self.options = {
            "points_per_crop": points_per_side,  # transformers' name for the grid's side
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "points_per_batch": points_per_batch,
            "crops_nms_thresh": crops_nms_thresh,
        }
        net, processor = _load(family, self.ref) if pretrained else _random(family)
        self.model = net.eval().to(device)
        self._pipeline = _transformers().pipeline(
            "mask-generation", model=self.model, image_processor=processor, device=self.model.device
        )
        self._identity: str | None = None

    @property
    def persistent(self) -> bool:
        return self.pretrained

    @property
    def identity(self) -> str:
        """The family, a digest of the weights (read once: replace the generator after changing
        them) and the options."""
        if self._identity is None:
            options = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            self._identity = f"{self.family}:{weights_fingerprint(self.model)}:{options}"
        return self._identity

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = check_image(image).shape[:2]
        out = self._pipeline(Image.fromarray(image), **self.options)
        return as_masks(list(out["masks"]), (h, w), f"{self.family} ({self.ref})")
