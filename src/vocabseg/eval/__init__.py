"""Benchmark evaluation: metrics on confusion matrices, protocols, a resumable sharded runner.

>>> from vocabseg import Segmenter
>>> from vocabseg.data import build_dataset
>>> from vocabseg.eval import evaluate
>>> seg = Segmenter(method="sclip", model="ViT-B-16", pretrained="openai")  # doctest: +SKIP
>>> result = evaluate(seg, build_dataset("voc21", "data/"), protocol="paper", out_dir="results")  # doctest: +SKIP
>>> result.miou  # doctest: +SKIP
"""

from .metrics import CONVENTIONS, confusion_matrix, episode_metrics, segmentation_metrics
from .protocols import PROTOCOLS, ResolvedProtocol, resolve_protocol
from .report import write_summary
from .runner import EvalResult, evaluate

__all__ = [
    "CONVENTIONS",
    "PROTOCOLS",
    "EvalResult",
    "ResolvedProtocol",
    "confusion_matrix",
    "episode_metrics",
    "evaluate",
    "resolve_protocol",
    "segmentation_metrics",
    "write_summary",
]
