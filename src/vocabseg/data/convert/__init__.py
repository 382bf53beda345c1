"""Conversions that produce the benchmark layouts whose format the community defines by a script:
COCO-Object / COCO-Stuff train ids from the COCO-Stuff maps (or COCO-Object from COCO's instance
json), PASCAL-Context-60 from the official json, and CAT-Seg's detectron2 TIFFs of A-847 (from
ADE20K-full) and PC-459 (from the 459-class ``.mat`` labels).

Run ``python -m vocabseg.data.convert --help``.
"""

from ...io.rle import decode as decode_rle
from .ade_full import ade847_labels, convert_ade847
from .coco import convert_coco, convert_mask
from .coco_instances import convert_coco_instances
from .context import convert_context
from .context459 import convert_context459, pc459_labels

__all__ = [
    "ade847_labels",
    "convert_ade847",
    "convert_coco",
    "convert_coco_instances",
    "convert_context",
    "convert_context459",
    "convert_mask",
    "decode_rle",
    "pc459_labels",
]
