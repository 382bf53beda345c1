"""The common shape of a training-free dense CLIP method."""

from __future__ import annotations

import torch
from torch import nn

from ..models.vit import CLIPVisionTower


class DenseCLIPMethod(nn.Module):
    """Runs CLIP's image tower up to the last block, then a method-specific last block.

    Subclasses implement :meth:`dense_tokens`, returning the last block's patch-token output (before
    ``ln_post``) and the grid it lies on; this class applies ``ln_post`` and ``proj`` and reshapes.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.tower = CLIPVisionTower(clip.visual)

    def dense_tokens(
        self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Map the last block's input (B, 1+N, D) to patch tokens (B, h*w, D) on grid (h, w)."""
        raise NotImplementedError

    def forward(
        self, images: torch.Tensor, return_global: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Dense features (B, E, h, w); with ``return_global`` also CLIP's image embedding (B, E)."""
        x, grid = self.tower.tokens_before_last_block(images)
        tokens, (h, w) = self.dense_tokens(x, grid, images)
        feats = self.tower.head(tokens)
        dense = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[-1], h, w)
        if return_global:
            return dense, self.tower.global_embedding(x)
        return dense
