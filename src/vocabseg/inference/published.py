"""Evaluation protocols that a family of methods shares, as :class:`InferenceConfig` values.

A method registers its defaults and its paper protocol from here, so the numbers of a protocol live
in one place however many methods were published with it. Plain data (no import of the method
registry, which imports the methods that import this module)::

    @register_method(
        "catseg",
        defaults=InferenceConfig(**CATSEG_EVAL),
        paper=PaperSettings("CAT-Seg eval.sh", CATSEG_PAPER_SETTINGS, convention=CATSEG_CONVENTION),
        ...
    )

CAT-Seg (Cho et al., CVPR 2024; official ``eval.sh`` and ``CATSeg.inference_sliding_window``) and the
methods evaluated with its code (FGAseg) run every benchmark the same way:

1. detectron2's ``ResizeShortestEdge(640, max_size=2560)``: PIL bilinear on the 8-bit image
   (``short_side=640, max_long_side=2560, resize_filter="pil"``);
2. the result squashed to 640 x 640 (``square_size=640``), unfolded into 384-px windows at stride
   ``int(384 * (1 - 0.333)) = 256``, i.e. 4 windows (``crop=384, stride=256``);
3. one global view: the step-1 image squashed to 384 x 384 (``global_weight=0.5``);
4. each output (the decoder's 96 x 96 logits, bilinearly upsampled to its window) through a sigmoid
   (``average="scores", score="sigmoid", logit_scale=1``), the windows folded and divided by their
   overlap count, averaged 50/50 with the global view resized to 640 x 640, and the result resized
   bilinearly to the input's size (``sem_seg_postprocess``); label = argmax;
5. each class prompted by its first name (``get_text_embeds``: ``"building, edifice"`` -> ``building``;
   ``synonyms="first"``), with one template (the method's);
6. mIoU by detectron2's ``SemSegEvaluator`` (only classes with ground truth are scored).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..data.registry import CATSEG_BENCHMARKS

#: CAT-Seg's sliding-window evaluation (steps 1-5 above), the same on every benchmark
CATSEG_EVAL: Mapping[str, Any] = MappingProxyType(
    {
        "short_side": 640,
        "max_long_side": 2560,
        "resize_filter": "pil",
        "square_size": 640,
        "crop": 384,
        "stride": 256,
        "global_weight": 0.5,
        "average": "scores",
        "score": "sigmoid",
        "logit_scale": 1.0,
        "synonyms": "first",
    }
)
#: the metric convention of its numbers (step 6)
CATSEG_CONVENTION = "detectron2"
#: ``PaperSettings.settings`` of a method evaluated this way: the evaluation on each benchmark of
#: CAT-Seg's table (whatever the method's defaults are)
CATSEG_PAPER_SETTINGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({b: CATSEG_EVAL for b in CATSEG_BENCHMARKS})
