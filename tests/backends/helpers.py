"""Inputs shared by the backend tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: backend logits must equal PyTorch's this closely in f32
ATOL = 1e-4


def unit_text(k: int = 5, d: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def windows(b: int = 3, h: int = 32, w: int = 48, seed: int = 1) -> torch.Tensor:
    """Random CLIP-normalised windows; batch 3, while exports are traced at batch 2 (the axis is dynamic)."""
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
