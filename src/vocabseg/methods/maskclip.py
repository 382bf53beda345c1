"""``maskclip``: MaskCLIP (Zhou et al., ECCV 2022).

Last block: the attention is replaced by identity on the values, Y = X + O(V), and the residual and
FFN are kept: F = LN_post(Y + MLP(LN2(Y)))·P (MaskCLIP Sec. 3.2; the numerically clean reference is
ClearCLIP's ``custom_attn(model_type='MaskCLIP', ignore_residual=False)``; the official repo's ViT
uses exact GELU and LN eps 1e-6, so it is not numerically CLIP).
"""

from __future__ import annotations

import torch

from ..inference.config import InferenceConfig
from .base import DenseCLIPMethod
from .registry import PaperSettings, register_method


@register_method(
    "maskclip",
    defaults=InferenceConfig(short_side=512, crop=0, logit_scale=100.0),
    summary="Value path only (attention -> identity), residual and FFN kept.",
    reference="Zhou et al., Extract Free Dense Labels from CLIP, ECCV 2022",
    # whole image, 512 short side, no background handling: the method's registered defaults
    paper=PaperSettings("chongzhou96/MaskCLIP configs/maskclip/*.py", {}),  # fmt: skip
)
class MaskCLIP(DenseCLIPMethod):
    def dense_tokens(self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor):
        tower = self.tower
        _, _, v = tower.qkv(tower.last_block.ln_1(x))
        y = tower.mlp_residual(tower.attention_residual(x, tower.out_proj(v)))
        return y[:, 1:], grid
