"""Vision foundation models (VFMs) used as attention proxies by ProxyCLIP, built with timm.

A VFM here is any module mapping ImageNet-normalised RGB images (B, 3, H, W) to dense features
(B, C, h, w). The short names below resolve to timm architectures and pretrained tags, so weights
come from the Hugging Face hub cache (or a local file) instead of ProxyCLIP's ``torch.hub`` GitHub
downloads, which fail offline.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._names import lookup
from ..errors import WeightsUnavailableError
from .clip import (
    CHECKPOINT_LOAD_ERRORS,
    check_checkpoint_file,
    hub_access,
    unreadable_checkpoint,
    weights_unavailable,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VFMSpec:
    """A timm architecture + pretrained tag; ``fixed_size`` for encoders that need one input size."""

    timm_name: str
    fixed_size: int | None = None


VFM_SPECS: dict[str, VFMSpec] = {
    "dino_vits8": VFMSpec("vit_small_patch8_224.dino"),
    "dino_vits16": VFMSpec("vit_small_patch16_224.dino"),
    "dino_vitb8": VFMSpec("vit_base_patch8_224.dino"),
    "dino_vitb16": VFMSpec("vit_base_patch16_224.dino"),
    "dinov2_vits14": VFMSpec("vit_small_patch14_dinov2.lvd142m"),
    "dinov2_vitb14": VFMSpec("vit_base_patch14_dinov2.lvd142m"),
    "dinov2_vitl14": VFMSpec("vit_large_patch14_dinov2.lvd142m"),
    "dinov2_vits14_reg": VFMSpec("vit_small_patch14_reg4_dinov2.lvd142m"),
    "dinov2_vitb14_reg": VFMSpec("vit_base_patch14_reg4_dinov2.lvd142m"),
    "dinov2_vitl14_reg": VFMSpec("vit_large_patch14_reg4_dinov2.lvd142m"),
    "sam_vitb": VFMSpec("samvit_base_patch16.sa1b", fixed_size=1024),
    "sam_vitl": VFMSpec("samvit_large_patch16.sa1b", fixed_size=1024),
}


class TimmVFM(nn.Module):
    """Dense final-layer features of a timm ViT (DINO/DINOv2: normalised patch tokens, as
    ``get_intermediate_layers`` returns them; SAM: the image-encoder neck output).

    Inputs are resized to ``fixed_size`` first when the encoder needs it (SAM runs at 1024).
    """

    def __init__(self, model: nn.Module, fixed_size: int | None = None):
        super().__init__()
        self.model = model
        self.fixed_size = fixed_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fixed_size is not None and tuple(images.shape[-2:]) != (self.fixed_size, self.fixed_size):
            images = F.interpolate(images, size=(self.fixed_size,) * 2, mode="bilinear", align_corners=False)
        param = next(self.model.parameters())
        feats = self.model.forward_features(images.to(param.dtype))
        if feats.ndim == 4:  # already NCHW (SAM neck)
            return feats
        prefix = getattr(self.model, "num_prefix_tokens", 1)
        h, w = self.model.patch_embed.dynamic_feat_size(images.shape[-2:])
        return feats[:, prefix:].transpose(1, 2).reshape(feats.shape[0], feats.shape[-1], h, w)


def load_vfm(
    name: str,
    pretrained: str | None = "default",
    *,
    device: str | torch.device = "cpu",
    option: str = "vfm_pretrained",
    **timm_kwargs: Any,
) -> TimmVFM:
    """Build VFM ``name`` (see :data:`VFM_SPECS`).

    Args:
        pretrained: ``"default"`` for the timm pretrained tag (downloaded once into the Hugging Face
            cache), a local ``.safetensors``/``.pth``/``.bin`` checkpoint, or ``None`` for random
            weights (with a warning).
        option: the argument that gave ``pretrained`` (``refine_vfm_pretrained``...), named in errors.
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. a smaller ``depth`` for tests).
    """
    import timm

    spec = lookup(VFM_SPECS, name, "VFM")
    flag = "--" + option.replace("_", "-")
    kwargs: dict[str, Any] = {"num_classes": 0, **timm_kwargs}
    if spec.fixed_size is None:
        kwargs.setdefault("dynamic_img_size", True)
    if pretrained is None:
        warnings.warn(f"VFM {name}: pretrained=None, using RANDOM weights.", stacklevel=2)
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    elif pretrained == "default":
        try:
            with hub_access():
                model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as exc:  # timm/huggingface_hub raise many types for network and cache misses
            raise weights_unavailable(
                f"VFM {name!r} (timm {spec.timm_name})", None, exc, _local_vfm_hint(option)
            ) from exc
    else:
        if not Path(pretrained).is_file():
            raise WeightsUnavailableError(
                f"{option}={pretrained!r} ({flag}): checkpoint file not found; pass an existing "
                "file, 'default' (hub weights) or none (random weights)."
            )
        path = check_checkpoint_file(pretrained, flag)
        try:
            model = timm.create_model(
                spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": os.fspath(path)}, **kwargs
            )
        except CHECKPOINT_LOAD_ERRORS as exc:
            raise unreadable_checkpoint(f"VFM {name!r} (timm {spec.timm_name})", path, exc) from exc
    fixed_size = timm_kwargs.get("img_size", spec.fixed_size) if spec.fixed_size else None
    return TimmVFM(model.eval().to(device), fixed_size)


def _local_vfm_hint(option: str) -> str:
    """How to pass a local checkpoint instead, for the argument ``option`` (``vfm_pretrained``...)."""
    module = option.removesuffix("_pretrained")
    return (
        f"Pass a local checkpoint: `--{option.replace('_', '-')} /path/to/model.safetensors` "
        f"(Python: `{option}='/path/...'`), or any module returning (B, C, h, w) features as `{module}=`."
    )


@torch.no_grad()
def last_block_qkv(vfm: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of the last attention block of a timm ViT (a :class:`TimmVFM` or the timm
    model itself; all heads concatenated) per patch token, each (B, C, h, w): the DINO features
    CorrCLIP (q + k) and LPOSS (v) build on. Read through a forward hook on the fused ``qkv``."""
    model = getattr(vfm, "model", vfm)
    captured: list[torch.Tensor] = []
    handle = model.blocks[-1].attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model.forward_features(images.to(next(model.parameters()).dtype))
    finally:
        handle.remove()
    prefix = getattr(model, "num_prefix_tokens", 1)
    h, w = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    patches = captured[-1][:, prefix:]
    return tuple(t.transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in patches.chunk(3, dim=-1))
