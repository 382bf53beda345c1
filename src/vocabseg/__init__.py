"""vocabseg: open-vocabulary semantic segmentation with CLIP.

>>> from vocabseg import Segmenter
>>> seg = Segmenter(method="proxyclip", model="ViT-B-16", pretrained="openai")  # doctest: +SKIP
>>> res = seg.segment("street.jpg", ["car", "road", "tree", "person; man; woman"])  # doctest: +SKIP

The names that need torch are imported on first use (PEP 562), so ``import vocabseg`` and the
command line's ``--help`` / ``--version`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ImageLoadError,
    ImageTooLargeError,
    UnknownNameError,
    VocabsegError,
    VocabularyError,
    WeightsUnavailableError,
)

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first used
_LAZY = {
    "SegmentationResult": ".result",
    "Segmenter": ".segmenter",
    "Vocabulary": ".text.vocabulary",
    "create_method": ".methods",
    "list_methods": ".methods",
}

if TYPE_CHECKING:
    from .methods import create_method, list_methods
    from .result import SegmentationResult
    from .segmenter import Segmenter
    from .text.vocabulary import Vocabulary

__all__ = [
    "ImageLoadError",
    "ImageTooLargeError",
    "SegmentationResult",
    "Segmenter",
    "UnknownNameError",
    "Vocabulary",
    "VocabsegError",
    "VocabularyError",
    "WeightsUnavailableError",
    "create_method",
    "list_methods",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
