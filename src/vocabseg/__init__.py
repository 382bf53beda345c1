"""vocabseg: open-vocabulary semantic segmentation with CLIP.

>>> from vocabseg import Segmenter
>>> seg = Segmenter(method="proxyclip", model="ViT-B-16", pretrained="openai")  # doctest: +SKIP
>>> res = seg.segment("street.jpg", ["car", "road", "tree", "person; man; woman"])  # doctest: +SKIP
"""

from .errors import (
    ImageLoadError,
    ImageTooLargeError,
    UnknownNameError,
    VocabsegError,
    VocabularyError,
    WeightsUnavailableError,
)
from .methods import create_method, list_methods
from .result import SegmentationResult
from .segmenter import Segmenter
from .text.vocabulary import Vocabulary

__version__ = "0.1.0"

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
