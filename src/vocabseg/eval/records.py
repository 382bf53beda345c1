"""Per-image results persisted as they are computed, so an interrupted evaluation resumes without
recomputing anything.

A run directory is keyed by a hash of everything that determines a per-image result: the benchmark's
classes and label handling, the method, the model's exact weights, templates and every inference
setting (not the batch size, not the device). A changed configuration therefore gets a new directory
and never reuses stale records; the same configuration finds its records and skips those images.

Each image's confusion counts are one small JSON file (sparse: non-zero entries only), written to a
temporary name and renamed, so a record is either complete or absent. A record is still checked when
it is loaded (a disk error, a hand edit, a file copied from elsewhere): one that cannot be the counts
of that image is recomputed, with one warning line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import torch

from .. import __version__
from ..data.dataset import SegDataset
from ..inference.config import LATER_SETTINGS, InferenceConfig
from ..io.files import atomic_write_text
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
    defaults = InferenceConfig()
    for name in LATER_SETTINGS:  # at their defaults they change nothing: earlier runs keep their records
        if settings[name] == getattr(defaults, name):
            del settings[name]
    described = segmenter.describe(config)
    identity = {
        "record_format": RECORD_FORMAT,
        "vocabseg": __version__,
        "dataset": dataset.identity(),
        "method": described["method"],
        "method_options": _method_options(segmenter.method),
        "model": described["model"],
        "weights": model_fingerprint(segmenter),
        "dtype": str(segmenter.dtype),
        "surgery": described["surgery"],
        "backend": [described.get("backend", "torch"), described.get("precision", "f32")],
        "templates": list(segmenter.templates),
        "settings": settings,
    }
    if "refine" in described:  # only then: the identities (so the records) of unrefined runs stay as they were
        identity["refine"] = {**described["refine"], "vfm_weights": weights_fingerprint(segmenter.refine_vfm)}
    return identity


def _method_options(method: torch.nn.Module) -> dict[str, Any]:
    """The options a method was built with (ProxyCLIP's gamma/beta, SFP's outlier mode...): those
    :func:`~vocabseg.methods.create_method` recorded, else its scalar attributes. Modules (a VFM
    passed as an object) are left out: the weights fingerprint covers them."""
    options = getattr(method, "method_options", None)
    if options is None:
        options = {k: v for k, v in vars(method).items() if not k.startswith("_")}
    plain = (bool, int, float, str, type(None))
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in sorted(options.items())
        if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))
    }


def run_id(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: the largest count sum an int64 accumulator takes without overflow (records without ``pixels``)
_INT64_MAX = 2**63 - 1

#: ``check(sample_id, counts)``: why these counts cannot be that sample's, or ``None``
RecordCheck = Callable[[str, torch.Tensor], str | None]


class InvalidRecord(ValueError):
    """A record file whose content cannot be the counts of its image (it is recomputed)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise InvalidRecord(f"{what} is not a list of integers")
    return value


def parse_record(record: Any, sample_id: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense counts of a record, after checking that they can be one image's confusion counts:
    the right sample and shape (number of classes), integer flat indices in range and not repeated,
    non-negative integer counts, and (where the record stores the image's pixel count) no more
    counted pixels than the image has. Non-negative counts of a confusion matrix also make every
    class's intersection at most its union and its ground-truth and predicted areas at most the total.

    Raises:
        InvalidRecord: the first problem found.
    """
    if not isinstance(record, dict):
        raise InvalidRecord("not a JSON object")
    if record.get("id") != sample_id:
        raise InvalidRecord(f"it holds the id {record.get('id')!r}")
    if record.get("shape") != list(shape):
        raise InvalidRecord(f"shape {record.get('shape')}, not the benchmark's {list(shape)}")
    index, count = _int_list(record.get("index"), "index"), _int_list(record.get("count"), "count")
    if len(index) != len(count):
        raise InvalidRecord(f"{len(index)} indices but {len(count)} counts")
    size = math.prod(shape)
    if index and (min(index) < 0 or max(index) >= size):
        raise InvalidRecord(f"an index is outside 0..{size - 1}: {min(index)}..{max(index)}")
    if len(set(index)) != len(index):
        raise InvalidRecord("an index is repeated")
    if count and min(count) < 0:
        raise InvalidRecord(f"a count is negative: {min(count)}")
    total, pixels = sum(count), record.get("pixels")
    if pixels is not None and not (_is_int(pixels) and pixels >= 0):
        raise InvalidRecord(f"pixels is {pixels!r}, not a non-negative integer")
    if pixels is not None and total > pixels:
        raise InvalidRecord(f"{total} pixels counted, more than the image's {pixels}")
    if total > _INT64_MAX:
        raise InvalidRecord(f"{total} pixels counted, more than an int64 holds")
    flat = torch.zeros(size, dtype=torch.int64)
    flat[torch.tensor(index, dtype=torch.int64)] = torch.tensor(count, dtype=torch.int64)
    return flat.view(shape)


class RecordStore:
    """One JSON record per sample id under ``run_dir/records``: the sample's accumulator entries."""

    def __init__(self, run_dir: str | os.PathLike, shape: tuple[int, ...]):
        self.dir = Path(run_dir) / "records"
        self.shape = tuple(shape)

    def path(self, sample_id: str) -> Path:
        return self.dir / f"{quote(sample_id, safe='')}.json"

    def save(self, sample_id: str, counts: torch.Tensor, pixels: int | None = None) -> None:
        """``pixels``: the image's pixel count, an upper bound on the counts' sum checked on load."""
        flat = counts.reshape(-1)
        index = torch.nonzero(flat).flatten()
        record = {"id": sample_id, "shape": list(self.shape), "index": index.tolist(), "count": flat[index].tolist()}
        if pixels is not None:
            record["pixels"] = int(pixels)
        atomic_write_text(self.path(sample_id), json.dumps(record, separators=(",", ":"), allow_nan=False))

    def load(self, sample_ids: Sequence[str], check: RecordCheck | None = None) -> dict[str, torch.Tensor]:
        """The valid stored records among ``sample_ids``. A record that is unreadable, truncated, of
        another shape or sample, inconsistent (:func:`parse_record`) or refused by ``check`` is left
        out, so it is recomputed, with one warning naming the file."""
        if not self.dir.is_dir():
            return {}
        present = {p.name for p in self.dir.iterdir() if p.suffix == ".json"}
        found = {}
        for sample_id in sample_ids:
            path = self.path(sample_id)
            if path.name not in present:
                continue
            try:
                try:
                    record = json.loads(path.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise InvalidRecord(f"unreadable ({exc})") from exc
                counts = parse_record(record, sample_id, self.shape)
                reason = check(sample_id, counts) if check is not None else None
                if reason is not None:
                    raise InvalidRecord(reason)
            except InvalidRecord as exc:
                warnings.warn(f"recomputing the invalid record {path}: {exc}.", stacklevel=2)
                continue
            found[sample_id] = counts
        return found
