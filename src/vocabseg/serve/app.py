"""One FastAPI app: the REST API under ``/api/v1``, ``/health``, and the Gradio page at ``/``."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData
from starlette.routing import BaseRoute, Match, NoMatchFound, Route
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..segmenter import Segmenter
from .api import build_health_router, build_router, internal_error_response
from .config import ServeConfig
from .engine import Engine, SegmenterFactory, SegmenterPool
from .middleware import BodyLimitMiddleware
from .page import CSS, EXAMPLES_DIR, HEAD, ScratchDir, build_page

log = logging.getLogger(__name__)

DESCRIPTION = """Open-vocabulary semantic segmentation: send an image and the class names, get the label map.

`POST /api/v1/segment` takes multipart form data (`image` file, `classes` text) and answers JSON with
per-class area, mean score and a COCO RLE mask, plus the label map as a base64 PNG; send
`Accept: image/png` to get the label PNG itself. The schema is served at `/openapi.json`
(the `/docs` page needs internet access in the browser, for its JavaScript)."""

# After the grace period the stopped requests are answered (503); uvicorn cancels what is left this much
# later, and a process still alive after another WATCHDOG_S seconds (a thread that cannot be stopped)
# exits at once.
ANSWER_MARGIN_S = 2.0
WATCHDOG_S = 5.0


def create_app(
    segmenter: Segmenter | SegmenterFactory,
    config: ServeConfig | None = None,
    *,
    methods: Sequence[str] | None = None,
) -> FastAPI:
    """The server app; run it with :func:`run_server` (or uvicorn).

    Args:
        segmenter: a ready :class:`Segmenter` (the server then offers its method only), or a factory
            ``method name -> Segmenter`` called once per method, on first use.
        config: limits and options (:class:`ServeConfig`).
        methods: the methods a factory serves (default: every registered method).
    """
    config = config or ServeConfig()
    engine = Engine(SegmenterPool.from_segmenter(segmenter, methods), config)
    scratch = ScratchDir(config.keep_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            scratch.cleanup()

    app = FastAPI(title="vocabseg", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_upload_bytes, prefix="/api/")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    routers = [build_router(engine), build_health_router(engine)]
    for router in routers:
        app.include_router(router)
    # before the page's mount at /, which takes any path
    app.router.routes.append(WrongMethodRoute([route for router in routers for route in router.routes]))
    allowed = [str(config.examples_dir or EXAMPLES_DIR)]
    return gr.mount_gradio_app(
        app,
        build_page(engine, scratch),
        path="/",
        server_name=config.host,
        server_port=config.port,
        max_file_size=config.max_upload_bytes,
        allowed_paths=allowed,
        footer_links=["settings"],
        ssr_mode=False,
        css=CSS,
        head=HEAD,
    )


class WrongMethodRoute(BaseRoute):
    """405 with ``Allow`` for a path that ``routes`` serve with other methods.

    Starlette answers so itself only when no route takes the path, and the page's mount at ``/`` takes
    every path (it would answer 404).
    """

    def __init__(self, routes: Sequence[BaseRoute]):
        self.routes = [route for route in routes if isinstance(route, Route) and route.methods]

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            allowed = {
                method
                for route in self.routes
                if route.matches(scope)[0] is Match.PARTIAL
                for method in route.methods or ()
            }
            if allowed:
                return Match.FULL, {"vocabseg_allowed_methods": sorted(allowed)}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = scope["vocabseg_allowed_methods"]
        detail = f"Method {scope['method']} is not allowed on {scope['path']}; use {' or '.join(allowed)}."
        response = JSONResponse({"detail": detail}, status_code=405, headers={"Allow": ", ".join(allowed)})
        await response(scope, receive, send)


async def _validation_error(request: Request, exc: Any) -> JSONResponse:
    """422 with one readable sentence (``classes: Field required``) besides FastAPI's error list."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    form = getattr(exc, "body", None)
    problems = []
    for error in errors:
        field = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "request"
        message = error.get("msg", "")
        if error.get("type") == "missing" and isinstance(form, FormData) and field in form:
            message = "is empty"  # FastAPI reports an empty form field as a missing one
            if field == "classes":
                message = "the class list is empty; give class names like 'cat, dog; puppy'"
        problems.append(f"{field}: {message}")
    detail = f"Invalid request: {'; '.join(problems)}."
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        detail += " Send multipart/form-data, e.g. curl -F image=@photo.jpg -F classes='cat, dog' URL."
    return JSONResponse({"detail": detail, "errors": jsonable_encoder(errors)}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return internal_error_response(exc)


class _Server(uvicorn.Server):
    """uvicorn, stopping within the grace period: on SIGINT/SIGTERM the engine answers the requests that
    wait for a worker at once and the running ones after ``shutdown_grace`` seconds (see
    :meth:`Engine.stop`); uvicorn cancels what is left ``ANSWER_MARGIN_S`` later."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self.loop is not None:
            self.loop.call_soon_threadsafe(self.engine.stop)  # a signal handler interrupts any code: defer
            deadline = self.engine.config.shutdown_grace + ANSWER_MARGIN_S + WATCHDOG_S
            threading.Thread(target=_exit_after, args=(deadline,), name="vocabseg-watchdog", daemon=True).start()
        super().handle_exit(sig, frame)


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    print(f"vocabseg serve: still running {seconds:g} s after the stop signal; exiting now", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def run_server(app: FastAPI, sock: socket.socket | None = None, *, log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT or SIGTERM, on ``sock`` (bound, not listening) or the config's host
    and port; then stop within the config's ``shutdown_grace`` (plus a few seconds)."""
    config = app.state.engine.config
    server = _Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            timeout_graceful_shutdown=math.ceil(config.shutdown_grace + ANSWER_MARGIN_S),
        ),
        app.state.engine,
    )
    server.run(sockets=None if sock is None else [sock])
