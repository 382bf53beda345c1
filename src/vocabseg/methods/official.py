"""Released checkpoints of trained methods, converted to ours: a registry of converters by method name.

The official releases of the CAT-Seg family are detectron2 checkpoints: a ``torch.save``'d dict whose
``"model"`` entry is the state dict (training checkpoints also hold ``optimizer``, ``scheduler`` and
``iteration``, which are ignored). They are read with ``torch.load(weights_only=True)`` (no pickled
code runs, no detectron2 needed) and converted by the converter registered for the method:

* its key names are mapped to our module's state dict by :class:`KeyRules` (ordered, invertible
  name templates, so an error can name the missing tensor in the release's own naming);
* the method's options (head sizes) are read off the tensor shapes, and the base CLIP architecture off
  CLIP's (:data:`OPENAI_CLIPS`: the OpenAI towers use QuickGELU, so ``ViT-B-16`` + ``openai`` in
  open_clip, which builds GELU towers, would be wrong; ``ViT-B-16-quickgelu`` is right);
* the conversion is strict: the result is checked against the method built on the meta device (no
  memory, no weights), and a tensor the release has but the module lacks, one the module needs but
  the release lacks, or a shape that differs is a :class:`~vocabseg.errors.CheckpointError` listing
  them.

Released weights fine-tune CLIP itself, so every CLIP tensor of the release is kept (``stores_clip``)
and the checkpoint needs no download. :func:`read_official_weights` gives a
:class:`~vocabseg.methods.weights.TrainedWeights` that ``Segmenter(weights="model_base.pth")`` uses
directly; ``vocabseg convert-weights`` writes it once as our checkpoint folder.

Another method adds its converter with ``@register_converter("name", "what it reads")`` on a function
``(state, base_model) -> ConvertedWeights``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._names import lookup
from ..errors import CheckpointError
from .weights import TrainedWeights

__all__ = [
    "OFFICIAL_SUFFIXES",
    "OPENAI_CLIPS",
    "BaseCLIP",
    "ConvertedWeights",
    "KeyRules",
    "OfficialFormat",
    "check_against_method",
    "convert_official",
    "identify_openai_clip",
    "is_official_file",
    "load_official_state",
    "official_formats",
    "read_official_weights",
    "register_converter",
]

#: file suffixes of released detectron2 checkpoints (ours are folders, or ``model.safetensors`` in one)
OFFICIAL_SUFFIXES = (".pth", ".pt")


class BaseCLIP(NamedTuple):
    """An OpenAI CLIP tower as open_clip builds it, and the shapes that identify it in a state dict."""

    model: str  # open_clip architecture (with QuickGELU)
    pretrained: str  # open_clip tag of the same weights
    width: int
    patch: int
    positions: int  # rows of visual.positional_embedding (native grid² + CLS)


#: the OpenAI CLIP names the official configs use (``CLIP_PRETRAINED``) -> open_clip equivalents
OPENAI_CLIPS: dict[str, BaseCLIP] = {
    "ViT-B/16": BaseCLIP("ViT-B-16-quickgelu", "openai", 768, 16, 197),
    "ViT-L/14": BaseCLIP("ViT-L-14-quickgelu", "openai", 1024, 14, 257),
    "ViT-L/14@336px": BaseCLIP("ViT-L-14-336-quickgelu", "openai", 1024, 14, 577),
}


@dataclass
class ConvertedWeights:
    """A released checkpoint in our terms: the method's options, its base CLIP and the tensors under our
    state-dict names (all of CLIP's too, ``stores_clip``)."""

    method: str
    options: dict[str, Any]
    clip: dict[str, Any]  # {"model": open_clip architecture, "pretrained": tag or None}
    state: dict[str, Tensor]
    stores_clip: bool = True
    notes: dict[str, Any] = field(default_factory=dict)  # where it came from (written to config.json)

    def config(self) -> dict[str, Any]:
        """Our checkpoint's ``config.json`` content (as :meth:`TrainedCLIPMethod.checkpoint_config`)."""
        return {
            "method": self.method,
            "options": dict(self.options),
            "clip": dict(self.clip),
            "stores_clip": self.stores_clip,
            "converted_from": dict(self.notes),
        }


Converter = Callable[[dict[str, Tensor], "str | None"], ConvertedWeights]


@dataclass(frozen=True)
class OfficialFormat:
    method: str
    convert: Converter
    description: str  # which releases it reads, for messages


_FORMATS: dict[str, OfficialFormat] = {}


def register_converter(method: str, description: str) -> Callable[[Converter], Converter]:
    """Register ``convert(state, base_model)`` for the released checkpoints of ``method``."""

    def wrap(fn: Converter) -> Converter:
        if method in _FORMATS:
            raise ValueError(f"A converter for {method!r} is already registered.")
        _FORMATS[method] = OfficialFormat(method, fn, description)
        return fn

    return wrap


def official_formats() -> dict[str, OfficialFormat]:
    """Method name -> its converter (importing the converters first)."""
    _register_builtin()
    return dict(_FORMATS)


# -- reading ------------------------------------------------------------------------------------------------------
def is_official_file(weights: str | os.PathLike) -> bool:
    """Whether ``weights`` names a released checkpoint file (rather than one of our checkpoints)."""
    text = str(weights)
    return not text.startswith("hf-hub:") and Path(text).suffix in OFFICIAL_SUFFIXES and Path(text).is_file()


def load_official_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The ``"model"`` state dict of a detectron2 checkpoint, read without running pickled code."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{path} is not a readable released checkpoint: torch.load(weights_only=True) failed "
            f"({type(exc).__name__}: {detail}). Expected a detectron2 checkpoint: a torch.save'd "
            '{"model": state_dict}.'
        ) from exc
    model = blob.get("model") if isinstance(blob, dict) else None
    if not isinstance(model, Mapping) or not model or not all(isinstance(v, Tensor) for v in model.values()):
        found = sorted(blob)[:6] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"{path} is not a detectron2 checkpoint: expected a dict whose 'model' entry is a state dict of "
            f"tensors, found {found}. (A vocabseg checkpoint is a folder with config.json and model.safetensors.)"
        )
    return {str(k): v for k, v in model.items()}


