"""``vocabseg export -o model.onnx --method sclip [--classes "cat, dog"]``: an ONNX model to deploy elsewhere.

Without ``--classes`` the model maps CLIP-normalised windows to the method's dense features (and,
with ``--surgery``, CLIP's global embedding); with them, to per-name logits for that fixed
vocabulary, the text embeddings baked in. A JSON sidecar next to the model documents its input
(shape, normalisation, window size), outputs and names. See docs/backends.md.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields
from pathlib import Path

from ..backends.onnx_export import exportable_methods
from ..errors import SettingsError
from ..inference.config import InferenceConfig, option_flag
from ..methods import get_method_spec
from .common import none_or_str

#: the inference settings that shape an exported graph (the others act after it, on full images)
GRAPH_SETTINGS = ("logit_scale", "pad_multiple")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        description="Write the image side of a training-free method as an ONNX model (OUTPUT) with a JSON "
        "sidecar (OUTPUT with .json) documenting its input, normalisation and outputs.",
        epilog="Input: float32 (batch, 3, H, W) RGB scaled to [0, 1] then normalised with the CLIP mean/std "
        "in the sidecar. The batch axis is dynamic, the window size fixed.",
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--method", required=True, choices=exportable_methods(), help="a dense-feature training-free method")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture, hf-hub:ID or local-dir:PATH")
    p.add_argument(
        "--pretrained", type=none_or_str, default="openai", help="pretrained tag, checkpoint file, or 'none'"
    )
    p.add_argument("--vfm", default=None, help="proxy VFM for proxyclip (dino_vitb8, dinov2_vitb14, sam_vitb, ...)")
    p.add_argument("--vfm-pretrained", type=none_or_str, default="default", help="VFM weights: default, file, none")
    p.add_argument(
        "--window",
        default=None,
        help="input size in pixels: SIZE or HxW (default: the method's window, --crop of `segment`)",
    )
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--classes", "-c", help='bake in these classes (comma-separated, ";" between synonyms)')
    classes.add_argument("--classes-file", type=Path, help="bake in the classes of this file (one per line)")
    p.add_argument("--templates", default=None, help="prompt template set for --classes (default: the method's)")
    p.add_argument("--surgery", action="store_true", help="CLIP-Surgery: logits adjusted, or a global-embedding output")
    for f in fields(InferenceConfig):
        if f.name in GRAPH_SETTINGS:
            text = f"{f.metadata['help']}; allowed: {f.metadata['allowed']} (default: the method's)"
            p.add_argument(option_flag(f.name), type=type(f.default), default=None, help=text.replace("%", "%%"))
    p.set_defaults(run=run)


def parse_window(text: str | None, default: int) -> tuple[int, int]:
    """``"224"`` -> (224, 224), ``"224x448"`` -> (224, 448); ``None`` -> the method's crop."""
    if text is None:
        if default == 0:
            raise SettingsError(
                "--window is needed: this method runs on whole images (crop 0), so give the input size (e.g. 512)."
            )
        return default, default
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
        raise SettingsError(f"--window {text!r} must be SIZE or HxW in pixels (e.g. 224 or 336x448), above 0.")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def run(args: argparse.Namespace) -> int:
    from ..backends.onnx_export import ImageSide, VocabularyLogits, check_exportable, describe_export, export_onnx
    from ..io.files import atomic_write_text
    from ..segmenter import Segmenter
    from ..text.vocabulary import Vocabulary

    # every check that needs no model comes first
    spec = get_method_spec(args.method)
    settings = {name: getattr(args, name) for name in GRAPH_SETTINGS if getattr(args, name) is not None}
    config = spec.defaults.updated(**settings)
    window = parse_window(args.window, config.crop)
    baked = args.classes is not None or args.classes_file is not None
    pad = config.pad_multiple
    if not baked and pad and (window[0] % pad or window[1] % pad):
        raise SettingsError(
            f"--window {window[0]}x{window[1]}: {args.method} features need windows padded to a multiple of "
            f"{pad} (--pad-multiple); export {'x'.join(str(-(-s // pad) * pad) for s in window)} (pad centred), "
            "or add --classes, whose model pads and crops back itself."
        )
    vocab = None
    if baked:
        vocab = Vocabulary.from_file(args.classes_file) if args.classes_file else Vocabulary.parse(args.classes)

    seg = Segmenter(
        method=args.method,
        model=args.model,
        pretrained=args.pretrained,
        vfm=args.vfm,
        vfm_pretrained=args.vfm_pretrained,
        templates=args.templates,
        surgery=args.surgery,
        **settings,
    )
    method = check_exportable(seg.method, "vocabseg export")
    extra = {"model": seg.clip.name, "surgery": args.surgery}
    if vocab is not None:
        text = seg.text_encoder.encode(vocab.prompt_names)
        module = VocabularyLogits(method, text, config.logit_scale, pad, args.surgery)
        extra.update(
            classes=vocab.class_names,
            names=vocab.prompt_names,
            name_to_class=vocab.name_to_class,
            logit_scale=config.logit_scale,
            templates=seg.template_name,
        )
    else:
        module = ImageSide(method, with_global=args.surgery)
    export_onnx(module, window, args.output)
    sidecar = args.output.with_suffix(".json")
    description = describe_export(module, window, **extra)
    atomic_write_text(sidecar, json.dumps(description, indent=2) + "\n")
    outputs = ", ".join(f"{o['name']} {o['shape']}" for o in description["outputs"])
    print(f"wrote {args.output} (input images ['batch', 3, {window[0]}, {window[1]}] -> {outputs}) and {sidecar}")
    return 0
