"""Inference speed and peak memory of the trained methods at real size (ViT-B/16, random weights).

Two tables, every configuration in its own process (so that each peak memory is its own):

* **vocabulary size**: CAT-Seg and FGAseg at K = 150, 459 and 847 names (A-150, PC-459, A-847), FGAseg
  with its full decoder and with the fast decoder keeping the top N classes per pixel (``--top-n``);
* **peers**: PixelCLIP beside MaskCLIP (PixelCLIP's inference is MaskCLIP's dense path on a fine-tuned
  tower, so they should cost about the same) and ViL-Seg, at ``--peer-classes`` names.

Each method runs at its registered defaults (``get_method_spec(name).defaults``: the paper protocol,
printed in the tables as run), ``return_probs=False`` through ``Segmenter.segment_many`` with 4 images
per batch, as ``vocabseg segment`` runs it. Random weights (a trained method's ``weights=None``): speed
and memory do not depend on the weights' values. The text side is fed directly: names ``class i`` get
random unit embeddings (:class:`FixedText`), so the timing is the images' alone (encoding 847 prompts is
``text_speed.py``'s subject). The images are VOC-sized (500 x 375 and 375 x 500, alternating); one
untimed warm-up image at a small size first. PAMR off.

    python benchmarks/trained_inference.py --out benchmarks/results/trained_inference.md
    python benchmarks/trained_inference.py --tables vocab --classes 847 --vocab-methods fgaseg-fast --images 1
    python benchmarks/trained_inference.py --device cuda --images 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from common import describe_device, peak_rss_mib, reset_peak_rss
from segment_speed import PEAK_MEANING, make_images

from vocabseg.methods import get_method_spec, list_methods

IMAGES_PER_BATCH = 4  # `vocabseg segment`'s --images-per-batch default
VOCAB_METHODS = ["catseg", "fgaseg", "fgaseg-fast"]  # the vocabulary-size table's rows (see vocab_configs)
#: the protocol fields the tables print (the rest of InferenceConfig is scoring, not cost)
PROTOCOL_FIELDS = ("short_side", "max_long_side", "square_size", "crop", "stride", "global_weight", "average")


class FixedText:
    """Stands in for the Segmenter's text encoder: name ``class i`` -> random unit vector(s) ``i``
    ((K, D), or (K, P, D) per template), the same in every process."""

    def __init__(self, dim: int, templates: int, device: Any, seed: int = 0):
        self.dim, self.templates, self.device, self.seed = dim, templates, device, seed

    def encode(self, names: list[str], per_template: bool = False):
        import torch

        g = torch.Generator().manual_seed(self.seed)
        index = [int(n.removeprefix("class ")) for n in names]
        text = torch.randn(max(index) + 1, self.templates, self.dim, generator=g)[index]
        text = text if per_template else text.mean(1)
        return torch.nn.functional.normalize(text, dim=-1).to(self.device)


def vocab_configs(methods: list[str], top_ns: list[int]) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (method, method options) of the vocabulary-size table; ``methods`` picks among ``catseg``,
    ``fgaseg`` (full decoder) and ``fgaseg-fast`` (the fast decoder at each of ``top_ns``)."""
    configs: dict[str, tuple[str, dict[str, Any]]] = {}
    if "catseg" in methods:
        configs["catseg"] = ("catseg", {})
    if "fgaseg" in methods and "fgaseg" in list_methods():
        configs["fgaseg (full decoder)"] = ("fgaseg", {})
    if "fgaseg-fast" in methods and "fgaseg" in list_methods():
        for n in top_ns:
            configs[f"fgaseg (fast decoder, top-{n})"] = ("fgaseg", {"fast_decoder": True, "top_n": n})
    return configs