def convert_official(
    source: str | os.PathLike | Mapping[str, Tensor], method: str, base_model: str | None = None
) -> ConvertedWeights:
    """Convert a released checkpoint (a file, or its ``"model"`` state dict) of ``method``.

    ``base_model``: the open_clip architecture of its CLIP, when it is none of :data:`OPENAI_CLIPS`
    (a release on another CLIP, or a test model).
    """
    fmt = lookup(official_formats(), method, "method with a released-checkpoint converter")
    state = dict(source) if isinstance(source, Mapping) else load_official_state(source)
    converted = fmt.convert(state, base_model)
    if not isinstance(source, Mapping):
        converted.notes.setdefault("file", Path(source).name)
    return converted


def read_official_weights(path: str | os.PathLike, method: str | None, base_model: str | None = None) -> TrainedWeights:
    """A released checkpoint file as :class:`TrainedWeights` (what ``Segmenter(weights=...)`` reads)."""
    if method is None:
        raise CheckpointError(
            f"{path} is a released checkpoint file; say which method it belongs to "
            f"(one of {', '.join(sorted(official_formats()))})."
        )
    if method not in official_formats():
        raise CheckpointError(
            f"{path}: no converter for released checkpoints of {method!r} (there are for "
            f"{', '.join(sorted(official_formats())) or 'no method'}); pass a vocabseg checkpoint folder instead."
        )
    converted = convert_official(path, method, base_model)
    return TrainedWeights(str(path), converted.config(), converted.state)


# -- key names ---------------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{(\*|[a-z_]+)\}")


