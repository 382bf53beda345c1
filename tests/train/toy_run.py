"""Run the toy training in its own process (the SIGKILL/resume test kills and restarts it).

usage: python toy_run.py OUT [--resume] [--workers N] [--grad-accum K] [--ema D] [--step-delay S]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from toy import ToySegDataset, ToySegModel, toy_recipe  # noqa: E402

from vocabseg.train import DataConfig, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--ema", type=float, default=0.9)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = toy_recipe(
        grad_accum=args.grad_accum,
        ema_decay=args.ema,
        clip_grad_norm=1.0,
        data=DataConfig(dataset="toy", crop=16, num_workers=args.workers),
    )
    model = ToySegModel(seed=0, step_delay=args.step_delay)
    result = train(recipe, model, ToySegDataset(n=24), args.out, resume=args.resume, progress=False)
    print(f"done step={result.step} resumed_from={result.resumed_from}", flush=True)


if __name__ == "__main__":
    main()
