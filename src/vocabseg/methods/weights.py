"""Finding and reading a trained method's weights: a checkpoint directory, a file in one, or an
``hf-hub:ORG/REPO`` id holding the same files.

A checkpoint directory (written by ``vocabseg train``) holds ``config.json`` (which method, its
options and the base CLIP it was trained on) and ``model.safetensors`` (the trained tensors; all of
CLIP's too when CLIP itself was trained from random weights), plus a ``manifest.json`` of file
sizes and hashes that makes a torn or corrupted copy fail loudly instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, WeightsUnavailableError
from ..models.clip import HF_HUB_PREFIX

#: the checkpoint format (written by :mod:`vocabseg.train.checkpoint`, read here)
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class TrainedWeights:
    """A trained checkpoint read from disk: where it was, its config, and its tensors."""

    source: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        return str(self.config.get("method", ""))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.config.get("options", {}))

    @property
    def clip(self) -> dict[str, Any]:
        return dict(self.config.get("clip", {}))


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Check that ``folder`` is a complete, intact checkpoint: every file ``manifest.json`` lists exists
    with its recorded size and sha256, and the model and config are among them. Returns the manifest;
    every problem is one :class:`CheckpointError` naming the file and what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint {folder} does not exist or is not a directory.")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = dict(manifest["files"])
        version = int(manifest.get("format_version", 0))
    except FileNotFoundError:
        raise CheckpointError(
            f"Checkpoint {folder} is incomplete: {MANIFEST_FILE} is missing (it is written last, so the "
            "checkpoint was not finished or was copied partially)."
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"Checkpoint {folder}: {MANIFEST_FILE} is unreadable ({exc}).") from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {folder} has format version {version}; this vocabseg reads up to {FORMAT_VERSION}. "
            "Upgrade vocabseg."
        )
    for name in (MODEL_FILE, CONFIG_FILE):
        if name not in files:
            raise CheckpointError(f"Checkpoint {folder}: {MANIFEST_FILE} does not list {name}.")
    for name, facts in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"Checkpoint {folder}: {name} is missing (listed in {MANIFEST_FILE}).")
        size = path.stat().st_size
        if size != facts.get("size"):
            raise CheckpointError(
                f"Checkpoint {folder}: {name} has {size} bytes, expected {facts.get('size')} (truncated or "
                "replaced). Copy the checkpoint again."
            )
        if file_digest(path) != facts.get("sha256"):
            raise CheckpointError(f"Checkpoint {folder}: {name} is corrupt (sha256 differs from {MANIFEST_FILE}).")
    return manifest


def _download_from_hub(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo.partition("@")
    try:
        path = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[CONFIG_FILE, MODEL_FILE, MANIFEST_FILE]
        )
    except Exception as exc:  # network, auth, missing repo: all end as "unavailable"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise WeightsUnavailableError(
            f"Could not download trained weights {HF_HUB_PREFIX}{repo}: {exc}"
            + (" (HF_HUB_OFFLINE is set, so nothing is downloaded)" if offline else "")
            + f"\n  - Offline? Download the repository's {CONFIG_FILE} and {MODEL_FILE} elsewhere and pass the "
            "folder: --weights /path/to/folder (Python: weights='/path/to/folder')."
        ) from exc
    return Path(path)


def resolve_checkpoint_dir(weights: str | os.PathLike) -> Path:
    """The folder holding ``config.json`` + ``model.safetensors`` for a directory, a file or a hub id."""
    text = str(weights)
    if text.startswith(HF_HUB_PREFIX):
        return _download_from_hub(text[len(HF_HUB_PREFIX) :])
    path = Path(text).expanduser()
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise WeightsUnavailableError(
            f"Trained weights not found: {path} does not exist. Give a checkpoint folder written by "
            "`vocabseg train` (e.g. runs/NAME/checkpoint-last), its model.safetensors, or hf-hub:ORG/REPO."
        )
    return path


def read_trained_weights(
    weights: str | os.PathLike, method: str | None = None, base_model: str | None = None
) -> TrainedWeights:
    """Read and check a trained checkpoint; every problem is one :class:`CheckpointError` that says
    which file is wrong and what was expected. A released checkpoint file of ``method`` (CAT-Seg's
    ``model_base.pth``...) is converted on the fly (:mod:`vocabseg.methods.official`; ``base_model``:
    its CLIP architecture when the converter cannot tell it)."""
    from .official import is_official_file, read_official_weights

    if is_official_file(weights):
        return read_official_weights(weights, method, base_model)
    folder = resolve_checkpoint_dir(weights)
    missing = [n for n in (CONFIG_FILE, MODEL_FILE) if not (folder / n).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"{folder} is not a vocabseg checkpoint: {', '.join(missing)} missing "
            f"(found: {', '.join(present) or 'nothing'}). "
            f"A checkpoint folder holds {CONFIG_FILE} and {MODEL_FILE}, as `vocabseg train` writes them."
        )
    if (folder / MANIFEST_FILE).is_file():
        verify_manifest(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {folder}: {CONFIG_FILE} is not valid JSON ({exc}).") from exc
    if not isinstance(config, dict) or not config.get("method"):
        raise CheckpointError(f"Checkpoint {folder}: {CONFIG_FILE} does not name the method it belongs to.")
    try:
        state = load_file(folder / MODEL_FILE)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"Checkpoint {folder}: {MODEL_FILE} is not a readable safetensors file ({exc}).") from exc
    return TrainedWeights(str(weights), config, state)
