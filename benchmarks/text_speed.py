"""Text encoding speed: open_clip's ``encode_text`` at the full context vs vocabseg's exact truncation.

ADE-150 class names (the first name of each class) x the 80 OpenAI templates, through a CLIP
ViT-B/16 text tower with random weights (speed does not depend on the weights' values). Side by
side in one process, one after the other, both including tokenization:

* **open_clip**: what ``TextEncoder`` did before: prompts in name-major order, ``prompts_per_batch``
  at a time, ``clip.encode_text`` at 77 tokens, each embedding L2-normalised;
* **vocabseg**: ``TextEncoder.encode(names, per_template=True)`` without a cache: prompts sorted by
  token length, each batch run on its first L = (longest end-of-text position + 1) tokens.

Reported: prompts/s of both, their ratio, the batches' L, and the largest absolute difference
between the two paths' unit embeddings (per prompt, and per name after prompt ensembling).

    cd benchmarks && python text_speed.py                  # all 150 classes: 12,000 prompts
    cd benchmarks && python text_speed.py --classes 30     # the first 30: 2,400 prompts
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from common import describe_device

from vocabseg.data.classes import packaged_class_file
from vocabseg.text import TEMPLATE_SETS, TextEncoder
from vocabseg.text.tower import pooled_positions, truncated_length

MODEL = "ViT-B-16"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encode_open_clip(clip: torch.nn.Module, tokenizer, prompts: list[str], batch: int, device: str) -> torch.Tensor:
    """(N, D) unit embeddings the way ``TextEncoder`` encoded before truncation."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            tokens = tokenizer(prompts[start : start + batch]).to(device)
            chunks.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    return torch.cat(chunks)


def batch_lengths(clip: torch.nn.Module, tokenizer, prompts: list[str], batch: int) -> list[int]:
    """The L each of vocabseg's length-sorted batches runs at."""
    tokens = tokenizer(prompts)
    order = torch.argsort(pooled_positions(clip, tokens), stable=True)
    return [truncated_length(clip, tokens[order[s : s + batch]]) for s in range(0, len(prompts), batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=150, help="the first N ADE-150 classes (default: all)")
    p.add_argument("--templates", default="openai80", choices=list(TEMPLATE_SETS))
    p.add_argument("--batch", type=int, default=256, help="prompts per batch (TextEncoder's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    args = p.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(MODEL, pretrained=None).to(args.device).eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    names = [synonyms[0] for synonyms in packaged_class_file("ade150")[: args.classes]]
    templates = TEMPLATE_SETS[args.templates]
    prompts = [t.format(n) for n in names for t in templates]
    encoder = TextEncoder(clip, tokenizer, templates, cache_dir=None, prompts_per_batch=args.batch)

    encode_open_clip(clip, tokenizer, prompts[:16], 16, args.device)  # warm-up: allocator, kernels
    TextEncoder(clip, tokenizer, templates, cache_dir=None).encode(names[:1])

    sync(args.device)
    start = time.perf_counter()
    ours = encoder.encode(names, per_template=True)
    sync(args.device)
    ours_s = time.perf_counter() - start
    print(f"vocabseg: {len(prompts)} prompts in {ours_s:.1f} s", file=sys.stderr)

    start = time.perf_counter()
    theirs = encode_open_clip(clip, tokenizer, prompts, args.batch, args.device)
    sync(args.device)
    theirs_s = time.perf_counter() - start
    print(f"open_clip: {len(prompts)} prompts in {theirs_s:.1f} s", file=sys.stderr)

    theirs = theirs.reshape(len(names), len(templates), -1).cpu()
    ours = ours.cpu()
    diff_prompt = float((ours - theirs).abs().max())
    diff_name = float((F.normalize(ours.mean(1), dim=-1) - F.normalize(theirs.mean(1), dim=-1)).abs().max())
    lengths = batch_lengths(clip, tokenizer, prompts, args.batch)
    span = f"{min(lengths)}" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)}"
    longest = int(tokenizer(prompts).argmax(dim=-1).max()) + 1

    title = (
        f"{MODEL} text tower (random weights), {args.device}: {describe_device(args.device)}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    header = "| path | prompts | seconds | prompts/s | speed-up | tokens per prompt |\n|---|---|---|---|---|---|"
    rows = [
        f"| open_clip `encode_text` | {len(prompts)} | {theirs_s:.1f} | {len(prompts) / theirs_s:.1f} | 1.00x | 77 |",
        f"| vocabseg (truncated) | {len(prompts)} | {ours_s:.1f} | {len(prompts) / ours_s:.1f} "
        f"| {theirs_s / ours_s:.2f}x | {span} per batch |",
    ]
    notes = [
        f"{len(names)} ADE-150 names x {len(templates)} `{args.templates}` templates, {args.batch} prompts per batch; "
        f"longest prompt {longest} tokens; batch lengths L: {lengths}.",
        f"Largest absolute difference between the unit embeddings: {diff_prompt:.2e} per prompt, "
        f"{diff_name:.2e} per name after prompt ensembling.",
    ]
    text = f"### {title}\n\n{header}\n" + "\n".join(rows) + "\n\n" + "\n\n".join(notes) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
