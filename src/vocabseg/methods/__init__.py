"""Training-free dense CLIP methods, registered by name.

>>> from vocabseg.methods import create_method, list_methods
>>> m = create_method("sclip", clip=open_clip_model)   # doctest: +SKIP
>>> feats = m(images)   # (B, D, h, w) in CLIP's joint space, before L2 normalisation  # doctest: +SKIP
"""

from . import (  # noqa: F401  (registration)
    beyond_labels,
    catseg,
    clearclip,
    clip,
    cliper,
    corrclip,
    fgaseg,
    maskclip,
    naclip,
    pixelclip,
    proxyclip,
    scclip,
    sclip,
    sfp,
    trident,
    vilseg,
)
from .base import DenseCLIPMethod
from .registry import MethodSpec, create_method, get_method_spec, list_methods, register_method

__all__ = [
    "DenseCLIPMethod",
    "MethodSpec",
    "create_method",
    "get_method_spec",
    "list_methods",
    "register_method",
]
