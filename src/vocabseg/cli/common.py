"""Options shared by every command that builds a model (segment, eval, serve)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ..backends import PRECISIONS, list_backends
from ..errors import SettingsError
from ..inference.config import InferenceConfig, option_flag
from ..io.images import DEFAULT_MAX_PIXELS
from ..methods import list_methods
from ..refine import REFINERS
from ..segmenter import DEFAULT, DEFAULT_REFINE_VFM, REQUIRED
from ..text.templates import TEMPLATE_SETS


def none_or_str(value: str) -> str | None:
    """``none`` (any case) -> None: the command-line spelling of "random weights"."""
    return None if value.strip().lower() == "none" else value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--method", default="proxyclip", choices=list_methods(), help="method (default: proxyclip)")
    g.add_argument(
        "--model",
        default=DEFAULT,
        help="open_clip architecture, hf-hub:ID or local-dir:PATH (default: ViT-B-16, or a trained checkpoint's)",
    )
    g.add_argument(
        "--pretrained",
        type=none_or_str,
        default=DEFAULT,
        help="pretrained tag (openai, laion2b_s34b_b88k, ...), a checkpoint file, or 'none' for random weights "
        "(default: openai, or a trained checkpoint's)",
    )
    g.add_argument(
        "--weights",
        type=none_or_str,
        default=REQUIRED,
        help="trained methods: a checkpoint folder from `vocabseg train`, its model.safetensors, hf-hub:ORG/REPO, "
        "an official release .pth (catseg, pixelclip; converted on load), or 'none' for a random head",
    )
    g.add_argument("--vfm", default=None, help="proxy VFM for proxyclip (dino_vitb8, dinov2_vitb14, sam_vitb, ...)")
    g.add_argument(
        "--vfm-pretrained",
        type=none_or_str,
        default="default",
        help="VFM weights: 'default' (hub), a checkpoint file, or 'none' for random weights",
    )
    g.add_argument(
        "--refine",
        default=None,
        metavar="NAME",
        help=f"refine any method's scores: {' or '.join(REFINERS)} (label propagation over DINO features; "
        "lposs+ also over pixels)",
    )
    g.add_argument(
        "--refine-vfm", default=None, help=f"the VFM of --refine (default: {DEFAULT_REFINE_VFM}; dinov2_vitb14, ...)"
    )
    g.add_argument(
        "--refine-vfm-pretrained",
        type=none_or_str,
        default="default",
        help="weights of --refine-vfm: 'default' (hub), a checkpoint file, or 'none' for random weights",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument(
        "--templates", default=None, help=f"prompt template set: {', '.join(TEMPLATE_SETS)} (default: openai80)"
    )
    g.add_argument("--surgery", action="store_true", help="apply the CLIP-Surgery feature adjustment")
    g.add_argument(
        "--method-option",
        "-O",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (`vocabseg methods` lists them), e.g. -O gamma=3.0 -O outlier=l2norm; VALUE is "
        "read as JSON when it parses (numbers, true, [8, 16], {...}), else as text; repeatable",
    )
    g.add_argument(
        "--mask-model",
        default=None,
        help="mask-based methods (corrclip): the SAM / SAM 2 model, a hub id or a save_pretrained folder "
        "(the same as -O mask_options='{\"model\": ...}')",
    )
    g.add_argument(
        "--backend",
        default="torch",
        choices=list_backends(),
        help="what runs the image side: torch, an ONNX runtime (CPU; pip install 'vocabseg[cpu]'), or auto "
        "(the fastest on the first windows); see docs/backends.md (default: torch)",
    )
    g.add_argument(
        "--precision",
        default="f32",
        choices=PRECISIONS,
        help="ONNX runtimes: f32 (exact) or native (the runtime's lower precision where the CPU has it)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels (default: {DEFAULT_MAX_PIXELS:,})",
    )
    s = parser.add_argument_group("inference settings (default: the method's published settings)")
    for f in fields(InferenceConfig):  # help and allowed values come from the field's metadata
        text = f"{f.metadata['help']}; allowed: {f.metadata['allowed']}".replace("%", "%%")
        if f.name == "pamr_dilations":
            s.add_argument(option_flag(f.name), type=int, nargs="+", default=None, help=text)
        elif "choices" in f.metadata:
            s.add_argument(option_flag(f.name), choices=f.metadata["choices"], default=None, help=text)
        else:
            s.add_argument(option_flag(f.name), type=type(f.default), default=None, help=text)


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(InferenceConfig) if getattr(args, f.name) is not None}


def method_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``-O KEY=VALUE`` and ``--mask-model`` as the Segmenter's ``method_kwargs`` (checked there
    against the method's options before any model loads)."""
    options: dict[str, Any] = {}
    for item in args.method_option:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--method-option {item!r}: expected KEY=VALUE, e.g. -O gamma=3.0")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    if args.mask_model is not None:
        mask_options = options.setdefault("mask_options", {})
        if not isinstance(mask_options, dict):
            raise SettingsError("--mask-model needs mask_options to be a JSON object, if given with -O.")
        mask_options["model"] = args.mask_model
    return options


def segmenter_from_args(args: argparse.Namespace, base_options: dict[str, Any] | None = None):
    """The Segmenter of the model flags; ``base_options`` are method options under ``-O`` (a protocol's)."""
    from ..segmenter import Segmenter

    return Segmenter(
        method=args.method,
        model=args.model,
        pretrained=args.pretrained,
        weights=args.weights,
        vfm=args.vfm,
        vfm_pretrained=args.vfm_pretrained,
        refine=args.refine,
        refine_vfm=args.refine_vfm,
        refine_vfm_pretrained=args.refine_vfm_pretrained,
        device=args.device,
        dtype=args.dtype,
        templates=args.templates,
        surgery=args.surgery,
        max_pixels=args.max_pixels,
        backend=args.backend,
        precision=args.precision,
        method_kwargs={**(base_options or {}), **method_options_from_args(args)},
        **settings_from_args(args),
    )


def run_distributed(device: str, job: Callable[[str, bool], int]) -> int:
    """Run ``job(process_device, is_main)`` alone or as one torchrun worker (eval and train alike).

    Under torchrun a user error is printed by the rank that hit it and the worker ends through
    :func:`~vocabseg.eval.distributed.exit_process` (gloo's teardown race); alone, errors propagate
    to ``main``, which prints them once.
    """
    from ..errors import VocabsegError
    from ..eval.distributed import exit_process, init_distributed, process_device

    world = init_distributed(device)
    code = 2
    try:
        code = job(process_device(device, world), world.is_main)
    except VocabsegError as exc:
        if not world.distributed:
            raise
        print(f"vocabseg: error (rank {world.rank}): {exc}", file=sys.stderr)
    if world.distributed:
        exit_process(code)
    return code
