"""Backbones: CLIP (open_clip) and the vision foundation models used as attention proxies."""

from .clip import LoadedCLIP, load_clip
from .vfm import VFM_SPECS, TimmVFM, load_vfm
from .vit import CLIPVisionTower

__all__ = ["CLIPVisionTower", "LoadedCLIP", "TimmVFM", "VFM_SPECS", "load_clip", "load_vfm"]
