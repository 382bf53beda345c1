"""Run a training setup in its own process (the SIGKILL/resume checks kill and restart it).

usage: python run_setup.py OUT FILE.py:FUNCTION [--resume] [--workers N] [--step-delay S]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from harness import SlowDataset, load_setup  # noqa: E402

from vocabseg.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("setup")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe, model, dataset = load_setup(args.setup)(batch_size=None, workers=args.workers)
    if args.step_delay:
        # per sample, so a step takes ``step_delay`` however many workers load its samples in parallel
        per_step = max(1, recipe.batch_size * recipe.grad_accum)
        dataset = SlowDataset(dataset, args.step_delay * max(1, args.workers) / per_step)
    result = train(recipe, model, dataset, args.out, resume=args.resume, progress=False)
    print(f"done step={result.step} resumed_from={result.resumed_from}", flush=True)


if __name__ == "__main__":
    main()
