"""``proxyclip``: ProxyCLIP (Lan et al., ECCV 2024), proxy attention from a vision foundation model.

Last block, with VFM features E (each token L2-normalised) on the VFM grid (h', w'):
    S = ÊÊᵀ,  A = γ·(S − β·mean(S)),  A_ij = −∞ where A_ij < 0,  Attn = softmax(A)  (shared by heads)
    F = LN_post(O(Attn·V'))·P,  V' = CLIP's patch values, bilinearly resized to the VFM grid,
with no residual and no FFN (ProxyCLIP Sec. 3, the proxy attention module). The mean is taken per
image (the official code runs one crop at a time, so batching must not mix crops).
Defaults γ = 3, β = 1.2. One deviation, only where the official code yields NaN: a row whose every
entry is masked keeps its diagonal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.config import InferenceConfig
from ..models.clip import clip_normalization
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD, load_vfm
from .base import DenseCLIPMethod
from .registry import PaperSettings, register_method

VFMLike = nn.Module | Callable[[torch.Tensor], torch.Tensor]


def proxy_attention(feats: torch.Tensor, gamma: float, beta: float, share: int = 1) -> torch.Tensor:
    """Attention weights (B, M, M) from VFM features (B, C, h, w), per image.

    ``share`` > 1: consecutive groups of that many images use one mean of S (Trident runs the crops
    of an image as one batch and its official code takes that batch's mean).
    """
    e = F.normalize(feats.flatten(2).float(), dim=1)  # (B, C, M)
    sim = e.transpose(1, 2) @ e  # (B, M, M)
    mean = sim.mean(dim=(1, 2), keepdim=True)
    if share > 1:  # equal-size images: the mean of the group's means is the group's mean
        mean = mean.view(-1, share).mean(1).repeat_interleave(share).view(-1, 1, 1)
    logits = gamma * (sim - beta * mean)
    masked = logits < 0
    empty_rows = masked.all(dim=-1, keepdim=True)
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    masked &= ~(empty_rows & eye)
    return logits.masked_fill(masked, float("-inf")).softmax(dim=-1)


@register_method(
    "proxyclip",
    defaults=InferenceConfig(crop=336, pad_multiple=56),
    summary="Proxy attention from a VFM (DINO/DINOv2/SAM), CLIP values on the VFM grid.",
    reference="Lan et al., ProxyCLIP, ECCV 2024",
    paper=PaperSettings(
        "mc-lan/ProxyCLIP configs/cfg_*.py",
        {
            "voc21": {"prob_threshold": 0.2},
            "context60": {"prob_threshold": 0.15},
            "coco_object": {"prob_threshold": 0.25},
            "cityscapes": {"short_side": 448, "crop": 224, "stride": 112},
            "ade150": {"short_side": 448},
            "ade847": {"short_side": 448},
            "context459": {"short_side": 448},
        },
    ),  # fmt: skip
)
class ProxyCLIP(DenseCLIPMethod):
    """Args:
    vfm: a short VFM name (``dino_vitb8``, ``dinov2_vitb14``, ``sam_vitb``...) or any module /
        callable mapping ImageNet-normalised images (B, 3, H, W) to features (B, C, h, w).
    vfm_pretrained: for a VFM name: ``"default"`` (hub weights), a local file, or ``None`` (random).
    gamma, beta: the proxy-attention temperature and mean-offset (Eq. of PAM).
    """

    def __init__(
        self,
        clip: nn.Module,
        vfm: str | VFMLike = "dino_vitb8",
        vfm_pretrained: str | None = "default",
        gamma: float = 3.0,
        beta: float = 1.2,
    ):
        super().__init__(clip)
        if isinstance(vfm, str):
            device = next(clip.parameters()).device
            vfm = load_vfm(vfm, vfm_pretrained, device=device)
        if not callable(vfm):
            raise TypeError(f"vfm must be a name or a callable module, got {type(vfm).__name__}")
        self.vfm = vfm
        self.gamma = gamma
        self.beta = beta
        mean, std = clip_normalization(clip)
        # CLIP-normalised input -> ImageNet-normalised input for the VFM: x * a + b, per channel
        scale = torch.tensor(std) / torch.tensor(IMAGENET_STD)
        shift = (torch.tensor(mean) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        self.register_buffer("_to_vfm_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_to_vfm_shift", shift.view(1, 3, 1, 1), persistent=False)

    def imagenet_normalised(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images -> the ImageNet normalisation VFMs (and SAM) take, float32."""
        return images.float() * self._to_vfm_scale + self._to_vfm_shift

    def vfm_features(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.vfm(self.imagenet_normalised(images))
        if not (isinstance(feats, torch.Tensor) and feats.ndim == 4 and feats.shape[0] == images.shape[0]):
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"The VFM must return (B, C, h, w) features; got {got}")
        return feats

    def dense_tokens(self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor, share: int = 1):
        """The proxy attention's output (B, M, D) and the VFM grid it lies on; ``share`` as in
        :func:`proxy_attention`."""
        tower = self.tower
        feats = self.vfm_features(images)
        attn = proxy_attention(feats, self.gamma, self.beta, share)  # (B, M, M)
        out_grid = (feats.shape[-2], feats.shape[-1])
        _, _, v = tower.qkv(tower.last_block.ln_1(x))  # (B, H, 1+N, d)
        b, h, _, d = v.shape
        v = v[:, :, 1:].reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
        v = F.interpolate(v, size=out_grid, mode="bilinear", align_corners=False)
        v = v.flatten(2).transpose(1, 2).reshape(b, h, -1, d)  # (B, H, M, d)
        attended = attn.unsqueeze(1).to(v.dtype) @ v
        return tower.out_proj(attended), out_grid
