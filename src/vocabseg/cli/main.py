"""``vocabseg`` command line: one sub-command per module, each exposing ``add_parser`` and ``run``.

Only the module of the command being run is imported (the others pull in torch), so ``vocabseg
--help`` and ``--version`` answer at once; the other commands are listed by their summaries here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Collection, Sequence
from typing import Any

from .. import __version__
from ..errors import VocabsegError

# sub-command name -> (module, the one-line summary `vocabseg --help` lists)
SUBCOMMANDS = {
    "segment": ("vocabseg.cli.segment", "segment images with a list of class names"),
    "methods": ("vocabseg.cli.methods", "list methods and their default settings"),
    "eval": ("vocabseg.cli.eval", "evaluate a method on segmentation benchmarks (mIoU)"),
    "serve": ("vocabseg.cli.serve", "start the web page and the REST API"),
    "train": ("vocabseg.cli.train", "train a method from a recipe (one process or torchrun DDP)"),
    "recipes": ("vocabseg.cli.recipes", "list training recipes and their key settings"),
    "convert-weights": ("vocabseg.cli.convert_weights", "convert an official release (CAT-Seg .pth) to a checkpoint"),
    "export": (
        "vocabseg.cli.export",
        "export a method's image side as an ONNX model",
    ),
}


class _Commands(argparse._SubParsersAction):
    """Sub-parsers whose listed summary comes from :data:`SUBCOMMANDS` (one home for it)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return super().add_parser(name, help=SUBCOMMANDS[name][1], **kwargs)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full options of ``commands`` (default: every command); the other
    commands are names and summaries only, and their modules are not imported."""
    parser = argparse.ArgumentParser(
        prog="vocabseg",
        description="Open-vocabulary semantic segmentation with CLIP: label every pixel with one of your words.",
        epilog="Run `vocabseg COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"vocabseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=_Commands)
    for name, (module, _) in SUBCOMMANDS.items():
        if commands is None or name in commands:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named on a command line (the top level takes only flags without values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"vocabseg: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(commands={_command(argv)}).parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
