"""The seam every method implements: CLIP-normalised windows + text embeddings -> per-name logits.

Training-free methods differ only in how CLIP's last block is rewired (:class:`DenseCLIPMethod`);
their logits are the cosine between dense features and text (optionally CLIP-Surgery adjusted).
A trained method (a cost-aggregation head, a fusion transformer, a region classifier) overrides
:meth:`SegmentationMethod.logits` and keeps everything else of the pipeline: resizing, sliding
windows, the conversion of logits into probabilities, thresholds, refinement.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.sliding import centered_padding
from ..inference.surgery import surgery_logits
from ..models.vit import CLIPVisionTower, PositionResize


class SegmentationMethod(nn.Module):
    """Base class of every registered method."""

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """Per-name logits (B, K, h, w) at the windows' resolution.

        Args:
            windows: (B, 3, h, w) CLIP-normalised images, in the method's dtype.
            text: (K, D) unit text embeddings (or (K, P, D) per template, when the method's spec
                says ``text_input="per_template"``).
            pad_multiple: zero-pad each window (centred) to a multiple of this before the forward
                pass and crop the logits back (ProxyCLIP's VFM grid needs multiples of 56).
            surgery: apply the CLIP-Surgery adjustment (dense CLIP methods only).
        """
        raise NotImplementedError


class DenseCLIPMethod(SegmentationMethod):
    """Runs CLIP's image tower up to the last block, then a method-specific last block.

    Subclasses implement :meth:`dense_tokens`, returning the last block's patch-token output (before
    ``ln_post``) and the grid it lies on; this class applies ``ln_post`` and ``proj`` and reshapes.
    """

    #: how CLIP's position embeddings are resized to other grids (``CLIPVisionTower.positional_embedding``)
    position_resize: PositionResize = "bicubic"

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
        x, grid = self.tower.tokens_before_last_block(images, self.position_resize)
        tokens, (h, w) = self.dense_tokens(x, grid, images)
        feats = self.tower.head(tokens)
        dense = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[-1], h, w)
        if return_global:
            return dense, self.tower.global_embedding(x)
        return dense

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """Cosine of the unit dense features with the unit text (SCLIP lineage), bilinearly
        upsampled to the window; with ``surgery`` the CLIP-Surgery logits instead."""
        return dense_cosine_logits(self, windows, text, pad_multiple=pad_multiple, surgery=surgery)


#: ``features(images, return_global)``: dense features (B, E, h, w), with ``return_global`` also the
#: global embedding (B, E); a :class:`DenseCLIPMethod` itself, or an exported copy run by another runtime
DenseFeatures = Callable[[torch.Tensor, bool], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def dense_cosine_logits(
    features: DenseFeatures, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
) -> torch.Tensor:
    """The logits of :meth:`DenseCLIPMethod.logits` from any implementation of its features (so an
    inference backend swaps the forward pass and keeps padding, cosine, surgery and upsampling)."""
    h, w = windows.shape[-2:]
    left, right, top, bottom = centered_padding(h, w, pad_multiple)
    padded = F.pad(windows, (left, right, top, bottom)) if (left or right or top or bottom) else windows
    if surgery:
        dense, global_emb = features(padded, True)
    else:
        dense, global_emb = features(padded, False), None
    feats = F.normalize(dense.float(), dim=1)
    cos = torch.einsum("bchw,kc->bkhw", feats, text)
    if global_emb is not None:
        cos = surgery_logits(cos, F.normalize(global_emb.float(), dim=-1), text)
    cos = F.interpolate(cos, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return cos[:, :, top : top + h, left : left + w]
