"""Conversions that produce the benchmark layouts whose format the community defines by a script:
COCO-Object / COCO-Stuff train ids from the COCO-Stuff maps (or COCO-Object from COCO's instance
json), PASCAL-Context-60 from the official json.

Run ``python -m vocabseg.data.convert --help``.
"""

from ...io.rle import decode as decode_rle
from .coco import convert_coco, convert_mask
from .coco_instances import convert_coco_instances
from .context import convert_context

__all__ = ["convert_coco", "convert_coco_instances", "convert_context", "convert_mask", "decode_rle"]
