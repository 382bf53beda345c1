"""Loading CLIP models through open_clip: pretrained tags, ``hf-hub:`` ids, ``local-dir:`` folders
and local checkpoint files, with one clear error when weights cannot be reached.

Random weights are built only when the caller asks for them (``pretrained=None``), with a warning:
a silent fallback would produce plausible-looking but meaningless segmentations.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import resize_pos_embed
from open_clip.pretrained import download_pretrained_from_hf

from .._names import lookup
from ..errors import WeightsUnavailableError

#: CLIP's own normalisation, used when a model object carries no preprocessing config.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class LoadedCLIP:
    """An open_clip model with what inference needs to use it correctly."""

    model: torch.nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str  # a human-readable identity for reports ("ViT-B-16/openai", "custom")


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The directory open_clip / huggingface_hub download weights into."""
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _weights_unavailable(what: str, cache_dir: str | None, cause: BaseException) -> WeightsUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return WeightsUnavailableError(
        f"Could not load pretrained weights for {what}: {cause}\n"
        f"  - Weights are downloaded once into the cache directory {hub_cache_dir(cache_dir)}"
        + (" (HF_HUB_OFFLINE is set, so nothing is downloaded)" if offline else "")
        + ".\n"
        "  - Offline? Pass a local checkpoint instead: on the command line "
        "`--model ViT-B-16 --pretrained /path/to/open_clip_pytorch_model.bin` (.pt, .bin or .safetensors), "
        "or `--model local-dir:/path/to/folder` (open_clip_config.json + weights); "
        "in Python `Segmenter(model=..., pretrained='/path/to/file')`.\n"
        "  - For a quick test without any weights use `--pretrained none` (random weights: "
        "the segmentation will be meaningless)."
    )


def _check_architecture(name: str) -> str:
    cleaned = name.replace("/", "-")
    table = {m: m for m in open_clip.list_models()}
    return lookup(table, cleaned, "open_clip model")


def _is_checkpoint_path(pretrained: str) -> bool:
    return Path(pretrained).suffix in CHECKPOINT_SUFFIXES or os.sep in pretrained or Path(pretrained).is_file()


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released ``.pt`` files are TorchScript archives (a zip with a ``code/`` folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _load_checkpoint_file(arch: str, path_str: str, device: str | torch.device) -> torch.nn.Module:
    """A local checkpoint: a state dict (.bin/.pth/.pt/.safetensors) or an OpenAI TorchScript archive."""
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        if not _is_torchscript_archive(path):
            return open_clip.create_model(arch, pretrained=str(path), device=device)
        # torch.load(weights_only=True) refuses TorchScript; torch.jit.load runs no pickled Python code
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clip = open_clip.create_model(arch, pretrained=None)
        resize_pos_embed(state, clip)
        clip.load_state_dict(state, strict=True)
        return clip.to(device)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise WeightsUnavailableError(
            f"Could not load {arch} weights from {path}: {exc}\n"
            "  - The file must be an open_clip/OpenAI state dict (.bin, .pth, .pt, .safetensors) or an "
            "OpenAI TorchScript .pt archive, for this architecture."
        ) from exc


def load_clip(
    model: str,
    pretrained: str | None = "openai",
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> LoadedCLIP:
    """Build an open_clip model by name and load its weights.

    Args:
        model: an open_clip architecture (``ViT-B-16``), ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: a pretrained tag (``openai``, ``laion2b_s34b_b88k``...), a checkpoint file
            (``.pt`` OpenAI/JIT, ``.bin``, ``.safetensors``), or ``None`` for random weights.
            Ignored for ``hf-hub:`` and ``local-dir:`` names, whose weights come with them.
        device: where to put the model.
        cache_dir: download cache (default: the Hugging Face hub cache).
    """
    if model.startswith(HF_HUB_PREFIX):
        try:  # open_clip only warns when the weights are missing; fetch them first so we can fail
            download_pretrained_from_hf(model[len(HF_HUB_PREFIX) :], cache_dir=cache_dir)
            clip = open_clip.create_model(model, device=device, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as exc:
            raise _weights_unavailable(model, cache_dir, exc) from exc
        name = model
    elif model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model[len(LOCAL_DIR_PREFIX) :])
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no open_clip_config.json (needed for {model!r}).")
        has_weights = any(
            (folder / f).is_file() for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        )
        if not has_weights and pretrained is not None:
            raise WeightsUnavailableError(
                f"{folder} has no open_clip_model.safetensors nor open_clip_pytorch_model.bin. "
                "Put the weights there, or pass pretrained=None (--pretrained none) for random weights."
            )
        if not has_weights:
            warnings.warn(f"{model}: no weights in the folder, using RANDOM weights.", stacklevel=2)
        clip = open_clip.create_model(model, device=device)
        name = model
    else:
        arch = _check_architecture(model)
        if pretrained is None:
            warnings.warn(
                f"{arch}: pretrained=None, using RANDOM weights; segmentations will be meaningless.",
                stacklevel=2,
            )
            clip = open_clip.create_model(arch, pretrained=None, device=device)
        elif _is_checkpoint_path(pretrained):
            clip = _load_checkpoint_file(arch, pretrained, device)
        else:
            lookup(
                {t: t for t in open_clip.list_pretrained_tags_by_model(arch)}, pretrained, f"pretrained tag for {arch}"
            )
            try:
                clip = open_clip.create_model(arch, pretrained=pretrained, device=device, cache_dir=cache_dir)
            except RuntimeError as exc:
                raise _weights_unavailable(f"{arch} (pretrained={pretrained!r})", cache_dir, exc) from exc
        name = f"{arch}/{pretrained if pretrained is not None else 'random'}"
    clip.eval()
    mean, std = clip_normalization(clip)
    return LoadedCLIP(clip, open_clip.get_tokenizer(model), mean, std, name)


def clip_normalization(clip: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean/std the model was trained with (open_clip stores them on ``visual``)."""
    visual = getattr(clip, "visual", clip)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", getattr(visual, "image_mean", None) or OPENAI_MEAN))
    std = tuple(cfg.get("std", getattr(visual, "image_std", None) or OPENAI_STD))
    return mean, std


def default_tokenizer(clip: torch.nn.Module) -> Any:
    """open_clip's CLIP BPE tokenizer at the model's context length (for model objects)."""
    return open_clip.SimpleTokenizer(context_length=getattr(clip, "context_length", 77))
