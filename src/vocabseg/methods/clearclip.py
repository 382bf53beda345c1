"""``clearclip``: ClearCLIP (Lan et al., ECCV 2024).

Last block: q-q self-attention with neither the residual nor the FFN: F = LN_post(O(softmax(s·QQᵀ)V))·P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inference.config import InferenceConfig
from .base import DenseCLIPMethod
from .registry import PaperSettings, register_method


@register_method(
    "clearclip",
    defaults=InferenceConfig(short_side=448, crop=448, stride=224, logit_scale=50.0),
    summary="Q-Q attention, residual and FFN removed.",
    reference="Lan et al., ClearCLIP, ECCV 2024",
    paper=PaperSettings(
        "mc-lan/ClearCLIP configs/cfg_*.py",
        {
            "voc21": {"prob_threshold": 0.5},
            "context60": {"prob_threshold": 0.15},
            "coco_object": {"prob_threshold": 0.4},
            "cityscapes": {"crop": 224},
        },
    ),  # fmt: skip
)
class ClearCLIP(DenseCLIPMethod):
    def dense_tokens(self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor):
        tower = self.tower
        q, _, v = tower.qkv(tower.last_block.ln_1(x))
        return tower.out_proj(F.scaled_dot_product_attention(q, q, v))[:, 1:], grid
