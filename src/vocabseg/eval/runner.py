"""The evaluation loop: shard, predict, score, persist, all-reduce, report.

Predictions are made at the label's resolution (the Segmenter returns labels at the input image
size; the label map is never resized) with the benchmark's vocabulary, so the predicted class index
is the dataset label index. Each image's confusion counts are accumulated into one integer tensor
per benchmark (a (C, C) confusion matrix; (5, 2, 2) per-class binary matrices for PASCAL-5i), which
is what is persisted per image, all-reduced across processes and turned into metrics.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .._names import lookup
from ..data.dataset import SegDataset, check_same_size
from ..data.files import save_label_png
from ..data.layouts import Sample
from .distributed import WorldInfo, all_reduce_sum, barrier, world_info
from .metrics import CONVENTIONS, confusion_matrix, episode_metrics, segmentation_metrics
from .protocols import resolve_protocol
from .records import RecordStore, run_id, run_identity
from .report import write_result, write_run_identity

if TYPE_CHECKING:
    from ..segmenter import Segmenter


class SemanticScorer:
    """One (C, C) confusion matrix for the split; metrics in both conventions (over the dataset's
    ``scored_classes`` when it names a subset)."""

    def __init__(self, dataset: SegDataset):
        self.num_classes, self.ignore_index = dataset.num_classes, dataset.ignore_index
        self.shape: tuple[int, ...] = (self.num_classes, self.num_classes)
        self.classes = dataset.scored_classes

    def counts(self, pred: np.ndarray, gt: np.ndarray, sample: Sample) -> torch.Tensor:
        return confusion_matrix(pred, gt, self.num_classes, self.ignore_index)

    def metrics(self, acc: torch.Tensor) -> dict[str, dict[str, Any]]:
        return {name: segmentation_metrics(acc, name, self.classes) for name in CONVENTIONS}

    def running(self, acc: torch.Tensor) -> float:
        return segmentation_metrics(acc, "mmseg", self.classes)["mIoU"]

    def check(self, counts: torch.Tensor, sample: Sample) -> str | None:
        return None  # any non-negative (C, C) counts can be an image's (checked by the record store)


class EpisodeScorer:
    """PASCAL-5i: a (background, class) confusion matrix per fold class, summed over its episodes."""

    def __init__(self, dataset: SegDataset):
        self.shape = (dataset.num_classes, 2, 2)

    def counts(self, pred: np.ndarray, gt: np.ndarray, sample: Sample) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.int64)
        out[int(sample.group)] = confusion_matrix(pred, gt, 2, 255)
        return out

    def metrics(self, acc: torch.Tensor) -> dict[str, dict[str, Any]]:
        return {"episodes": episode_metrics(acc)}

    def running(self, acc: torch.Tensor) -> float:
        return episode_metrics(acc)["mIoU"]

    def check(self, counts: torch.Tensor, sample: Sample) -> str | None:
        """An episode counts towards its own class only."""
        slots = counts.flatten(1).any(dim=1).nonzero().flatten().tolist()
        wrong = [k for k in slots if k != int(sample.group)]
        return f"counts for fold class {wrong[0]} in an episode of class {sample.group}" if wrong else None


SCORERS = {"semantic": SemanticScorer, "episodes": EpisodeScorer}


@dataclass
class EvalResult:
    """Attributes:
    benchmark: the benchmark name.
    metrics: the headline metrics (the chosen convention; PASCAL-5i: mIoU / FB-IoU), fractions in [0, 1].
    all_metrics: every convention computed from the same accumulation.
    accumulator: the summed integer counts (confusion matrix / matrices).
    info: how the number was made (dataset, method, model, protocol, settings, run statistics).
    run_dir: where records, predictions and reports are (``None`` without ``out_dir``).
    """

    benchmark: str
    metrics: dict[str, Any]
    all_metrics: dict[str, dict[str, Any]]
    accumulator: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def miou(self) -> float:
        return float(self.metrics["mIoU"])


def _batches(samples: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    """Consecutive samples that share a vocabulary, at most ``size`` at a time."""
    batch: list[Sample] = []
    for s in samples:
        if batch and (len(batch) >= size or s.group != batch[0].group):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _row_id(identity: dict[str, Any], protocol: str, overrides: dict[str, Any]) -> str:
    """Identifies a summary-table row: the same model, method and protocol across benchmarks."""
    common = {k: v for k, v in identity.items() if k not in ("dataset", "settings")}
    return run_id({**common, "protocol": protocol, "overrides": overrides})


def evaluate(
    segmenter: Segmenter,
    dataset: SegDataset,
    *,
    protocol: str = "paper",
    overrides: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    convention: str | None = None,
    save_predictions: bool = False,
    images_per_batch: int = 2,
    progress: bool = True,
    shard: bool = True,
    seed: int | None = None,
) -> EvalResult:
    """Evaluate ``segmenter`` on ``dataset`` (any object with ``predict_arrays``, ``describe``,
    ``spec``, ``clip``, ``method``, ``templates``, ``dtype`` and ``device`` will do).

    Under torchrun the sorted samples are sharded by rank (``samples[rank::world]``) and the counts
    all-reduced, so every process returns the single-process result; only rank 0 writes reports.

    Args:
        protocol: ``paper``, ``unified`` or ``default`` (:mod:`vocabseg.eval.protocols`).
        overrides: inference settings applied on top of the protocol.
        out_dir: results go to ``out_dir/<benchmark>/<method>-<run id>/`` (per-image records, so a
            rerun resumes; ``result.json``, ``result.md``; ``predictions/`` PNGs). ``None``: nothing
            is written and nothing resumes.
        limit: only the first ``limit`` samples of the sorted split.
        convention: the headline metrics: ``mmseg`` or ``detectron2`` (both are computed); ``None``: the
            protocol's (the paper protocol's of a method published with detectron2's, else mmseg).
        save_predictions: write each prediction as a palette PNG of dataset label indices.
        images_per_batch: images whose windows share forward passes.
        shard: under torchrun, split the samples across processes (every process must call). With
            ``False`` this process evaluates everything alone (validation on one rank of a training run).
        seed: the seed ``segmenter``'s random weights were drawn with, if any; only recorded in the
            reports (the records are keyed by the weights themselves, see :func:`~.records.run_identity`).
    """
    if convention is not None:
        lookup(CONVENTIONS, convention, "metric convention")
    if save_predictions and out_dir is None:
        raise ValueError("save_predictions needs an out_dir to write the PNGs to.")
    world = world_info() if shard else WorldInfo()
    method = segmenter.spec.name
    resolved = resolve_protocol(protocol, method, dataset.settings_key, dataset.has_background, overrides)
    config = resolved.config
    convention = convention or resolved.convention
    identity = run_identity(segmenter, dataset, config)
    rid = run_id(identity)
    scorer = lookup(SCORERS, dataset.kind, "dataset kind")(dataset)
    samples = dataset.limited(limit)
    part = samples[world.rank :: world.world_size]

    run_dir = Path(out_dir) / dataset.name / f"{method}-{rid}" if out_dir is not None else None
    store = RecordStore(run_dir, scorer.shape) if run_dir is not None else None
    if run_dir is not None and world.is_main:
        write_run_identity(run_dir, identity)
    by_id = {s.id: s for s in part}

    def check(sample_id: str, counts: torch.Tensor) -> str | None:
        return scorer.check(counts, by_id[sample_id])

    done = store.load(list(by_id), check) if store is not None else {}
    acc = torch.zeros(scorer.shape, dtype=torch.int64)
    for s in part:
        if s.id in done:
            acc += s.weight * done[s.id]
    todo = sorted((s for s in part if s.id not in done), key=lambda s: (s.group or 0, s.id))
    palette = dataset.palette_colors() if save_predictions else None

    start = time.perf_counter()
    bar = tqdm(
        total=len(part),
        initial=len(part) - len(todo),
        desc=dataset.name,
        unit="img",
        file=sys.stderr,
        disable=not (progress and world.is_main),
    )
    for batch in _batches(todo, max(images_per_batch, 1)):
        images = [dataset.read_image(s) for s in batch]
        labels = [dataset.read_label(s) for s in batch]
        for image, label, s in zip(images, labels, batch):
            check_same_size(image, label, s, dataset.name)
        results = segmenter.predict_arrays(images, dataset.vocabulary_for(batch[0]), config, return_probs=False)
        for s, label, res in zip(batch, labels, results):
            counts = scorer.counts(np.asarray(res.labels), label, s)
            if store is not None:
                store.save(s.id, counts, pixels=label.size)
            if palette is not None:
                save_label_png(run_dir / "predictions" / f"{s.id}.png", res.labels, palette)
            acc += s.weight * counts
        bar.update(len(batch))
        bar.set_postfix(mIoU=f"{100 * scorer.running(acc):.2f}")
    bar.close()

    reduce = all_reduce_sum if world.distributed else (lambda t, device: t.clone())
    total = reduce(acc, segmenter.device)
    computed, resumed = reduce(torch.tensor([len(todo), len(part) - len(todo)]), segmenter.device).tolist()
    seconds = time.perf_counter() - start
    all_metrics = scorer.metrics(total)
    headline = all_metrics.get(convention, next(iter(all_metrics.values())))
    info = {
        "dataset": dataset.describe(),
        **segmenter.describe(config),
        "protocol": {**resolved.to_dict(), "label": resolved.label},
        "convention": convention if dataset.kind == "semantic" else "episodes",
        "limit": limit,
        "num_evaluated": len(samples),
        "computed": int(computed),
        "resumed": int(resumed),
        "world_size": world.world_size,
        "seed": seed,
        "seconds": round(seconds, 3),
        "images_per_second": round(computed / seconds, 3) if computed and seconds > 0 else None,
        "run_id": rid,
        "row_id": _row_id(identity, resolved.name, resolved.overrides),
    }
    result = EvalResult(dataset.name, headline, all_metrics, total, info, run_dir)
    if run_dir is not None and world.is_main:
        write_result(result)
    if world.distributed:
        barrier()
    return result
