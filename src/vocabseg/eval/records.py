"""Per-image results persisted as they are computed, so an interrupted evaluation resumes without
recomputing anything.

A run directory is keyed by a hash of everything that determines a per-image result: the benchmark's
classes and label handling, the method, the model's exact weights, templates and every inference
setting (not the batch size, not the device). A changed configuration therefore gets a new directory
and never reuses stale records; the same configuration finds its records and skips those images.

Each image's confusion counts are one small JSON file (sparse: non-zero entries only), written to a
temporary name and renamed, so a record is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import torch

from .. import __version__
from ..data.dataset import SegDataset
from ..data.files import atomic_write_text
from ..inference.config import InferenceConfig
from ..models.fingerprint import weights_fingerprint

if TYPE_CHECKING:
    from ..segmenter import Segmenter

RECORD_FORMAT = 1


def model_fingerprint(segmenter: Segmenter) -> str:
    """A hash of the exact bytes of every parameter and buffer of the CLIP model and the method
    (the VFM and a trained head included), so two checkpoints of one architecture never share
    results. Recomputed whenever weights change in place (fine-tuning, a checkpoint load)."""
    clip = weights_fingerprint(segmenter.clip.model)
    # the method wraps CLIP's visual tower (already hashed above); hash only what it adds
    own = weights_fingerprint(segmenter.method, keep=lambda name: not name.startswith("tower.visual."), tag="own")
    return f"{clip}-{own}"


def run_identity(segmenter: Segmenter, dataset: SegDataset, config: InferenceConfig) -> dict[str, Any]:
    """Everything a per-image result depends on."""
    settings = config.to_dict()
    settings.pop("batch_size", None)  # windows are batched without changing the numbers
    described = segmenter.describe(config)
    return {
        "record_format": RECORD_FORMAT,
        "vocabseg": __version__,
        "dataset": dataset.identity(),
        "method": described["method"],
        "method_options": _method_options(segmenter.method),
        "model": described["model"],
        "weights": model_fingerprint(segmenter),
        "dtype": str(segmenter.dtype),
        "surgery": described["surgery"],
        "templates": list(segmenter.templates),
        "settings": settings,
    }


def _method_options(method: torch.nn.Module) -> dict[str, Any]:
    """Scalar hyper-parameters of a method (ProxyCLIP's gamma/beta, NACLIP's gaussian_std...)."""
    return {k: v for k, v in sorted(vars(method).items()) if not k.startswith("_") and isinstance(v, (int, float))}


def run_id(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class RecordStore:
    """One JSON record per sample id under ``run_dir/records``: the sample's accumulator entries."""

    def __init__(self, run_dir: str | os.PathLike, shape: tuple[int, ...]):
        self.dir = Path(run_dir) / "records"
        self.shape = tuple(shape)

    def path(self, sample_id: str) -> Path:
        return self.dir / f"{quote(sample_id, safe='')}.json"

    def save(self, sample_id: str, counts: torch.Tensor) -> None:
        flat = counts.reshape(-1)
        index = torch.nonzero(flat).flatten()
        record = {"id": sample_id, "shape": list(self.shape), "index": index.tolist(), "count": flat[index].tolist()}
        atomic_write_text(self.path(sample_id), json.dumps(record, separators=(",", ":")))

    def load(self, sample_ids: list[str]) -> dict[str, torch.Tensor]:
        """The stored records among ``sample_ids`` (records of other shapes or ids are ignored)."""
        if not self.dir.is_dir():
            return {}
        present = {p.name for p in self.dir.iterdir() if p.suffix == ".json"}
        found = {}
        for sample_id in sample_ids:
            path = self.path(sample_id)
            if path.name not in present:
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # unreadable: recompute it
            if record.get("id") != sample_id or tuple(record.get("shape", ())) != self.shape:
                continue
            flat = torch.zeros(int(torch.tensor(self.shape).prod()), dtype=torch.int64)
            flat[torch.tensor(record["index"], dtype=torch.int64)] = torch.tensor(record["count"], dtype=torch.int64)
            found[sample_id] = flat.view(self.shape)
        return found