def _template_regex(template: str) -> re.Pattern[str]:
    parts, last = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[last : m.start()]))
        name = m.group(1)
        parts.append(r"(?P<rest>.+)" if name == "*" else rf"(?P<{name}>\d+)")
        last = m.end()
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts) + r"\Z")


def _fill(template: str, groups: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: groups["rest" if m.group(1) == "*" else m.group(1)], template)


class KeyRules:
    """Ordered (theirs, ours) key-name templates; the first that matches wins, in either direction.

    ``{*}`` stands for any dotted rest of the name, ``{i}`` (any lower-case word) for a number.
    """

    def __init__(self, rules: list[tuple[str, str]]):
        self.rules = [(theirs, ours, _template_regex(theirs), _template_regex(ours)) for theirs, ours in rules]

    def to_ours(self, key: str) -> str | None:
        for _, ours, theirs_re, _ in self.rules:
            m = theirs_re.match(key)
            if m:
                return _fill(ours, m.groupdict())
        return None

    def to_theirs(self, key: str) -> str | None:
        for theirs, _, _, ours_re in self.rules:
            m = ours_re.match(key)
            if m:
                return _fill(theirs, m.groupdict())
        return None


def _listed(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_against_method(
    converted: ConvertedWeights, rules: KeyRules, unmapped: list[str], what: str
) -> ConvertedWeights:
    """Build the method on the meta device (its real architecture, no memory) and require the converted
    tensors to be exactly the ones its checkpoint holds, with the same shapes. ``unmapped``: release keys
    no rule maps. Every problem is listed in one :class:`CheckpointError`, in the release's names."""
    import open_clip

    from .registry import create_method

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                clip = open_clip.create_model(converted.clip["model"], pretrained=None, device="meta")
                method = create_method(converted.method, clip, **converted.options)
    except Exception as exc:  # noqa: BLE001 (an architecture or options the release's shapes do not fit)
        raise CheckpointError(
            f"{what}: cannot build {converted.method!r} on {converted.clip['model']} with options "
            f"{converted.options} read from the checkpoint ({type(exc).__name__}: {exc})."
        ) from exc
    method.store_clip = converted.stores_clip
    expected = method.state_dict()
    wanted = set(method._stored_names())
    state = converted.state
    unexpected = sorted(unmapped + [rules.to_theirs(k) or k for k in state if k not in wanted])
    missing = sorted(rules.to_theirs(k) or k for k in wanted - set(state))
    shapes = [
        f"{rules.to_theirs(k) or k}: {tuple(t.shape)} vs {tuple(expected[k].shape)} expected"
        for k, t in state.items()
        if k in wanted and tuple(t.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unknown tensor(s): {_listed(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listed(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes, 4)}")
    if problems:
        raise CheckpointError(
            f"{what} does not convert to {converted.method!r} on {converted.clip['model']}: "
            + "; ".join(problems)
            + ". Is it a checkpoint of this method, unmodified?"
        )
    return converted


def identify_openai_clip(state: Mapping[str, Tensor], prefix: str) -> tuple[str, BaseCLIP] | None:
    """Which of :data:`OPENAI_CLIPS` the CLIP under ``prefix`` is, from its patch embedding and positions."""
    conv = state.get(prefix + "visual.conv1.weight")
    pos = state.get(prefix + "visual.positional_embedding")
    if conv is None or pos is None:
        return None
    for name, base in OPENAI_CLIPS.items():
        if (conv.shape[0], conv.shape[-1], pos.shape[0]) == (base.width, base.patch, base.positions):
            return name, base
    return None


def _register_builtin() -> None:
    """Converters defined next to their methods register when the methods are imported."""
    from .. import methods  # noqa: F401


# -- CAT-Seg ---------------------------------------------------------------------------------------------------------
_PREDICTOR = "sem_seg_head.predictor."
_AGGREGATOR = _PREDICTOR + "transformer."
_CLIP = _PREDICTOR + "clip_model."
_QKV = "attn.parametrizations.in_proj_weight.original"  # our split of the fused q/k/v (methods/catseg.py)

#: CAT-Seg's names (cat_seg_model.py, modeling/transformer/model.py, third_party/model_vpt.py) -> ours
CATSEG_KEYS = KeyRules([
    (_CLIP + "{*}.attn.q_proj_weight", "clip.{*}." + _QKV + "0"),
    (_CLIP + "{*}.attn.k_proj_weight", "clip.{*}." + _QKV + "1"),
    (_CLIP + "{*}.attn.v_proj_weight", "clip.{*}." + _QKV + "2"),
    (_CLIP + "{*}", "clip.{*}"),
    ("upsample1.{*}", "head.guidance_upsample.0.{*}"),
    ("upsample2.{*}", "head.guidance_upsample.1.{*}"),
    (_AGGREGATOR + "conv1.{*}", "head.cost_embed.{*}"),
    (_AGGREGATOR + "guidance_projection.{*}", "head.appearance_proj.{*}"),
    (_AGGREGATOR + "text_guidance_projection.{*}", "head.text_proj.{*}"),
    (_AGGREGATOR + "decoder_guidance_projection.{*}", "head.decoder_guidance_proj.{*}"),
    (_AGGREGATOR + "layers.{i}.swin_block.guidance_norm.{*}", "head.layers.{i}.spatial.guidance_norm.{*}"),
    (_AGGREGATOR + "layers.{i}.swin_block.block_1.{*}", "head.layers.{i}.spatial.blocks.0.{*}"),
    (_AGGREGATOR + "layers.{i}.swin_block.block_2.{*}", "head.layers.{i}.spatial.blocks.1.{*}"),
    (_AGGREGATOR + "layers.{i}.attention.attention.{*}", "head.layers.{i}.classwise.attn.{*}"),
    (_AGGREGATOR + "layers.{i}.attention.MLP.{*}", "head.layers.{i}.classwise.mlp.{*}"),
    (_AGGREGATOR + "layers.{i}.attention.{*}", "head.layers.{i}.classwise.{*}"),
    (_AGGREGATOR + "decoder1.up.{*}", "head.decoder.0.up.{*}"),
    (_AGGREGATOR + "decoder1.conv.double_conv.{*}", "head.decoder.0.conv.{*}"),
    (_AGGREGATOR + "decoder2.up.{*}", "head.decoder.1.up.{*}"),
    (_AGGREGATOR + "decoder2.conv.double_conv.{*}", "head.decoder.1.conv.{*}"),
    (_AGGREGATOR + "head.{*}", "head.predictor.{*}"),
])  # fmt: skip

#: the shifted Swin blocks' precomputed mask buffers (ours is computed from the grid): checked, not kept
_SWIN_MASK = re.compile(re.escape(_AGGREGATOR) + r"layers\.\d+\.swin_block\.block_2\.attn_mask\Z")


def _catseg_options(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Any]:
    """The head sizes of a CAT-Seg checkpoint, read off its tensor shapes (the official ViT-B and ViT-L
    configurations share heads 4 and pad_len 256, which no shape shows: the method's defaults)."""

    def size(key: str, axis: int) -> int | None:
        t = state.get(key)
        return int(t.shape[axis]) if t is not None and t.dim() > axis else None

    options: dict[str, Any] = {}
    found = {
        "hidden_dim": size(_AGGREGATOR + "conv1.weight", 0),
        "prompt_channels": size(_AGGREGATOR + "conv1.weight", 1),
        "appearance_guidance_dim": size(_AGGREGATOR + "guidance_projection.0.weight", 0),
        "text_guidance_dim": size(_AGGREGATOR + "text_guidance_projection.0.weight", 0),
    }
    options.update({k: v for k, v in found.items() if v is not None})
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(_AGGREGATOR) + r"layers\.(\d+)\.", k))}
    if layers:
        options["num_layers"] = max(layers) + 1
    stages = [
        (
            size(f"{_AGGREGATOR}decoder{n}.conv.double_conv.0.weight", 0),
            size(f"upsample{n}.weight", 1),
            size(f"{_AGGREGATOR}decoder_guidance_projection.{n - 1}.0.weight", 0),
        )
        for n in (1, 2)
    ]
    if all(None not in stage for stage in stages):
        options["decoder_dims"], options["decoder_guidance_dims"], options["decoder_guidance_proj_dims"] = (
            [stage[j] for stage in stages] for j in range(3)
        )
    if masks:  # (windows, window², window²) of the shifted block: the window and the feature grid
        mask = next(iter(masks.values()))
        window = math.isqrt(int(mask.shape[-1]))
        options["window"] = window
        options["feature_grid"] = math.isqrt(int(mask.shape[0])) * window
    return options


def _check_swin_masks(masks: Mapping[str, Tensor], options: Mapping[str, Any], what: str) -> None:
    """The stored masks must be the ones our blocks compute for the inferred grid and window."""
    from ..heads.catseg import shifted_window_mask

    if not masks:
        return
    grid, window = options["feature_grid"], options["window"]
    want = shifted_window_mask(grid, grid, window, window // 2)
    for key, mask in masks.items():
        if want is None or tuple(mask.shape) != tuple(want.shape) or not torch.equal(mask.float(), want):
            raise CheckpointError(
                f"{what}: {key} is not the shifted-window mask of a {grid}x{grid} grid with window {window}, "
                "so its spatial aggregation cannot be reproduced."
            )


@register_converter(
    "catseg", "CAT-Seg's release: model_base.pth (ViT-B/16 at 384 px) and model_large.pth (ViT-L/14@336)"
)
def convert_catseg(state: dict[str, Tensor], base_model: str | None = None) -> ConvertedWeights:
    """A CAT-Seg detectron2 state dict -> ``catseg``'s, with its options and base CLIP."""
    what = "This CAT-Seg checkpoint"
    if _AGGREGATOR + "conv1.weight" not in state or _CLIP + "visual.conv1.weight" not in state:
        heads = sorted({k.split(".")[0] for k in state})
        raise CheckpointError(
            f"This is not a CAT-Seg checkpoint: it has no {_AGGREGATOR}conv1.weight or {_CLIP}visual.conv1.weight "
            f"(its keys begin with {', '.join(heads[:6])})."
        )
    found = identify_openai_clip(state, _CLIP)
    if base_model is None and found is None:
        width, patch = state[_CLIP + "visual.conv1.weight"].shape[0], state[_CLIP + "visual.conv1.weight"].shape[-1]
        raise CheckpointError(
            f"{what} has a CLIP of width {width} and patch {patch}, none of {', '.join(OPENAI_CLIPS)}; "
            "pass its open_clip architecture (base_model=..., --model)."
        )
    if found is not None and base_model is not None and base_model != found[1].model:
        warnings.warn(
            f"{what} holds OpenAI's {found[0]} CLIP ({found[1].model} in open_clip, QuickGELU); building it on "
            f"{base_model} instead changes its activations unless that is the same tower.",
            stacklevel=3,
        )
    state = dict(state)
    masks = {k: state.pop(k) for k in list(state) if _SWIN_MASK.match(k)}
    options = _catseg_options(state, masks)
    _check_swin_masks(masks, options, what)
    ours: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        name = CATSEG_KEYS.to_ours(key)
        if name is None:
            unmapped.append(key)
        else:
            ours[name] = tensor
    model = base_model or found[1].model
    notes = {"format": "CAT-Seg (detectron2)", "clip": found[0] if found and base_model is None else model}
    if found is not None and base_model is None:
        notes["clip_pretrained"] = f"{found[1].model}/{found[1].pretrained}"
    converted = ConvertedWeights("catseg", options, {"model": model, "pretrained": None}, ours, True, notes)
    return check_against_method(converted, CATSEG_KEYS, unmapped, what)
