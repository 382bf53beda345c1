"""The front door: ``Segmenter(...).segment(image, ["cat", "sofa"])``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._names import lookup
from .backends import check_backend, wrap_method
from .errors import CheckpointError, MethodOptionError, SegmentationFailedError, SettingsError, VocabsegError
from .inference.config import InferenceConfig
from .inference.pamr import PAMR
from .inference.postprocess import GIVEN, class_probabilities, decide_labels, stream_labels, window_scores
from .inference.sliding import (
    rescaled_size,
    resize_image,
    resized_input,
    sliding_window_logits,
    window_boxes,
    window_logits_each,
)
from .io.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, source_name
from .methods import create_method, get_method_spec, list_methods
from .methods.base import SegmentationMethod
from .methods.registry import MethodSpec
from .methods.weights import read_trained_weights
from .models.clip import LoadedCLIP, check_local_files, clip_normalization, default_tokenizer, load_clip
from .models.vfm import IMAGENET_MEAN, IMAGENET_STD, VFM_SPECS, load_vfm
from .refine import create_refiner
from .refine.lposs import last_block_values
from .result import SegmentationResult
from .text.encoder import TextEncoder, default_cache_dir
from .text.templates import resolve_templates
from .text.vocabulary import Vocabulary, parse_background

ClassesLike = str | Sequence[str | Sequence[str]] | Vocabulary
T = TypeVar("T")
R = TypeVar("R")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


#: the device types a Segmenter runs on (``cuda`` and ``mps`` only where torch finds one)
_DEVICES = "cpu, cuda, cuda:N or mps"


def _resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device present on this machine (checked before any model is built)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingsError(f"device={device!r} (--device) is not a device; use {_DEVICES}.") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise SettingsError(f"device={device!r} (--device) is not supported; use {_DEVICES}.")
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise SettingsError(f"device={device!r} (--device): no CUDA GPU is available here; use cpu.")
        if resolved.index is not None and resolved.index >= count:
            raise SettingsError(
                f"device={device!r} (--device): this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}."
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"device={device!r} (--device): MPS is not available here; use cpu.")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if dtype not in _DTYPES and dtype not in _DTYPES.values():
        raise SettingsError(f"dtype={dtype!r} (--dtype) is not one of {', '.join(_DTYPES)}.")
    dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype != torch.float32 and device.type == "cpu":
        raise SettingsError(
            f"dtype={str(dtype).removeprefix('torch.')!r} (--dtype) is not supported on the CPU (fp16 kernels are "
            "missing, bf16 is ~10x slower than fp32): use float32 on the CPU, float16/bfloat16 on a GPU."
        )
    return dtype


def _check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and not (
        isinstance(max_pixels, int) and not isinstance(max_pixels, bool) and max_pixels > 0
    ):
        raise SettingsError(
            f"max_pixels={max_pixels!r} (--max-pixels) must be a positive number of pixels (Python: None for no limit)."
        )


#: ``model`` / ``pretrained`` not given: ViT-B-16 / openai, or a trained checkpoint's base CLIP.
DEFAULT = "default"
#: ``weights`` not given: fine for training-free methods, an error for trained ones.
REQUIRED = "required"
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-16", "openai"
#: windows are zero-padded to at least this many patches a side (thin images, tiny crops): one patch
#: has no spatial extent, which per-image normalisations (a trained decoder's instance norm) refuse
MIN_WINDOW_PATCHES = 2
#: the VFM a refinement (``refine=``) builds its graph on when ``refine_vfm`` is not given (LPOSS's)
DEFAULT_REFINE_VFM = "dino_vitb16"


@dataclass
class SegmentOutcome:
    """One image of :meth:`Segmenter.segment_many`: its result, or the error that stopped it."""

    index: int
    source: ImageSource
    result: SegmentationResult | None = None
    error: VocabsegError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Segmenter:
    """Open-vocabulary semantic segmentation with CLIP (training-free or trained methods).

    Args:
        method: a registered method (``vocabseg.methods.list_methods()``), or a method module built
            by :func:`~vocabseg.methods.create_method` (then ``model`` must be its CLIP model object).
        model: an open_clip architecture, ``hf-hub:``/``local-dir:`` id, or an open_clip CLIP model
            object (any weights). Default: ``ViT-B-16``, or the base CLIP a trained checkpoint names.
        pretrained: pretrained tag or checkpoint file for a named model; ``None`` = random weights.
            Default: ``openai``, or the trained checkpoint's.
        weights: a trained method's weights: a checkpoint folder written by ``vocabseg train``, its
            ``model.safetensors``, or ``hf-hub:ORG/REPO``; ``None`` = a randomly initialised head
            (with a warning: for tests and trials). Training-free methods take none.
        vfm, vfm_pretrained: the proxy VFM (ProxyCLIP): a name or a module, and its weights
            (``"default"`` hub weights, a file, or ``None`` for random).
        device, dtype: where and in which precision the model runs (fp16/bf16 only on a GPU).
        templates: a template-set name (``openai80``, ``beyond_labels12``...) or a list of strings;
            default: the set the method was published with.
        text_cache_dir: where text embeddings are cached: ``"default"`` (``$VOCABSEG_CACHE`` or
            ``~/.cache/vocabseg``), a folder, or ``None`` to disable the cache.
        tokenizer: for model objects whose tokenizer is not CLIP's BPE.
        surgery: apply the CLIP-Surgery feature adjustment to the logits (training-free methods).
        max_pixels: refuse larger images.
        method_kwargs: extra method options (``gamma``, ``beta``, ``gaussian_std``...; see
            ``get_method_spec(name).options``).
        refine: a refinement run on the method's window scores before they are scored
            (``vocabseg.refine.REFINERS``: ``"lposs"``, ``"lposs+"``); ``None`` for none.
        refine_vfm, refine_vfm_pretrained: the refinement's VFM: a name (default
            ``DEFAULT_REFINE_VFM``) or a module, and its weights (as ``vfm_pretrained``). A timm ViT
            gives the values of its last attention block (the features LPOSS was published with);
            any other module's (B, C, h, w) output is used as it is.
        refine_options: the refiner's options (``{"k": 200, "alpha": 0.9}``...; see
            ``vocabseg.refine.LPOSS``).
        backend, precision: what runs the image side: ``"torch"``, an ONNX runtime (``"onnxruntime"``,
            ``"openvino"``; exported once and cached next to the text cache) or ``"auto"`` (the fastest
            on the first windows); ``precision`` ``"f32"`` (exact) or ``"native"`` (the runtime's lower
            precision where the CPU has it). See docs/backends.md.
        **settings: overrides of the method's :class:`InferenceConfig` defaults (``short_side``,
            ``crop``, ``stride``, ``logit_scale``, ``prob_threshold``, ``pamr_steps``...). The
            default ``batch_size=0`` becomes this device's number of windows per forward pass.

    Example:
        >>> seg = Segmenter(method="sclip", model="ViT-B-16", pretrained="openai")  # doctest: +SKIP
        >>> res = seg.segment("street.jpg", "car, road, person; man")  # doctest: +SKIP
        >>> res.save("out/")  # doctest: +SKIP
    """

    def __init__(
        self,
        method: str | SegmentationMethod = "proxyclip",
        model: str | nn.Module = DEFAULT,
        pretrained: str | None = DEFAULT,
        *,
        weights: str | os.PathLike | None = REQUIRED,
        vfm: str | nn.Module | Callable | None = None,
        vfm_pretrained: str | None = "default",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        templates: str | Sequence[str] | None = None,
        text_cache_dir: str | os.PathLike | None = "default",
        tokenizer: Any = None,
        surgery: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        method_kwargs: dict[str, Any] | None = None,
        refine: str | None = None,
        refine_vfm: str | nn.Module | None = None,
        refine_vfm_pretrained: str | None = "default",
        refine_options: dict[str, Any] | None = None,
        backend: str = "torch",
        precision: str = "f32",
        **settings: Any,
    ):
        # every check of the arguments comes first, so mistakes cost no model load
        built = method if isinstance(method, nn.Module) else None
        self.spec: MethodSpec = get_method_spec(built.method_name if built is not None else method)
        config = self.spec.defaults.updated(**settings)
        self.device = _resolve_device(device)
        self.config = config.for_device(self.device)
        self.dtype = _resolve_dtype(dtype, self.device)
        _check_max_pixels(max_pixels)
        check_backend(backend, precision, method=self.spec.name, device=self.device)
        self.spec.check_options(method_kwargs or {})
        self.refiner = _check_refine(refine, refine_vfm, refine_options)
        if surgery and self.spec.trainable:
            raise MethodOptionError(f"surgery=True applies to training-free methods, not to {self.spec.name!r}.")
        if vfm is not None and not self.spec.uses_vfm:
            with_vfm = [name for name in list_methods() if get_method_spec(name).uses_vfm]
            raise MethodOptionError(
                f"Method {self.spec.name!r} does not use a VFM, so it takes no vfm= (--vfm); only the VFM "
                f"methods do: {', '.join(with_vfm)}."
            )
        if built is None and isinstance(model, str):  # a missing local-dir: folder or checkpoint file
            named = model if model != DEFAULT else (None if self.spec.trainable else DEFAULT_MODEL)
            if named is not None:  # (a trained method's default model is named in its weights)
                check_local_files(named, None if pretrained == DEFAULT else pretrained)
        self.surgery = surgery
        self.max_pixels = max_pixels
        self.templates = resolve_templates(templates or self.spec.templates)
        self.template_name = (
            (templates or self.spec.templates) if not isinstance(templates, (list, tuple)) else "custom"
        )
        trained = None if built is not None else self._read_weights(weights, model)  # a built module has its weights
        self.weights_source = trained.source if trained is not None else None

        kwargs = {**(trained.options if trained is not None else {}), **(method_kwargs or {})}
        if self.spec.uses_vfm:
            kwargs.setdefault("vfm_pretrained", vfm_pretrained)
            if vfm is not None:
                kwargs["vfm"] = vfm
        if built is not None:
            if not isinstance(model, nn.Module):
                raise MethodOptionError(
                    "A method module must come with its CLIP model object: Segmenter(method=m, model=clip)."
                )
            self.clip = self._load_clip(model, None, tokenizer)
            self.method = built.to(self.device, self.dtype).eval()
        else:
            base = trained.clip if trained is not None else {}
            stores_clip = bool(trained is not None and trained.config.get("stores_clip"))
            if model == DEFAULT:
                model = base.get("model") or DEFAULT_MODEL
                if model == "custom":
                    raise CheckpointError(
                        f"The weights at {weights} were trained on a CLIP model object, not a named one: pass the "
                        "same model (Segmenter(model=clip_module) or --model NAME --pretrained TAG/FILE)."
                    )
            if pretrained == DEFAULT:
                pretrained = base.get("pretrained") if trained is not None else DEFAULT_PRETRAINED
            with warnings.catch_warnings():
                if stores_clip:  # every CLIP weight comes from the checkpoint: no "random weights" warning
                    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
                self.clip = self._load_clip(model, pretrained, tokenizer)
            self.method = create_method(self.spec.name, self.clip.model, **kwargs)
            if self.spec.trainable:
                # "ViT-B-16/openai" -> "ViT-B-16", but ids with paths whole (local-dir:/a/b, hf-hub:org/repo)
                name = self.clip.name
                identity = name if name.startswith(("local-dir:", "hf-hub:")) else name.split("/")[0]
                self.method.clip_identity = {"model": identity, "pretrained": pretrained}
                if trained is not None:  # expect CLIP's tensors only if the checkpoint says it stores them
                    self.method.store_clip = stores_clip
                    self.method.load_checkpoint_state(trained.state)
                # checkpoints written from here on store CLIP when it cannot be rebuilt from a name and tag
                self.method.store_clip = stores_clip or pretrained is None or isinstance(model, nn.Module)
            self.method = self.method.to(self.device, self.dtype).eval()
        cache = default_cache_dir() if text_cache_dir == "default" else text_cache_dir
        self.text_encoder = TextEncoder(self.clip.model, self.clip.tokenizer, self.templates, cache)
        self.backend, self.precision = backend, precision
        #: what runs the windows: ``self.method`` itself, or its image side on an ONNX runtime
        self.runner = wrap_method(self.method, backend, precision, cache_dir=cache)
        mean, std = self.clip.mean, self.clip.std
        self._mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(3, 1, 1)
        self.refine_name = refine
        self.refine_vfm: nn.Module | None = None
        self.refine_vfm_source: dict[str, Any] = {}
        if self.refiner is not None:
            self._load_refine_vfm(refine_vfm or DEFAULT_REFINE_VFM, refine_vfm_pretrained)

    def _read_weights(self, weights: str | os.PathLike | None, model: str | nn.Module = DEFAULT):
        spec = self.spec
        if not spec.trainable:
            if weights not in (REQUIRED, None):
                raise MethodOptionError(f"Method {spec.name!r} is training-free and takes no weights=...; drop it.")
            return None
        if weights == REQUIRED:
            raise MethodOptionError(
                f"Method {spec.name!r} is a trained method: pass its weights (weights=PATH or --weights PATH: a "
                f"checkpoint folder written by `vocabseg train`, its model.safetensors, or hf-hub:ORG/REPO). "
                f"Where they come from: {spec.weights or 'train them with vocabseg train'}. "
                "For a trial without weights pass weights=None (--weights none): a random head."
            )
        if weights is None:
            warnings.warn(
                f"{spec.name}: weights=None, the trained head has RANDOM weights; segmentations will be meaningless.",
                stacklevel=3,
            )
            return None
        # a released checkpoint (.pth) is converted for this method; ``model`` names its CLIP if the converter cannot
        base = model if isinstance(model, str) and model != DEFAULT else None
        trained = read_trained_weights(weights, method=spec.name, base_model=base)
        if trained.method != spec.name:
            raise CheckpointError(
                f"The weights at {weights} are for method {trained.method!r}, not {spec.name!r}; "
                f"use --method {trained.method}."
            )
        return trained

    def _load_clip(self, model: str | nn.Module, pretrained: str | None, tokenizer: Any) -> LoadedCLIP:
        if isinstance(model, nn.Module):
            mean, std = clip_normalization(model)
            loaded = LoadedCLIP(model.eval(), tokenizer or default_tokenizer(model), mean, std, "custom")
        else:
            loaded = load_clip(model, pretrained, device="cpu")
            if tokenizer is not None:
                loaded.tokenizer = tokenizer
        loaded.model.to(self.device, self.dtype)
        return loaded

    def _load_refine_vfm(self, vfm: str | nn.Module, pretrained: str | None) -> None:
        if isinstance(vfm, str):
            self.refine_vfm_source = {"vfm": vfm, "vfm_pretrained": pretrained}
            vfm = load_vfm(vfm, pretrained, device=self.device, option="refine_vfm_pretrained")
        else:
            self.refine_vfm_source = {"vfm": "custom"}
        self.refine_vfm = vfm.to(self.device, self.dtype).eval()

    # -- public API ------------------------------------------------------------------------------------
    def vocabulary(
        self, classes: ClassesLike, background: str | Sequence[str] | None = None, prob_threshold: float = 0.0
    ) -> Vocabulary:
        """The vocabulary ``segment`` uses: parsed classes, plus a background class when background
        names are given or a probability threshold needs somewhere to send low-confidence pixels."""
        vocab = (
            classes
            if isinstance(classes, Vocabulary)
            else (Vocabulary.parse(classes) if isinstance(classes, str) else Vocabulary.from_list(classes))
        )
        names = parse_background(background)
        if names:
            vocab = vocab.with_background(names)
        elif prob_threshold > 0 and vocab.background_index is None:
            vocab = vocab.with_background()
        return vocab

    def settings(self, **overrides: Any) -> InferenceConfig:
        """The settings a call with ``overrides`` runs with (``batch_size`` resolved for the device)."""
        return self.config.updated(**overrides).for_device(self.device)

    @torch.inference_mode()
    def segment(
        self,
        images: ImageSource | Sequence[ImageSource],
        classes: ClassesLike,
        *,
        background: str | Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
        return_probs: bool = True,
        **overrides: Any,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image (returns a result) or a list of images (returns a list).

        Args:
            images: paths, encoded bytes, PIL images or uint8 arrays; sizes may differ.
            classes: ``"car, road, person; man"``, a list (``;`` synonyms allowed) or a Vocabulary.
            background: background names (``"sky; wall"`` or a list): adds a ``background`` class.
            progress: called with the number of windows processed after each batch.
            return_probs: keep the (C, H, W) class probabilities in ``result.probs``. ``False`` keeps
                only the labels and each pixel's score (all that ``result.json`` reports) and never
                holds the logits of every name at the image's size: for large vocabularies.
            **overrides: per-call inference settings (``prob_threshold=0.2``...).
        """
        single = not isinstance(images, (list, tuple))
        sources = [images] if single else list(images)
        outcomes = self.segment_many(
            sources,
            classes,
            background=background,
            images_per_batch=len(sources),
            progress=progress,
            return_probs=return_probs,
            **overrides,
        )
        results = [o.result for o in outcomes]
        return results[0] if single else results

    def segment_many(
        self,
        images: Iterable[ImageSource],
        classes: ClassesLike,
        *,
        background: str | Sequence[str] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        images_per_batch: int = 4,
        progress: Callable[[int], None] | None = None,
        max_pixels: int | None | str = DEFAULT,
        return_probs: bool = True,
        prefetch: int = 0,
        **overrides: Any,
    ) -> Iterator[SegmentOutcome]:
        """Segment a stream of images, ``images_per_batch`` at a time, yielding one outcome per image
        in input order. The one implementation behind ``segment``, the command line and the server.

        With ``on_error="skip"`` an image that cannot be read (not an image, truncated, too large)
        yields an outcome with its error and the others go on; so does one whose segmentation fails
        unexpectedly (a :class:`SegmentationFailedError` whose ``__cause__`` is the original exception).
        With ``"raise"`` the error is raised as it is.
        The classes, settings and text are checked and encoded at once (before the first outcome is asked
        for). ``max_pixels`` overrides the Segmenter's limit for these images (a server applies its
        own). ``return_probs``: see :meth:`segment`. ``prefetch`` > 0 decodes up to that many images
        ahead on a background thread (:func:`map_ahead`), so the model does not wait for decoding;
        outcomes and errors are the same.
        Close the iterator (``contextlib.closing``) when stopping early to stop that thread at once.
        """
        if on_error not in ("raise", "skip"):
            raise SettingsError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if images_per_batch < 1:
            raise SettingsError(f"images_per_batch (--images-per-batch) must be at least 1, got {images_per_batch}")
        if not (isinstance(prefetch, int) and prefetch >= 0):
            raise SettingsError(f"prefetch must be a number of images >= 0, got {prefetch!r}")
        config = self.settings(**overrides)
        vocab = self.vocabulary(classes, background, config.prob_threshold)
        limit = self.max_pixels if max_pixels == DEFAULT else max_pixels
        # encoded once, here: names the tokenizer would cut are refused before any image, and the
        # batches reuse the embeddings instead of asking the text cache again
        vocab, text = self._encoded(vocab, config)
        flush = functools.partial(
            self._flush, vocab=vocab, text=text, config=config, on_error=on_error, progress=progress,
            return_probs=return_probs,
        )  # fmt: skip
        return self._outcomes(images, flush, on_error, images_per_batch, limit, prefetch)

    def _outcomes(self, images, flush, on_error, images_per_batch, limit, prefetch) -> Iterator[SegmentOutcome]:
        pending: list[tuple[int, ImageSource, np.ndarray]] = []
        decode = functools.partial(load_image, max_pixels=limit)
        with contextlib.closing(map_ahead(decode, images, prefetch)) as decoded:
            for index, (source, image) in enumerate(decoded):
                if isinstance(image, Exception):
                    if on_error == "raise":
                        raise image
                    yield from flush(pending)
                    pending = []
                    yield SegmentOutcome(index, source, error=_outcome_error(image, source))
                    continue
                pending.append((index, source, image))
                if len(pending) == images_per_batch:
                    yield from flush(pending)
                    pending = []
            yield from flush(pending)

    def _flush(self, pending, vocab, text, config, on_error, progress, return_probs) -> Iterator[SegmentOutcome]:
        if not pending:
            return
        try:
            results = self.predict_arrays(
                [a for _, _, a in pending], vocab, config, progress=progress, return_probs=return_probs, text=text
            )
        except Exception as exc:
            if on_error == "raise":
                raise
            if len(pending) > 1:  # find the image at fault: the others still get their results
                for item in pending:
                    yield from self._flush([item], vocab, text, config, on_error, progress, return_probs)
                return
            index, source, _ = pending[0]
            yield SegmentOutcome(index, source, error=_outcome_error(exc, source))
            return
        for (index, source, _), result in zip(pending, results):
            yield SegmentOutcome(index, source, result=result)

    @torch.inference_mode()
    def predict_arrays(
        self,
        arrays: Sequence[np.ndarray],
        vocab: Vocabulary,
        config: InferenceConfig,
        progress: Callable[[int], None] | None = None,
        return_probs: bool = True,
        text: torch.Tensor | None = None,
    ) -> list[SegmentationResult]:
        """Segment decoded (H, W, 3) uint8 images with an explicit vocabulary and settings.

        ``text``: the vocabulary's embeddings when the caller has them (``vocab`` then as scored:
        ``segment_many`` passes both), else they are encoded (or read from the cache) here.

        The window logits are averaged at the resized image's size (or, with a refiner, refined from
        the windows jointly: :meth:`_refined_logits`), then brought to the input's size (bilinear,
        then PAMR if on) and scored. With ``return_probs=False`` that happens a few names
        at a time (:func:`~vocabseg.inference.postprocess.stream_labels`; upsampling and PAMR act on
        each name's map alone, so the labels are the same), and ``result.probs`` is ``None``.

        CAT-Seg's protocol (``square_size``, ``global_weight``, ``average="scores"``): the windows run on
        the resized image squashed to a square, one global view of the resized image joins them, and
        each window is scored before the averaging; the averaged probabilities are then brought to the
        input's size as they are.
        """
        config = config.for_device(self.device)
        if self.refiner is not None and (config.global_weight > 0 or config.average != "logits"):
            raise SettingsError(
                "A refinement (refine=) propagates each window's logits: it takes neither global_weight > 0 "
                "(--global-weight) nor average='scores' (--average scores)."
            )
        if text is None:
            vocab, text = self._encoded(vocab, config)
        resized = [
            resized_input(
                a, rescaled_size(*a.shape[:2], config.short_side, config.max_long_side), config.resize_filter,
                self._normalize,
            )
            for a in arrays
        ]  # fmt: skip
        square = (config.square_size, config.square_size)
        windowed = [resize_image(x, square) for x in resized] if config.square_size else resized
        method, dtype, surgery, pad = self.runner, self.dtype, self.surgery, config.pad_multiple

        def window_logits(windows: torch.Tensor) -> torch.Tensor:
            return method.logits(windows.to(dtype), text, pad_multiple=pad, surgery=surgery)

        def window_probabilities(windows: torch.Tensor) -> torch.Tensor:
            return window_scores(window_logits(windows).float(), config.logit_scale, config.score)

        if self.refiner is not None:
            logits = self._refined_logits(windowed, window_logits, config, progress)
        else:
            logits = sliding_window_logits(
                windowed,
                window_probabilities if config.average == "scores" else window_logits,
                config.crop,
                config.stride,
                config.batch_size,
                progress,
                self._min_window(),
                global_views=resized,
                global_weight=config.global_weight,
            )
        # averaged scores are probabilities already: brought to the input's size and taken as they are
        logit_scale, score = (1.0, GIVEN) if config.average == "scores" else (config.logit_scale, config.score)
        pamr = PAMR(config.pamr_steps, config.pamr_dilations) if config.pamr_steps > 0 else None
        results = []
        for i, (array, small) in enumerate(zip(arrays, resized)):
            size = array.shape[:2]
            guide = resize_image(small[None].float(), size) if pamr is not None else None
            full_logits = functools.partial(_full_size_logits, logits[i], size, pamr, guide)
            probs = scores = None
            if return_probs:
                probs = class_probabilities(full_logits(None), logit_scale, vocab.name_to_class, len(vocab), score)
                labels = decide_labels(probs, vocab.background_index, config.prob_threshold, config.area_threshold)
                probs = probs.cpu().numpy().astype(np.float32, copy=False)
            else:
                labels, scores = stream_labels(
                    full_logits,
                    vocab.name_to_class,
                    len(vocab),
                    logit_scale,
                    score,
                    vocab.background_index,
                    config.prob_threshold,
                    config.area_threshold,
                )
                scores = scores.cpu().numpy().astype(np.float32, copy=False)
            del full_logits
            logits[i] = None  # this image's logits are no longer needed
            results.append(
                SegmentationResult(
                    labels=labels.cpu().numpy().astype(np.int32),
                    classes=vocab.class_names,
                    probs=probs,
                    image=array,
                    synonyms=[list(c.names) for c in vocab.classes],
                    background_index=vocab.background_index,
                    info=self.describe(config),
                    scores=scores,
                )
            )
        return results

    def describe(self, config: InferenceConfig | None = None) -> dict[str, Any]:
        """Everything that determined a result, for reports and ``result.json``."""
        info = {
            "method": self.spec.name,
            "model": self.clip.name,
            "surgery": self.surgery,
            "backend": self.backend,
            "precision": self.precision,
            "templates": self.template_name,
            "settings": (config or self.config).for_device(self.device).to_dict(),
        }
        if self.spec.trainable:
            info["weights"] = self.weights_source or "random (weights=None)"
        if self.refiner is not None:
            options = dataclasses.asdict(self.refiner) if dataclasses.is_dataclass(self.refiner) else {}
            info["refine"] = {"name": self.refine_name, **self.refine_vfm_source, "options": options}
        return info

    # -- internals -------------------------------------------------------------------------------------
    def _encoded(self, vocab: Vocabulary, config: InferenceConfig) -> tuple[Vocabulary, torch.Tensor]:
        """The vocabulary as scored and its text embeddings (cached by the encoder, so encoding once up
        front, where a bad name is refused before any image, costs nothing later).

        Under sigmoid scores with a probability threshold the background is that threshold
        (Beyond-Labels' argmax over [0.5, sigmoids]), so its names are not scored; without one its
        names compete as any class's (CAT-Seg's PAS-20b). ``synonyms="first"`` keeps each class's
        first name (:meth:`Vocabulary.first_names`)."""
        if config.score == "sigmoid" and config.prob_threshold > 0:
            vocab = vocab.without_background_names()
        if config.synonyms == "first":
            vocab = vocab.first_names()
        return vocab, self.text_encoder.encode(vocab.prompt_names, per_template=self.spec.text_input == "per_template")

    def _refined_logits(
        self,
        resized: list[torch.Tensor],
        window_logits: Callable[[torch.Tensor], torch.Tensor],
        config: InferenceConfig,
        progress: Callable[[int], None] | None,
    ) -> list[torch.Tensor]:
        """Per image (K, H, W): the refiner's scores from every window's logits and VFM features.

        What is propagated is the method's window output as it comes (per-name cosine similarities
        for most methods, CLIPer's log-probabilities), before the logit scale and softmax; LPOSS
        keeps it on that scale. The VFM features come first, so each window's logits are brought to
        its feature grid as they arrive (what ``refine_windows`` does first anyway) instead of
        keeping every window at full resolution.
        """
        features = [self._refine_features(image, config) for image in resized]
        windows: list[list[tuple[tuple[int, int, int, int], torch.Tensor]]] = [[] for _ in resized]
        for i, box, out in window_logits_each(
            resized, window_logits, config.crop, config.stride, config.batch_size, progress, self._min_window()
        ):
            grid = features[i][box].shape[-2:]
            windows[i].append((box, F.interpolate(out[None], size=grid, mode="bilinear", align_corners=False)[0]))
        refined = []
        for i, image in enumerate(resized):
            boxes = [box for box, _ in windows[i]]
            scores = [score for _, score in windows[i]]
            feats = [features[i][box] for box in boxes]
            refined.append(self.refiner.refine_windows(self._unnormalize(image), boxes, scores, feats))
            windows[i], features[i] = [], {}  # this image's windows are no longer needed
        return refined

    def _refine_features(
        self, image: torch.Tensor, config: InferenceConfig
    ) -> dict[tuple[int, int, int, int], torch.Tensor]:
        """(C, h, w) refine-VFM features of each window (box) of ``image`` (CLIP-normalised, turned
        into the ImageNet normalisation of DINO), ``batch_size`` windows at a time.

        A timm ViT sees windows whose sides are not multiples of its patch (a whole image, an image
        smaller than the crop) resized to the nearest multiple, at least one patch: its grid then
        tiles the window evenly, as ``refine_windows`` places it.
        """
        vfm = self.refine_vfm
        model = getattr(vfm, "model", vfm)
        timm_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
        mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
        vfm_input = (self._unnormalize(image) - mean) / std
        boxes = window_boxes(image.shape[-2], image.shape[-1], config.crop, config.stride)
        patch = model.patch_embed.patch_size if timm_vit else 1
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        features = {}
        for start in range(0, len(boxes), config.batch_size):
            chunk = boxes[start : start + config.batch_size]
            batch = torch.stack([vfm_input[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
            h, w = batch.shape[-2:]
            size = (max(int(h / ph + 0.5), 1) * ph, max(int(w / pw + 0.5), 1) * pw)
            batch = resize_image(batch, size)
            feats = last_block_values(vfm, batch) if timm_vit else vfm(batch.to(self.dtype))
            features.update(zip(chunk, feats.float()))
        return features

    def _unnormalize(self, image: torch.Tensor) -> torch.Tensor:
        """A CLIP-normalised image back to RGB in [0, 1]."""
        return image * self._std + self._mean

    def _min_window(self) -> tuple[int, int]:
        """The smallest window the model is given (``MIN_WINDOW_PATCHES`` of CLIP's patches a side)."""
        patch = getattr(getattr(self.clip.model, "visual", None), "patch_size", None) or 1
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        return MIN_WINDOW_PATCHES * ph, MIN_WINDOW_PATCHES * pw

    def _normalize(self, array: np.ndarray) -> torch.Tensor:
        x = (
            torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).to(self.device).permute(2, 0, 1).float()
            / 255.0
        )
        return (x - self._mean) / self._std


def _check_refine(refine: str | None, refine_vfm: str | nn.Module | None, refine_options: dict[str, Any] | None) -> Any:
    """The refiner ``refine`` names (``None`` for none), after checking its VFM can serve it."""
    if refine is None:
        if refine_vfm is not None or refine_options:
            raise SettingsError(
                "refine_vfm= (--refine-vfm) and refine_options= apply to a refinement: add refine= (--refine lposs+)."
            )
        return None
    refiner = create_refiner(refine, **(refine_options or {}))
    if isinstance(refine_vfm, str):
        lookup(VFM_SPECS, refine_vfm, "VFM")
        fixed = [name for name, spec in VFM_SPECS.items() if spec.fixed_size is not None]
        if refine_vfm in fixed:
            usable = [name for name in VFM_SPECS if name not in fixed]
            raise SettingsError(
                f"refine_vfm={refine_vfm!r} (--refine-vfm) runs at one fixed size, not on sliding windows; "
                f"use one of {', '.join(usable)}."
            )
    elif refine_vfm is not None and not isinstance(refine_vfm, nn.Module):
        raise SettingsError(f"refine_vfm must be a VFM name or a torch module, got {type(refine_vfm).__name__}.")
    return refiner


def _full_size_logits(
    logits: torch.Tensor,
    size: tuple[int, int],
    pamr: PAMR | None,
    guide: torch.Tensor | None,
    names: list[int] | None,
) -> torch.Tensor:
    """(n, H, W): the given names' (all with ``None``) averaged logits at the input image's size."""
    chosen = logits if names is None else logits[names]
    full = F.interpolate(chosen[None], size=size, mode="bilinear", align_corners=False)
    return (pamr(guide, full) if pamr is not None else full)[0]


def map_ahead(function: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[tuple[T, R | Exception]]:
    """``(item, function(item))`` for every item in order, ``function`` running on one background
    thread up to ``depth`` items ahead of the caller (``depth=0``: in the caller's thread, no thread).

    Image decoding and PNG encoding (PIL) and the model (torch) release the GIL, so reading the
    next images or writing the last results overlaps with segmenting. An exception raised by
    ``function`` is handed over in place of its result; one raised while iterating ``items`` reaches
    the caller at once. Closing the iterator, or an exception passing through it, cancels the items
    not started and waits for the one at hand, so no thread outlives it.
    """
    if depth <= 0:
        for item in items:
            yield _settled(item, functools.partial(function, item))
        return
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vocabseg-ahead") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(function, item)))
                if len(pending) > depth:
                    yield _settled(*pending.popleft())
            while pending:
                yield _settled(*pending.popleft())
        finally:  # the pool's exit then waits for the item at hand
            for _, future in pending:
                future.cancel()


def _settled(item: T, work: Future | Callable[[], R]) -> tuple[T, R | Exception]:
    try:
        return item, work.result() if isinstance(work, Future) else work()
    except Exception as exc:
        return item, exc


def _outcome_error(exc: Exception, source: ImageSource) -> VocabsegError:
    """A batch image's error: user errors as they are, anything else wrapped with its message."""
    if isinstance(exc, VocabsegError):
        return exc
    error = SegmentationFailedError(f"{source_name(source)}: segmentation failed ({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error
