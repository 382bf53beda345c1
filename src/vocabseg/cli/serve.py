"""``vocabseg serve``: the web page and the REST API, on one local server with one loaded model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..methods import get_method_spec, list_methods
from .common import REQUIRED, add_model_options, segmenter_from_args

if TYPE_CHECKING:
    from ..segmenter import Segmenter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start the web page and the REST API",
        description="Serve a Gradio page at / (upload an image, type classes, see the segmentation) and a "
        "REST API under /api/v1 (POST /api/v1/segment, GET /api/v1/methods; schema at /openapi.json), "
        "sharing one model per method, loaded once. Needs: pip install 'vocabseg[web]'.",
        epilog="Example: vocabseg serve --method sclip --model ViT-B-16 --pretrained openai --port 7860",
    )
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )
    s.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default: 20)")
    s.add_argument("--max-classes", type=int, default=100, help="most classes per request (default: 100)")
    s.add_argument("--workers", type=int, default=1, help="requests run on the model at once (default: 1)")
    s.add_argument("--queue-size", type=int, default=8, help="requests that may wait; more get 503 (default: 8)")
    s.add_argument(
        "--methods",
        nargs="+",
        choices=list_methods(),
        default=None,
        help="methods offered by the page and the API (default: every training-free one; --method is always "
        "included, so serve a trained method with --method NAME --weights PATH)",
    )
    s.add_argument(
        "--examples", type=Path, default=None, help="folder of example images (+ examples.json); its files are served"
    )
    add_model_options(p)
    p.set_defaults(run=run)


def segmenter_factory(args: argparse.Namespace) -> Callable[[str], Segmenter]:
    """Builds the Segmenter of any method with the command's model flags (the VFM only where used)."""

    def create(method: str) -> Segmenter:
        spec = get_method_spec(method)
        vfm = args.vfm if spec.uses_vfm else None
        weights = args.weights if spec.trainable else REQUIRED  # --weights belongs to the trained --method
        return segmenter_from_args(
            argparse.Namespace(**{**vars(args), "method": method, "vfm": vfm, "weights": weights})
        )

    return create


def run(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, require_web

    try:
        require_web()
    except ImportError as exc:
        print(f"vocabseg serve: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from ..serve import create_app

    try:
        config = ServeConfig(
            host=args.host,
            port=args.port,
            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
            max_pixels=args.max_pixels,
            max_classes=args.max_classes,
            workers=args.workers,
            queue_size=args.queue_size,
            default_method=args.method,
            examples_dir=args.examples,
        )
    except ValueError as exc:
        print(f"vocabseg serve: {exc}", file=sys.stderr)
        return 2
    methods = list(dict.fromkeys([args.method, *(args.methods or list_methods(trainable=False))]))
    app = create_app(segmenter_factory(args), config, methods=methods)
    print(f"vocabseg serve: loading {args.method} ({args.model}) ...", file=sys.stderr)
    app.state.engine.pool.get(args.method)  # fail now, not on the first request, if the model cannot load
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(
        f"vocabseg serve: page {url}/  API {url}/api/v1/segment  schema {url}/openapi.json\n"
        f"vocabseg serve: {config.limits_text()}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
