"""Trainable heads on frozen CLIP features, and the segmentation losses they share.

>>> from vocabseg.heads import BeyondLabelsHead, get_loss
>>> head = BeyondLabelsHead(clip_dim=512)
>>> cos = head(tokens, (14, 14), text)   # (B, K, 112, 112) cosine  # doctest: +SKIP
>>> loss = get_loss("bce")(head.scaled_logits(cos), target, background_index=K)  # doctest: +SKIP
"""

from .beyond_labels import BeyondLabelsHead, ConvUpsampleDecoder, FourierPositionalEncoding, FusionBlock
from .losses import LOSSES, LossFn, binary_ce_loss, cross_entropy_loss, get_loss

__all__ = [
    "LOSSES",
    "BeyondLabelsHead",
    "ConvUpsampleDecoder",
    "FourierPositionalEncoding",
    "FusionBlock",
    "LossFn",
    "binary_ce_loss",
    "cross_entropy_loss",
    "get_loss",
]
