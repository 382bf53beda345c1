"""``naclip``: NACLIP (Hajimiri et al., WACV 2025), neighbourhood-aware attention.

Last block ("reduced" architecture): Attn = softmax(s·KKᵀ + Ω), F = LN_post(O(Attn·V))·P with no
residual and no FFN. Ω_ij = exp(-‖p_i - p_j‖² / (2σ²)) over patch positions in patch units (peak 1,
σ = ``gaussian_std`` = 5), zero on the CLS row and column. PAMR (10 steps, dilations 8/16) is on by
default in the official evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.config import InferenceConfig
from .base import DenseCLIPMethod
from .registry import PaperSettings, register_method


def gaussian_neighbourhood_prior(grid: tuple[int, int], std: float) -> torch.Tensor:
    """Ω of NACLIP as a (1+N, 1+N) additive attention bias (zero row/column for the CLS token)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    omega = torch.exp(-torch.cdist(pos, pos).pow(2) / (2.0 * std**2))
    return F.pad(omega, (1, 0, 1, 0)).float()


@register_method(
    "naclip",
    defaults=InferenceConfig(pamr_steps=10),
    summary="K-K attention + Gaussian neighbourhood prior, residual and FFN removed; PAMR on.",
    reference="Hajimiri et al., Pay Attention to Your Neighbours (NACLIP), WACV 2025",
    paper=PaperSettings(
        "sinahmr/NACLIP configs/cfg_*.py (PAMR on)",
        {
            "voc21": {"crop": 0, "prob_threshold": 0.1},
            "voc20": {"crop": 0},
            "context60": {"prob_threshold": 0.1},
            "coco_object": {"prob_threshold": 0.1},
            "cityscapes": {"short_side": 560},
        },
    ),  # fmt: skip
)
class NACLIP(DenseCLIPMethod):
    def __init__(self, clip: nn.Module, gaussian_std: float = 5.0):
        super().__init__(clip)
        if gaussian_std <= 0:
            raise ValueError(f"gaussian_std must be positive, got {gaussian_std}")
        self.gaussian_std = gaussian_std
        self._priors: dict[tuple[int, int], torch.Tensor] = {}  # per-grid cache, as the official code

    def prior(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        if grid not in self._priors:
            self._priors[grid] = gaussian_neighbourhood_prior(grid, self.gaussian_std)
        return self._priors[grid].to(device=like.device, dtype=like.dtype)

    def dense_tokens(self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor):
        tower = self.tower
        _, k, v = tower.qkv(tower.last_block.ln_1(x))
        attended = F.scaled_dot_product_attention(k, k, v, attn_mask=self.prior(grid, k))
        return tower.out_proj(attended)[:, 1:], grid
