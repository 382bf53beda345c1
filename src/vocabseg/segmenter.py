"""The front door: ``Segmenter(...).segment(image, ["cat", "sofa"])``."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .inference.config import InferenceConfig
from .inference.pamr import PAMR
from .inference.postprocess import class_probabilities, decide_labels
from .inference.sliding import centered_padding, rescaled_size, resize_image, sliding_window_logits
from .inference.surgery import surgery_logits
from .io.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from .methods import create_method, get_method_spec
from .models.clip import LoadedCLIP, clip_normalization, default_tokenizer, load_clip
from .result import SegmentationResult
from .text.encoder import TextEncoder, default_cache_dir
from .text.templates import DEFAULT_TEMPLATES, resolve_templates
from .text.vocabulary import Vocabulary

ClassesLike = str | Sequence[str | Sequence[str]] | Vocabulary

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype != torch.float32 and device.type == "cpu":
        raise ValueError(
            f"dtype {dtype} on the CPU is not supported: fp16 kernels are missing and bf16 is ~10x slower "
            "than fp32 on most CPUs. Use float32 on the CPU, fp16/bf16 on a GPU."
        )
    return dtype


class Segmenter:
    """Open-vocabulary semantic segmentation with a frozen CLIP.

    Args:
        method: a registered method (``vocabseg.methods.list_methods()``).
        model: an open_clip architecture, ``hf-hub:``/``local-dir:`` id, or an open_clip CLIP model
            object (any weights).
        pretrained: pretrained tag or checkpoint file for a named model; ``None`` = random weights.
        vfm, vfm_pretrained: the proxy VFM (ProxyCLIP): a name or a module, and its weights
            (``"default"`` hub weights, a file, or ``None`` for random).
        device, dtype: where and in which precision the model runs (fp16/bf16 only on a GPU).
        templates: a template-set name (``openai80``, ``beyond_labels12``...) or a list of strings.
        text_cache_dir: where text embeddings are cached: ``"default"`` (``$VOCABSEG_CACHE`` or
            ``~/.cache/vocabseg``), a folder, or ``None`` to disable the cache.
        tokenizer: for model objects whose tokenizer is not CLIP's BPE.
        surgery: apply the CLIP-Surgery feature adjustment to the logits.
        max_pixels: refuse larger images.
        method_kwargs: extra method options (``gamma``, ``beta``, ``gaussian_std``...).
        **settings: overrides of the method's :class:`InferenceConfig` defaults (``short_side``,
            ``crop``, ``stride``, ``logit_scale``, ``prob_threshold``, ``pamr_steps``...).

    Example:
        >>> seg = Segmenter(method="sclip", model="ViT-B-16", pretrained="openai")  # doctest: +SKIP
        >>> res = seg.segment("street.jpg", "car, road, person; man")  # doctest: +SKIP
        >>> res.save("out/")  # doctest: +SKIP
    """

    def __init__(
        self,
        method: str = "proxyclip",
        model: str | nn.Module = "ViT-B-16",
        pretrained: str | None = "openai",
        *,
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
        **settings: Any,
    ):
        self.spec = get_method_spec(method)
        self.config = self.spec.defaults.updated(**settings)
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.surgery = surgery
        self.max_pixels = max_pixels
        self.templates = resolve_templates(templates)
        self.template_name = (templates or DEFAULT_TEMPLATES) if isinstance(templates, (str, type(None))) else "custom"

        self.clip = self._load_clip(model, pretrained, tokenizer)
        kwargs = dict(method_kwargs or {})
        if "vfm" in inspect.signature(self.spec.cls.__init__).parameters:
            kwargs.setdefault("vfm_pretrained", vfm_pretrained)
            if vfm is not None:
                kwargs["vfm"] = vfm
        elif vfm is not None:
            raise ValueError(f"Method {method!r} does not use a VFM; drop vfm=... (only proxyclip does).")
        self.method = create_method(method, self.clip.model, **kwargs).to(self.device, self.dtype).eval()
        cache = default_cache_dir() if text_cache_dir == "default" else text_cache_dir
        self.text_encoder = TextEncoder(self.clip.model, self.clip.tokenizer, self.templates, cache)
        mean, std = self.clip.mean, self.clip.std
        self._mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(3, 1, 1)

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
        names = [n.strip() for n in background.split(";")] if isinstance(background, str) else background
        if names:
            vocab = vocab.with_background(names)
        elif prob_threshold > 0 and vocab.background_index is None:
            vocab = vocab.with_background()
        return vocab

    def settings(self, **overrides: Any) -> InferenceConfig:
        return self.config.updated(**overrides)

    @torch.inference_mode()
    def segment(
        self,
        images: ImageSource | Sequence[ImageSource],
        classes: ClassesLike,
        *,
        background: str | Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
        **overrides: Any,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image (returns a result) or a list of images (returns a list).

        Args:
            images: paths, encoded bytes, PIL images or uint8 arrays; sizes may differ.
            classes: ``"car, road, person; man"``, a list (``;`` synonyms allowed) or a Vocabulary.
            background: background names (``"sky; wall"`` or a list): adds a ``background`` class.
            progress: called with the number of windows processed after each batch.
            **overrides: per-call inference settings (``prob_threshold=0.2``...).
        """
        single = not isinstance(images, (list, tuple))
        sources = [images] if single else list(images)
        arrays = [load_image(s, self.max_pixels) for s in sources]
        config = self.settings(**overrides)
        vocab = self.vocabulary(classes, background, config.prob_threshold)
        results = self.predict_arrays(arrays, vocab, config, progress=progress)
        return results[0] if single else results

    @torch.inference_mode()
    def predict_arrays(
        self,
        arrays: Sequence[np.ndarray],
        vocab: Vocabulary,
        config: InferenceConfig,
        progress: Callable[[int], None] | None = None,
    ) -> list[SegmentationResult]:
        """Segment decoded (H, W, 3) uint8 images with an explicit vocabulary and settings."""
        text = self.text_encoder.encode(vocab.prompt_names)
        inputs = [self._normalize(a) for a in arrays]
        resized = [
            resize_image(x, rescaled_size(*x.shape[-2:], config.short_side, config.max_long_side)) for x in inputs
        ]
        window_fn = self._window_logits_fn(text, config.pad_multiple)
        logits = sliding_window_logits(resized, window_fn, config.crop, config.stride, config.batch_size, progress)
        pamr = PAMR(config.pamr_steps, config.pamr_dilations)
        results = []
        for array, small, image_logits in zip(arrays, resized, logits):
            size = array.shape[:2]
            full = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False)
            if config.pamr_steps > 0:
                full = pamr(resize_image(small[None].float(), size), full)
            probs = class_probabilities(full[0], config.logit_scale, vocab.name_to_class, len(vocab))
            labels = decide_labels(probs, vocab.background_index, config.prob_threshold, config.area_threshold)
            results.append(
                SegmentationResult(
                    labels=labels.cpu().numpy().astype(np.int32),
                    classes=vocab.class_names,
                    probs=probs.cpu().numpy().astype(np.float32),
                    image=array,
                    synonyms=[list(c.names) for c in vocab.classes],
                    background_index=vocab.background_index,
                    info=self.describe(config),
                )
            )
        return results

    def describe(self, config: InferenceConfig | None = None) -> dict[str, Any]:
        """Everything that determined a result, for reports and ``result.json``."""
        return {
            "method": self.spec.name,
            "model": self.clip.name,
            "surgery": self.surgery,
            "templates": self.template_name,
            "settings": (config or self.config).to_dict(),
        }

    # -- internals -------------------------------------------------------------------------------------
    def _normalize(self, array: np.ndarray) -> torch.Tensor:
        x = (
            torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).to(self.device).permute(2, 0, 1).float()
            / 255.0
        )
        return (x - self._mean) / self._std

    def _window_logits_fn(self, text: torch.Tensor, pad_multiple: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Windows (b, 3, h, w) -> cosine (or surgery) logits (b, K, h, w) at window resolution."""

        def window_logits(windows: torch.Tensor) -> torch.Tensor:
            h, w = windows.shape[-2:]
            left, right, top, bottom = centered_padding(h, w, pad_multiple)
            padded = F.pad(windows, (left, right, top, bottom)) if (left or right or top or bottom) else windows
            if self.surgery:
                dense, global_emb = self.method(padded.to(self.dtype), return_global=True)
            else:
                dense, global_emb = self.method(padded.to(self.dtype)), None
            feats = F.normalize(dense.float(), dim=1)
            cos = torch.einsum("bchw,kc->bkhw", feats, text)
            if global_emb is not None:
                cos = surgery_logits(cos, F.normalize(global_emb.float(), dim=-1), text)
            cos = F.interpolate(cos, size=padded.shape[-2:], mode="bilinear", align_corners=False)
            return cos[:, :, top : top + h, left : left + w]

        return window_logits
