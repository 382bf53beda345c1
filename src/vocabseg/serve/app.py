"""One FastAPI app: the REST API under ``/api/v1``, ``/health``, and the Gradio page at ``/``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..segmenter import Segmenter
from .api import build_health_router, build_router
from .config import ServeConfig
from .engine import Engine, SegmenterFactory, SegmenterPool
from .middleware import BodyLimitMiddleware
from .page import CSS, EXAMPLES_DIR, HEAD, ScratchDir, build_page

DESCRIPTION = """Open-vocabulary semantic segmentation: send an image and the class names, get the label map.

`POST /api/v1/segment` takes multipart form data (`image` file, `classes` text) and answers JSON with
per-class area, mean score and a COCO RLE mask, plus the label map as a base64 PNG; send
`Accept: image/png` to get the label PNG itself. The schema is served at `/openapi.json`
(the `/docs` page needs internet access in the browser, for its JavaScript)."""


def create_app(
    segmenter: Segmenter | SegmenterFactory,
    config: ServeConfig | None = None,
    *,
    methods: Sequence[str] | None = None,
) -> FastAPI:
    """The server app; run it with uvicorn.

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
    app.include_router(build_router(engine))
    app.include_router(build_health_router(engine))
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


async def _validation_error(request: Request, exc: Any) -> JSONResponse:
    """422 with one readable sentence (``classes: Field required``) besides FastAPI's error list."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'request'}: {e.get('msg', '')}" for e in errors
    )
    detail = f"Invalid request: {problems}."
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        detail += " Send multipart/form-data, e.g. curl -F image=@photo.jpg -F classes='cat, dog' URL."
    return JSONResponse({"detail": detail, "errors": jsonable_encoder(errors)}, status_code=422)
