"""``clip``: the unmodified last block, i.e. CLIP's own patch tokens (the baseline every method beats)."""

from __future__ import annotations

import torch

from ..inference.config import InferenceConfig
from .base import DenseCLIPMethod
from .registry import register_method


@register_method(
    "clip",
    defaults=InferenceConfig(),  # the SCLIP-lineage defaults
    summary="Vanilla CLIP patch tokens (baseline).",
    reference="Radford et al., ICML 2021",
)
class VanillaCLIP(DenseCLIPMethod):
    def dense_tokens(self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor):
        return self.tower.vanilla_last_block(x)[:, 1:], grid
