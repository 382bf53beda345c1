"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP applies it.

Affinities between a pixel and its 8 neighbours at each dilation are computed from the image:
    a_ij = -|I_i - I_j| / (1e-8 + 0.1·σ_i),   averaged over colour channels, softmax over neighbours,
where σ_i is the (unbiased) standard deviation of the pixel's neighbourhood values (centre + 8
neighbours, for every dilation). The mask is then propagated ``num_iter`` times: m_i <- Σ_j a_ij m_j.
Borders are handled by replicate padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _neighbours(x: torch.Tensor, dilations: Sequence[int], with_centre: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, P, H, W) values at the 8 (or 9 with the centre) offsets per dilation."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        offsets = ([(0, 0)] if with_centre else []) + _OFFSETS
        out += [padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w] for dy, dx in offsets]
    return torch.stack(out, dim=2)


class PAMR(nn.Module):
    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (8, 16)):
        super().__init__()
        self.num_iter = num_iter
        self.dilations = tuple(dilations)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Refine ``mask`` (B, K, H, W) with the affinities of ``image`` (B, 3, H, W)."""
        mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
        spread = _neighbours(image, self.dilations, with_centre=True).std(dim=2, keepdim=True)
        diffs = (image.unsqueeze(2) - _neighbours(image, self.dilations, with_centre=False)).abs()
        affinity = (-diffs / (1e-8 + 0.1 * spread)).mean(dim=1, keepdim=True).softmax(dim=2)
        for _ in range(self.num_iter):
            mask = (_neighbours(mask, self.dilations, with_centre=False) * affinity).sum(dim=2)
        return mask
