"""The dense CLIP features of the trained methods built on CAT-Seg's CLIP (CAT-Seg, FGAseg, PixelCLIP).

Their official code computes dense features with a last block that skips the q-k attention and adds
the CLS token's input to every token's value path (:meth:`CLIPVisionTower.value_path_cls_residual`),
with CLIP's position embeddings resized bicubically to the working grid (``size=``). Not registered:
a building block of trained methods, which fine-tune the CLIP underneath it.
"""

from __future__ import annotations

import torch

from .base import DenseCLIPMethod

__all__ = ["ValuePathCLIP"]


class ValuePathCLIP(DenseCLIPMethod):
    """Dense features ``ln_post(value_path_cls_residual(X)) @ proj`` on the patch tokens, (B, E, h, w)."""

    position_resize = "bicubic_size"

    def dense_tokens(
        self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.tower.value_path_cls_residual(x)[:, 1:], grid
