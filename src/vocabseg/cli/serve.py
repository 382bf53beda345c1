"""``vocabseg serve``: the web page and the REST API, on one local server with one loaded model."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SettingsError
from ..methods import get_method_spec, list_methods
from ..serve.config import ServeConfig
from .common import REQUIRED, add_model_options, segmenter_from_args

if TYPE_CHECKING:
    from ..segmenter import Segmenter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        description="Serve a Gradio page at / (upload an image, type classes, see the segmentation) and a "
        "REST API under /api/v1 (POST /api/v1/segment, GET /api/v1/methods; schema at /openapi.json), "
        "sharing one model per method, loaded once. Needs: pip install 'vocabseg[web]'.",
        epilog="Example: vocabseg serve --method sclip --model ViT-B-16 --pretrained openai --port 7860",
    )
    s = p.add_argument_group("server")
    s.add_argument(
        "--host",
        default=ServeConfig.host,
        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 opens it to the network)",
    )
    s.add_argument("--port", type=int, default=ServeConfig.port, help="port; 0 picks a free one (default: %(default)s)")
    s.add_argument(
        "--max-upload-mb",
        type=float,
        default=ServeConfig.max_upload_bytes / 2**20,
        help="largest upload in MB (default: %(default)g)",
    )
    s.add_argument(
        "--max-classes",
        type=int,
        default=ServeConfig.max_classes,
        help="most classes per request (default: %(default)s)",
    )
    s.add_argument(
        "--max-names",
        type=int,
        default=ServeConfig.max_names,
        help="most names per request: classes, their ';' synonyms and background names; each is encoded "
        "once per prompt template (default: %(default)s)",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=ServeConfig.request_timeout,
        help="seconds a request may take, waiting included, before it is answered 504 (default: %(default)g)",
    )
    s.add_argument(
        "--shutdown-grace",
        type=float,
        default=ServeConfig.shutdown_grace,
        help="seconds the running requests get to finish on SIGTERM or Ctrl+C (default: %(default)g)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=ServeConfig.workers,
        help="requests run on the model at once (default: %(default)s)",
    )
    s.add_argument(
        "--queue-size",
        type=int,
        default=ServeConfig.queue_size,
        help="requests that may wait; more get 503 (default: %(default)s)",
    )
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
    from ..serve import require_web

    try:
        require_web()
    except ImportError as exc:
        print(f"vocabseg serve: {exc}", file=sys.stderr)
        return 2

    from ..serve import create_app, run_server

    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_classes=args.max_classes,
        max_names=args.max_names,
        request_timeout=args.request_timeout,
        shutdown_grace=args.shutdown_grace,
        workers=args.workers,
        queue_size=args.queue_size,
        default_method=args.method,
        examples_dir=args.examples,
    )
    sock = bind(config.host, config.port)  # before the model loads: a port in use fails at once
    try:
        config = dataclasses.replace(config, port=sock.getsockname()[1])  # the port picked for --port 0
        methods = list(dict.fromkeys([args.method, *(args.methods or list_methods(trainable=False))]))
        app = create_app(segmenter_factory(args), config, methods=methods)
        print(f"vocabseg serve: loading {args.method} ({args.model}) ...", file=sys.stderr)
        app.state.engine.pool.get(args.method)  # fail now, not on the first request, if the model cannot load
        url = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}"
        print(
            f"vocabseg serve: page {url}/  API {url}/api/v1/segment  schema {url}/openapi.json\n"
            f"vocabseg serve: {config.limits_text()}",
            file=sys.stderr,
        )
        run_server(app, sock)
    finally:
        sock.close()
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or a SettingsError saying why it cannot be."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart right after a stop
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        advice = (
            "is another server running there? Choose another --port"
            if exc.errno == errno.EADDRINUSE
            else "check --host and --port"
        )
        raise SettingsError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}; {advice}.") from None
    return sock