def worker(args: argparse.Namespace) -> None:
    import torch

    from vocabseg import Segmenter

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    options = json.loads(args.options)
    spec = get_method_spec(args.method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        seg = Segmenter(
            method=args.method,
            model=args.model,
            pretrained=None,
            device=args.device,
            text_cache_dir=None,
            method_kwargs=options,
            pamr_steps=0,
            **({"weights": None} if spec.trainable else {}),
        )
    dim = seg.clip.model.text_projection.shape[1]
    seg.text_encoder = FixedText(dim, len(seg.templates), seg.device)
    names = [f"class {i}" for i in range(args.vocab_size)]
    images = make_images(args.images)
    warm = images[0][:64, :64]
    seg.segment(warm, names, return_probs=False, short_side=seg.config.crop or 224)  # untimed, one small window
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    start = time.perf_counter()
    outcomes = list(seg.segment_many(images, names, images_per_batch=IMAGES_PER_BATCH, return_probs=False))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert all(o.result is not None and o.result.probs is None for o in outcomes)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else peak_rss_mib()
    settings = outcomes[0].result.info["settings"]
    print(
        json.dumps(
            {
                "images_per_s": args.images / seconds,
                "s_per_image": seconds / args.images,
                "peak_mib": peak,
                "protocol": {k: settings[k] for k in PROTOCOL_FIELDS},
                "batch_size": settings["batch_size"],
                "load": os.getloadavg()[0],
            }
        )
    )


def run_worker(method: str, options: dict[str, Any], classes: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--options", json.dumps(options),
           "--vocab-size", str(classes), "--images", str(args.images), "--device", args.device,
           "--model", args.model, "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{method} {options} K={classes} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def protocol_text(protocol: dict[str, Any]) -> str:
    """``short 640 / 384 s256, square 640, global 0.2, average scores`` (the parts that are on)."""
    p = protocol
    window = f"{p['crop']} s{p['stride']}" if p["crop"] else "whole image"
    parts = [f"short {p['short_side']} (long <= {p['max_long_side']}) / {window}"]
    if p["square_size"]:
        parts.append(f"square {p['square_size']}")
    if p["global_weight"]:
        parts.append(f"global view x{p['global_weight']}")
    parts.append(f"average {p['average']}")
    return ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", default=["vocab", "peers"], choices=["vocab", "peers"])
    p.add_argument("--classes", nargs="+", type=int, default=[150, 459, 847], help="vocabulary sizes (vocab table)")
    p.add_argument("--vocab-methods", nargs="+", default=VOCAB_METHODS, choices=VOCAB_METHODS)
    p.add_argument("--top-n", nargs="+", type=int, default=[8, 16, 32], help="FGAseg fast decoder's N")
    p.add_argument("--peers", nargs="+", default=["pixelclip", "maskclip", "vilseg"])
    p.add_argument("--peer-classes", type=int, default=150)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables as markdown here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    load_start = os.getloadavg()
    header = (
        f"{args.model} (random weights), {args.images} image(s) of 500x375 / 375x500, random unit text embeddings, "
        f"`return_probs=False` through `segment_many` ({IMAGES_PER_BATCH} images per batch), PAMR off; each "
        f"method at its registered defaults (protocol column, as run).\n"
        f"Device: {args.device} — {describe_device(args.device)}; torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} threads.\n"
        f"Peak memory: {PEAK_MEANING['cuda' if args.device.startswith('cuda') else 'cpu']}.\n"
    )
    columns = "| protocol (as run) | windows per forward | img/s | s/img | peak MiB | load (1 min) |"
    sections = []
    print(header, flush=True)
    if "vocab" in args.tables:
        rows = [f"| configuration | K {columns}", "|---|---|---|---|---|---|---|---|"]
        print("\n".join(rows), flush=True)
        for classes in args.classes:
            for label, (method, options) in vocab_configs(args.vocab_methods, args.top_n).items():
                rows.append(row(label, classes, run_worker(method, options, classes, args)))
                print(rows[-1], flush=True)
        sections.append("## Vocabulary size: CAT-Seg and FGAseg\n\n" + "\n".join(rows))
    if "peers" in args.tables:
        rows = [f"| method | K {columns}", "|---|---|---|---|---|---|---|---|"]
        print("\n".join(rows), flush=True)
        for method in args.peers:
            rows.append(row(method, args.peer_classes, run_worker(method, {}, args.peer_classes, args)))
            print(rows[-1], flush=True)
        sections.append("## PixelCLIP beside MaskCLIP, and ViL-Seg\n\n" + "\n".join(rows))
    load_end = os.getloadavg()
    footer = (
        f"Load average (1 / 5 / 15 min) at the start: {' / '.join(f'{x:.1f}' for x in load_start)}; at the end: "
        f"{' / '.join(f'{x:.1f}' for x in load_end)} (the machine is shared with other jobs).\n"
    )
    print(footer)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = "\n\n".join(sections)
        args.out.write_text(f"# Trained methods: inference speed and memory\n\n{header}\n{body}\n\n{footer}")


def row(label: str, classes: int, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {classes} | {protocol_text(r['protocol'])} | {r['batch_size']} | {r['images_per_s']:.3f} | "
        f"{r['s_per_image']:.1f} | {r['peak_mib']:.0f} | {r['load']:.1f} |"
    )


if __name__ == "__main__":
    main()
