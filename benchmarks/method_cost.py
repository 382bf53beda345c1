"""What one image costs each method: its extra models and the GFLOPs of a whole prediction.

One 500 x 375 image, at each method's registered protocol (short side, windows), through the whole
Segmenter prediction (resizing, windows, method, upsampling, scoring); the text embeddings are
encoded before counting, so only the image side is counted. FLOPs are torch's
``FlopCounterMode`` count (matmuls, convolutions, attention: 2 per multiply-add; element-wise work
is not counted). The extra models' share is the FLOPs spent inside the method's ``vfm``, ``sam``
and ``head`` sub-modules. Random weights at real size (ViT-B/16, the VFMs, SAM ViT-B, the trained
head): FLOPs do not depend on the weights' values. CorrCLIP's SAM 2 mask generator is replaced by
segment_speed's fixed grid masks, so its mask generation is not counted. PAMR is off.

    python benchmarks/method_cost.py --out benchmarks/results/method_cost.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import describe_device
from segment_speed import CLASSES, DEFAULT_PROTOCOL, build_segmenter, make_images, protocol_label, write_table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vocabseg.methods import MethodSpec, get_method_spec, list_methods

EXTRA_MODULES = ("vfm", "sam", "head")  # method attributes holding models besides CLIP


def extra_models(spec: MethodSpec) -> str:
    """The models a method needs besides CLIP, from its registered options."""
    o = spec.options
    parts = [f"VFM `{o['vfm']}`"] if "vfm" in o else []
    if "sam" in o:
        parts.append(f"SAM `{o['sam']}`")
    if "masks" in o:
        parts.append(f"masks `{o['masks']}` (not counted)")
    if spec.trainable:
        parts.append("trained head")
    return " + ".join(parts) or "none"


def track_extra(method: nn.Module, mode: FlopCounterMode) -> dict[str, float]:
    """FLOPs spent inside each extra model (outermost call of any of its sub-modules), filled during
    the counted run: hooks read the counter's total before and after."""
    spent: dict[str, float] = {}
    for name, module in method.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in EXTRA_MODULES or any(name.startswith(k + ".") for k in spent):
            continue
        spent[name] = 0.0
        state = {"depth": 0, "start": 0}

        def pre(_m, _a, name=name, state=state):
            if state["depth"] == 0:
                state["start"] = mode.get_total_flops()
            state["depth"] += 1

        def post(_m, _a, _o, name=name, state=state):
            state["depth"] -= 1
            if state["depth"] == 0:
                spent[name] += mode.get_total_flops() - state["start"]

        for sub in module.modules():
            sub.register_forward_pre_hook(pre)
            sub.register_forward_hook(post)
    return spent


def count(method: str) -> dict:
    torch.manual_seed(0)
    seg = build_segmenter(method, DEFAULT_PROTOCOL, "cpu")
    image = make_images(1)[0]  # 375 x 500
    vocab = seg.vocabulary(CLASSES)
    seg.text_encoder.encode(vocab.prompt_names, per_template=seg.spec.text_input == "per_template")
    mode = FlopCounterMode(display=False)
    spent = track_extra(seg.method, mode)
    start = time.perf_counter()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel is not among the ops counted
    try:
        with mode:
            seg.segment(image, CLASSES)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    assert seg.text_encoder.last_encoded == 0, "text was encoded inside the count"
    return {"total": mode.get_total_flops(), "extra": spent, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list_methods())
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = p.parse_args()
    header = (
        "One 500x375 image at each method's registered protocol, whole Segmenter prediction, 10 classes "
        "(text encoded before counting), PAMR off, random weights at real size.\n"
        f"Counted with torch {torch.__version__} FlopCounterMode on cpu — {describe_device('cpu')}.\n"
    )
    rows = ["| method | protocol (short / crop stride) | extra models | GFLOPs / image | of which extra models | "
            "counting time s |", "|---|---|---|---|---|---|"]  # fmt: skip
    print(header)
    print("\n".join(rows), flush=True)
    for method in args.methods:
        spec = get_method_spec(method)
        c = count(method)
        extra = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in c["extra"].items()) or "—"
        row = (
            f"| {method} | {protocol_label(method, DEFAULT_PROTOCOL)} | {extra_models(spec)} | "
            f"{c['total'] / 1e9:.1f} | {extra} | {c['seconds']:.0f} |"
        )
        rows.append(row)
        print(row, flush=True)
    write_table(args.out, "Method cost", header, rows)


if __name__ == "__main__":
    main()
