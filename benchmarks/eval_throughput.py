"""Evaluation throughput (images/s) on synthetic datasets at protocol resolution.

For each benchmark a synthetic split is written in its exact on-disk layout, at the dataset's
typical image size (VOC 500x375, COCO 640x480, Cityscapes 2048x1024), and evaluated end to end with
``vocabseg.eval.evaluate`` under the paper protocol (reading, prediction at label resolution,
confusion matrices, per-image records, reports). The same images are also segmented with
``Segmenter.predict_arrays`` alone, and the evaluation is repeated with those predictions replayed:
that is the harness's own cost (reading, scoring, records, reports). Random
ViT-B/16 (+ random DINO ViT-B/8 for ProxyCLIP) weights: speed does not depend on the weights' values.
Text embeddings are computed before timing (they are cached once per vocabulary; the benchmark uses
the one-template set ``name`` so that this warm-up is short: templates do not change image throughput).

    python benchmarks/eval_throughput.py                          # CPU, sclip
    python benchmarks/eval_throughput.py --methods sclip proxyclip --out benchmarks/results/eval_throughput.md
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import warnings
from pathlib import Path

from common import describe_device

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCHMARKS = {  # name -> (images, (H, W))
    "voc21": (8, (375, 500)),
    "coco_stuff": (4, (480, 640)),
    "cityscapes": (2, (1024, 2048)),
}


def _key(array) -> str:
    return hashlib.sha1(array.tobytes()).hexdigest()


class Replay:
    """A Segmenter whose ``predict_arrays`` replays recorded predictions (times the harness alone)."""

    def __init__(self, segmenter, recorded: dict):
        self._segmenter, self._recorded = segmenter, recorded

    def __getattr__(self, name: str):
        return getattr(self._segmenter, name)

    def predict_arrays(self, arrays, vocab, config, progress=None, return_probs=True):
        return [self._recorded[_key(a)] for a in arrays]


def measure(method: str, name: str, images: int, size: tuple[int, int], device: str, tmp: Path, repeats: int) -> dict:
    import torch

    from vocabseg import Segmenter
    from vocabseg.data import build_dataset
    from vocabseg.data.synthetic import write_synthetic
    from vocabseg.eval import evaluate
    from vocabseg.eval.protocols import resolve_protocol

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = Segmenter(method=method, model="ViT-B-16", pretrained=None, vfm_pretrained=None, device=device,
                        text_cache_dir=None, templates="name")  # fmt: skip
    ds = build_dataset(name, write_synthetic(name, tmp / "data" / name, num_images=images, size=size))
    config = resolve_protocol("paper", method, ds.settings_key, ds.has_background).config
    arrays = [ds.read_image(s) for s in ds.samples]
    seg.predict_arrays(arrays[:1], ds.vocabulary, config)  # warm-up + text encoding, not timed

    predict_s, eval_s, harness_s, recorded = [], [], [], {}
    for r in range(repeats):  # interleaved, best of `repeats`: robust to other load on the machine
        start = time.perf_counter()
        for a in arrays:
            recorded[_key(a)] = seg.predict_arrays([a], ds.vocabulary, config)[0]
        predict_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = evaluate(seg, ds, out_dir=tmp / f"out{r}", images_per_batch=1, progress=False)
        eval_s.append(time.perf_counter() - start)
    for r in range(3):  # the harness alone: the same evaluation with the predictions replayed
        start = time.perf_counter()
        evaluate(Replay(seg, recorded), ds, out_dir=tmp / f"replay{r}", images_per_batch=1, progress=False)
        harness_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    evaluate(seg, ds, out_dir=tmp / "out0", progress=False)  # resume: every record already there
    resume_s = time.perf_counter() - start
    c = config
    window = "whole" if c.crop == 0 else f"{c.crop}/{c.stride}"
    return {
        "method": method,
        "benchmark": name,
        "size": f"{size[1]}x{size[0]}",
        "protocol": f"short {c.short_side}, {window}",
        "classes": f"{ds.num_classes} ({len(ds.vocabulary.prompt_names)} names)",
        "eval": images / min(eval_s),
        "predict": images / min(predict_s),
        "harness_ms": 1000 * min(harness_s) / images,
        "resume_s": resume_s,
        "miou": result.miou,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["sclip"])
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = describe_device(args.device)
    header = (
        "Paper protocol per method and benchmark, ViT-B/16 random weights, fp32, one image per call, text "
        "encoded before timing (template set `name`). `eval` = `vocabseg.eval.evaluate` end to end (read image "
        "+ label, predict at label resolution, confusion matrix, per-image record, reports); `predict` = "
        "`Segmenter.predict_arrays` alone on the same images; harness = the same evaluation with the predictions "
        "replayed (everything but the model); resume = a rerun that finds every record. Best of repeated runs.\n"
        f"Device: {args.device}, {device}; torch {torch.__version__}, {torch.get_num_threads()} threads.\n"
    )
    rows = ["| method | benchmark | image | protocol | classes | eval img/s | predict img/s | harness ms/img | "
            "resume s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    print(header)
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for name in args.benchmarks:
                images, size = BENCHMARKS[name]
                r = measure(method, name, images, size, args.device, Path(tmp) / method, args.repeats)
                row = (
                    f"| {r['method']} | {r['benchmark']} | {r['size']} | {r['protocol']} | {r['classes']} | "
                    f"{r['eval']:.3f} | {r['predict']:.3f} | {r['harness_ms']:.0f} | {r['resume_s']:.2f} |"
                )
                rows.append(row)
                print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Evaluation throughput\n\n{header}\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
