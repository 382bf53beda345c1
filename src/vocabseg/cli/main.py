"""``vocabseg`` command line: one sub-command per module, each exposing ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from .. import __version__
from ..errors import VocabsegError

# sub-command name -> module (imported lazily, so `vocabseg --help` stays fast)
SUBCOMMANDS = {
    "segment": "vocabseg.cli.segment",
    "methods": "vocabseg.cli.methods",
    "eval": "vocabseg.cli.eval",
    "serve": "vocabseg.cli.serve",
    "train": "vocabseg.cli.train",
    "recipes": "vocabseg.cli.recipes",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vocabseg",
        description="Open-vocabulary semantic segmentation with CLIP: label every pixel with one of your words.",
        epilog="Run `vocabseg COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"vocabseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _drop_open_clip_random_weights_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"vocabseg: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # open_clip logs its own "no pretrained weights" line; our warning already says it, once and clearly
    root = logging.getLogger()
    root.addFilter(_drop_open_clip_random_weights_notice)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.run(args) or 0)
    except VocabsegError as exc:
        print(f"vocabseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vocabseg: interrupted", file=sys.stderr)
        return 130
    finally:
        root.removeFilter(_drop_open_clip_random_weights_notice)


if __name__ == "__main__":
    sys.exit(main())
