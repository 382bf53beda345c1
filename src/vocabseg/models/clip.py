"""Loading CLIP models through open_clip: pretrained tags, ``hf-hub:`` ids, ``local-dir:`` folders
and local checkpoint files, with one clear error when weights cannot be reached.

Random weights are built only when the caller asks for them (``pretrained=None``), with a warning:
a silent fallback would produce plausible-looking but meaningless segmentations. Such models are
marked (:func:`has_random_weights`), so the text-embedding cache does not keep entries on disk that
no later run can reuse.

Downloads ask the hub once per process whether it answers (:func:`hub_access`); when it does not,
huggingface_hub runs offline, so cached weights still load and missing ones fail at once, instead of
after a minute of retries.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import resize_pos_embed
from open_clip.pretrained import download_pretrained_from_hf
from safetensors import SafetensorError

from .._names import lookup
from ..errors import WeightsUnavailableError

#: CLIP's own normalisation, used when a model object carries no preprocessing config.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
#: The command-line flags that replace every downloaded weight with random ones (the VFM flag is
#: ignored by methods without a VFM, so the pair is right for every method).
RANDOM_WEIGHTS_FLAGS = "--pretrained none --vfm-pretrained none"
#: Seconds the hub gets to answer once before downloads are treated as impossible.
HUB_PROBE_TIMEOUT_S = 5.0
#: Attribute :func:`load_clip` sets on models it built with random weights (see :func:`has_random_weights`).
RANDOM_WEIGHTS_ATTR = "vocabseg_random_weights"


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


def _offline_by_environment() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1, on, yes, true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@functools.cache
def _hub_answers() -> bool:
    """One HEAD request to the hub endpoint (through the session huggingface_hub uses, so proxies
    and ``HF_ENDPOINT`` apply); asked once per process."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # DNS, refused, timeout, proxy, TLS: a download would fail the same way
        return False
    return True


def hub_offline_reason() -> str | None:
    """Why nothing can be downloaded (``HF_HUB_OFFLINE``, or a hub that does not answer), else None."""
    if _offline_by_environment():
        return "HF_HUB_OFFLINE is set"
    if not _hub_answers():
        from huggingface_hub import constants

        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached"
    return None


