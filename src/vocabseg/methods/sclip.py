"""``sclip``: SCLIP (Wang et al., ECCV 2024), correlative self-attention.

Last block: Attn = softmax(s·QQᵀ) + softmax(s·KKᵀ) (rows sum to 2, no extra temperature); the
released code keeps the residual and the FFN: Y = X + O(Attn·V), F = LN_post(Y + MLP(LN2(Y)))·P.
Both softmax-attention terms go through SDPA (Attn·V distributes over the sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inference.config import InferenceConfig
from .base import DenseCLIPMethod
from .registry import PaperSettings, register_method


@register_method(
    "sclip",
    defaults=InferenceConfig(),  # the SCLIP-lineage defaults
    summary="Correlative self-attention softmax(QQ^T)+softmax(KK^T), residual and FFN kept.",
    reference="Wang et al., SCLIP, ECCV 2024",
    paper=PaperSettings(
        "wangf3014/SCLIP configs/cfg_*.py",
        {
            "voc21": {"logit_scale": 65.0, "prob_threshold": 0.1, "area_threshold": 0.1},
            "context60": {"logit_scale": 50.0, "prob_threshold": 0.1},
            "coco_object": {"logit_scale": 50.0, "prob_threshold": 0.1},
            "coco_stuff": {"short_side": 448},
            "cityscapes": {"short_side": 560},
        },
    ),  # fmt: skip
)
class SCLIP(DenseCLIPMethod):
    def dense_tokens(self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor):
        tower = self.tower
        q, k, v = tower.qkv(tower.last_block.ln_1(x))
        attended = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        y = tower.mlp_residual(tower.attention_residual(x, tower.out_proj(attended)))
        return y[:, 1:], grid
