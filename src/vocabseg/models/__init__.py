"""Backbones: CLIP (open_clip) and the vision foundation models used as attention proxies."""

from .clip import LoadedCLIP, load_clip
from .vfm import VFM_SPECS, TimmVFM, list_vfms, load_vfm
from .vit import CLIPVisionTower

__all__ = ["CLIPVisionTower", "LoadedCLIP", "TimmVFM", "VFM_SPECS", "list_vfms", "load_clip", "load_vfm"]