@contextmanager
def hub_access() -> Iterator[None]:
    """Run hub downloads inside only if the hub answers; otherwise with huggingface_hub offline for
    the duration: cached files load at once and missing ones fail at once (its own retries of each
    file take about 25 s, with a warning line per retry)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_offline_reason() is None:
        yield
        return
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub on every request
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _is_cache_miss(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is huggingface_hub's "offline and not in the cache"."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def download_hint(local_hint: str) -> str:
    """The ways out when weights cannot be downloaded, for the error messages of CLIP and VFMs."""
    return (
        f"  - Offline? {local_hint}\n"
        f"  - For a quick test without any weights add `{RANDOM_WEIGHTS_FLAGS}` (Python: `pretrained=None, "
        "vfm_pretrained=None`): random weights, so the segmentation will be meaningless."
    )


def weights_unavailable(
    what: str, cache_dir: str | os.PathLike | None, cause: BaseException, local_hint: str
) -> WeightsUnavailableError:
    """One message for weights that could not be loaded: why, and the ways out (``local_hint``: how
    to pass a local file instead)."""
    reason = hub_offline_reason()
    cache = hub_cache_dir(cache_dir)
    if reason is not None and _is_cache_miss(cause):  # the usual case, said in one line
        head = f"Could not load pretrained weights for {what}: they are not in the cache {cache} and {reason}."
    else:
        head = (
            f"Could not load pretrained weights for {what}: {cause}\n"
            f"  - Weights are downloaded once into the cache directory {cache}"
            + (f" ({reason}, so nothing is downloaded)" if reason else "")
            + "."
        )
    return WeightsUnavailableError(f"{head}\n{download_hint(local_hint)}")


_LOCAL_CLIP_HINT = (
    "Pass a local checkpoint instead: on the command line "
    "`--model ViT-B-16 --pretrained /path/to/open_clip_pytorch_model.bin` (.pt, .bin or .safetensors), "
    "or `--model local-dir:/path/to/folder` (open_clip_config.json + weights); "
    "in Python `Segmenter(model=..., pretrained='/path/to/file')`."
)


def has_random_weights(model: torch.nn.Module) -> bool:
    """Whether :func:`load_clip` built ``model`` with random weights that nothing has replaced since
    (each process draws new ones, so caches keyed by them are never hit again)."""
    return bool(getattr(model, RANDOM_WEIGHTS_ATTR, False))


def _forget_random_weights(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if any(key.startswith(prefix) for key in state_dict):  # weights are being loaded into this model
        setattr(module, RANDOM_WEIGHTS_ATTR, False)


def _mark_random_weights(model: torch.nn.Module) -> None:
    setattr(model, RANDOM_WEIGHTS_ATTR, True)
    model.register_load_state_dict_pre_hook(_forget_random_weights)


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


def check_local_files(model: str, pretrained: str | None) -> None:
    """Refuse a ``local-dir:`` folder or a checkpoint file that is not there, naming the option.

    File-system checks only, so callers (``Segmenter``) can run them before anything is built.
    """
    if model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model[len(LOCAL_DIR_PREFIX) :])
        if not folder.is_dir():
            raise WeightsUnavailableError(
                f"model={model!r} (--model): the folder {folder} does not exist; local-dir: takes a folder "
                "with open_clip_config.json and the weights."
            )
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailableError(
                f"model={model!r} (--model): {folder} has no open_clip_config.json, which local-dir: needs."
            )
    elif model.startswith(HF_HUB_PREFIX) or pretrained is None or not _is_checkpoint_path(pretrained):
        return  # hub ids and tags are checked when loading; their weights may still need a download
    elif not Path(pretrained).is_file():
        raise WeightsUnavailableError(
            f"pretrained={pretrained!r} (--pretrained): checkpoint file not found; pass an existing "
            f"{'/'.join(CHECKPOINT_SUFFIXES)} file, a pretrained tag (openai...), or none for random weights."
        )


#: What a local checkpoint may be, for the messages about files that are none of these.
CHECKPOINT_FORMATS = (
    "a state dict saved with torch.save (.pt, .pth, .bin), a .safetensors file, or OpenAI's TorchScript .pt archive"
)


def _looks_like_checkpoint(path: Path) -> bool:
    """From the first bytes: a zip (torch.save since 1.6, TorchScript), a pickle (older torch.save:
    opcode PROTO), or safetensors (an 8-byte little-endian header size, then the JSON header)."""
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as f:
        head = f.read(9)
    if head[:1] == b"\x80":
        return True
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def check_checkpoint_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse a file that is no checkpoint format at all (random bytes, a text file), naming it, the
    option it came from, and the formats accepted; the loaders' own errors for such files are opaque."""
    path = Path(path)
    if not _looks_like_checkpoint(path):
        raise WeightsUnavailableError(f"{option} {path}: not a checkpoint file; expected {CHECKPOINT_FORMATS}.")
    return path


#: What loading a file in a checkpoint format can raise when its contents are damaged or unexpected.
CHECKPOINT_LOAD_ERRORS = (
    RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError
)  # fmt: skip


def _load_checkpoint_file(arch: str, path_str: str, device: str | torch.device) -> torch.nn.Module:
    """A local checkpoint: a state dict (.bin/.pth/.pt/.safetensors) or an OpenAI TorchScript archive."""
    path = check_checkpoint_file(path_str, "--pretrained")
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
    except CHECKPOINT_LOAD_ERRORS as exc:
        raise unreadable_checkpoint(f"{arch} (open_clip/OpenAI)", path, exc) from exc


def unreadable_checkpoint(what: str, path: Path, cause: BaseException) -> WeightsUnavailableError:
    """A checkpoint file that failed to load: the loader's error on one line (torch.load's run to a
    page) and what the file must be."""
    if isinstance(cause, pickle.UnpicklingError):  # torch's own text advises weights_only=False: not for us
        detail = "torch.load(weights_only=True) cannot read it (damaged, or not a plain state dict)"
    else:
        detail = " ".join(str(cause).split()) or "no details"
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return WeightsUnavailableError(
        f"Could not load {what} weights from {path}: {type(cause).__name__}: {detail}\n"
        f"  - The file must be a checkpoint of this architecture: {CHECKPOINT_FORMATS}."
    )


#: Lines open_clip logs that our own warning or error already says, once and with what to do.
_OPEN_CLIP_REPEATS = ("No pretrained weights loaded", "Failed to download weights")


def _drop_open_clip_repeats(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_OPEN_CLIP_REPEATS)


def _without_open_clip_repeats(load: Callable[..., LoadedCLIP]) -> Callable[..., LoadedCLIP]:
    """open_clip logs through the root logger; its repeats of our messages are dropped while ``load`` runs."""

    @functools.wraps(load)
    def wrapper(*args: Any, **kwargs: Any) -> LoadedCLIP:
        root = logging.getLogger()
        root.addFilter(_drop_open_clip_repeats)
        try:
            return load(*args, **kwargs)
        finally:
            root.removeFilter(_drop_open_clip_repeats)

    return wrapper


@_without_open_clip_repeats
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
    check_local_files(model, pretrained)
    if model.startswith(HF_HUB_PREFIX):
        try:  # open_clip only warns when the weights are missing; fetch them first so we can fail
            with hub_access():
                download_pretrained_from_hf(model[len(HF_HUB_PREFIX) :], cache_dir=cache_dir)
                clip = open_clip.create_model(model, device=device, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as exc:
            raise weights_unavailable(model, cache_dir, exc, _LOCAL_CLIP_HINT) from exc
        name = model
    elif model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model[len(LOCAL_DIR_PREFIX) :])
        has_weights = any(
            (folder / f).is_file() for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        )
        if not has_weights and pretrained is not None:
            raise WeightsUnavailableError(
                f"{folder} has no open_clip_model.safetensors nor open_clip_pytorch_model.bin. "
                "Put the weights there, or pass pretrained=None (--pretrained none) for random weights."
            )
        clip = open_clip.create_model(model, device=device)
        if not has_weights:
            warnings.warn(f"{model}: no weights in the folder, using RANDOM weights.", stacklevel=2)
            _mark_random_weights(clip)
        name = model
    else:
        arch = _check_architecture(model)
        if pretrained is None:
            warnings.warn(
                f"{arch}: pretrained=None, using RANDOM weights; segmentations will be meaningless.",
                stacklevel=2,
            )
            clip = open_clip.create_model(arch, pretrained=None, device=device)
            _mark_random_weights(clip)
        elif _is_checkpoint_path(pretrained):
            clip = _load_checkpoint_file(arch, pretrained, device)
        else:
            lookup(
                {t: t for t in open_clip.list_pretrained_tags_by_model(arch)}, pretrained, f"pretrained tag for {arch}"
            )
            try:
                with hub_access():
                    clip = open_clip.create_model(
                        arch,
                        pretrained=pretrained,
                        device=device,
                        cache_dir=cache_dir,
                        force_quick_gelu=tag_needs_quick_gelu(arch, pretrained),
                    )
            except RuntimeError as exc:
                raise weights_unavailable(
                    f"{arch} (pretrained={pretrained!r})", cache_dir, exc, _LOCAL_CLIP_HINT
                ) from exc
        name = f"{arch}/{pretrained if pretrained is not None else 'random'}"
    clip.eval()
    mean, std = clip_normalization(clip)
    return LoadedCLIP(clip, _get_tokenizer(model, cache_dir), mean, std, name)


def tag_needs_quick_gelu(arch: str, pretrained: str) -> bool:
    """Whether weights ``pretrained`` were trained with QuickGELU but ``arch``'s config uses GELU.

    OpenAI's CLIPs use QuickGELU, and every method's official code runs them so; open_clip's plain
    ``ViT-B-16`` config uses GELU and only warns when given the ``openai`` tag, which silently changes
    every activation. Loading such a tag forces QuickGELU, as ``ViT-B-16-quickgelu`` would.
    """
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
    arch_cfg = open_clip.get_model_config(arch) or {}
    return bool(tag_cfg.get("quick_gelu")) and not arch_cfg.get("quick_gelu", False)


def _get_tokenizer(model: str, cache_dir: str | None) -> Any:
    """open_clip's tokenizer for ``model``; hf-hub models (their config) and Hugging Face tokenizers
    (SigLIP...) may download files, so those go through :func:`hub_access` (CLIP's BPE is packaged)."""
    named = not model.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))
    text_cfg = (open_clip.get_model_config(model) or {}).get("text_cfg", {}) if named else {}
    if model.startswith(HF_HUB_PREFIX) or text_cfg.get("hf_tokenizer_name"):
        with hub_access():
            return open_clip.get_tokenizer(model, cache_dir=cache_dir)
    return open_clip.get_tokenizer(model)


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
