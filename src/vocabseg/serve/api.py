"""The REST API: ``POST /api/v1/segment``, ``GET /api/v1/methods`` and ``GET /health``.

Every error a client can cause is answered with a 4xx and a ``detail`` message saying what to fix:
413 (upload or image too large), 415 (not an image), 422 (bad fields, classes or method). The server's
own conditions are 5xx with a ``detail`` too: 503 when the queue is full (with ``Retry-After``) or the
server is stopping, 504 past the time limit per request, 500 for an unexpected failure (its traceback
goes to the log). Uploads are read into memory, never written under a name.
"""

# no `from __future__ import annotations`: FastAPI reads the route's Annotated[...] parameters at
# definition time, and they refer to a local (the upload limit).
import base64
import io
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import ImageLoadError, ImageTooLargeError, SegmentationFailedError, VocabsegError
from ..io import rle
from ..result import SegmentationResult
from .engine import Engine, ServerBusyError, ServiceError

log = logging.getLogger(__name__)

PNG_DESCRIPTION = "PNG of class indices (mode P, 8-bit; the palette holds the class colours)"


class RLEMask(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed counts: column-major runs, decodable by pycocotools.mask")


class ClassResult(BaseModel):
    index: int = Field(description="value of this class in the label map")
    name: str
    names: list[str] = Field(description="every synonym the class was matched with")
    color: list[int] = Field(description="RGB colour used in the overlay and the PNG palette")
    pixels: int
    area: float = Field(description="fraction of the image, 0..1")
    mean_score: float = Field(description="mean class probability over the class's pixels")
    rle: RLEMask


class SegmentResponse(BaseModel):
    height: int
    width: int
    method: str
    model: str
    classes: list[ClassResult]
    background_index: int | None = Field(description="index of the background class, if one was added")
    labels_png: str = Field(description=f"base64 {PNG_DESCRIPTION}")
    settings: dict[str, Any] = Field(description="the inference settings used")
    templates: str | None = Field(None, description="the prompt template set")
    surgery: bool = Field(False, description="whether the CLIP-Surgery adjustment was applied")


class MethodInfo(BaseModel):
    name: str
    summary: str
    reference: str
    status: str = Field(description="loaded, not loaded (loads on first use) or unavailable")
    message: str | None = Field(description="why the method is unavailable")
    default: bool
    defaults: dict[str, Any]
    settings: dict[str, Any] | None = Field(description="the settings in use, once loaded")


class MethodsResponse(BaseModel):
    default: str
    methods: list[MethodInfo]


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {
    413: {"model": ErrorResponse, "description": "upload above the byte limit, or image above the pixel limit"},
    415: {"model": ErrorResponse, "description": "the upload is not a readable image"},
    422: {"model": ErrorResponse, "description": "missing or invalid fields, classes or method"},
    500: {"model": ErrorResponse, "description": "unexpected failure; the server log has the details"},
    503: {
        "model": ErrorResponse,
        "description": "request queue full (retry after the Retry-After seconds), or the server is stopping",
    },
    504: {"model": ErrorResponse, "description": "the request took longer than the server's time limit"},
}


def error_status(exc: BaseException) -> int:
    """The HTTP status of an error a request caused (4xx), or of the server's condition (5xx)."""
    if isinstance(exc, ServiceError):
        return exc.status
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, ImageLoadError):
        return 415
    return 422


def error_response(exc: VocabsegError | ServiceError) -> JSONResponse:
    status = error_status(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ServerBusyError) else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


def internal_error_response(exc: BaseException) -> JSONResponse:
    """A JSON 500 naming the exception's type only: its message and traceback may show server internals."""
    detail = f"Internal server error ({type(exc.__cause__ or exc).__name__}); the server log has the details."
    return JSONResponse({"detail": detail}, status_code=500)


def exception_response(exc: Exception) -> JSONResponse:
    """The JSON answer to any failure of a request: what to fix (4xx), the server's condition (5xx), or
    a 500 for an unexpected error, whose traceback is logged."""
    if isinstance(exc, (VocabsegError, ServiceError)) and not isinstance(exc, SegmentationFailedError):
        return error_response(exc)
    log.error("request failed unexpectedly", exc_info=exc)
    return internal_error_response(exc)


def labels_png(result: SegmentationResult) -> bytes:
    buffer = io.BytesIO()
    result.mask_image().save(buffer, format="PNG")
    return buffer.getvalue()


def result_payload(result: SegmentationResult) -> dict[str, Any]:
    """The JSON body: per-class statistics with an RLE mask each, and the label map as a PNG."""
    body = result.to_json()
    for stats in body["classes"]:
        stats["rle"] = rle.encode(result.labels == stats["index"])
    body["labels_png"] = base64.b64encode(labels_png(result)).decode("ascii")
    return body


def wants_png(accept: str) -> bool:
    """True when the Accept header prefers ``image/png`` to ``application/json``."""
    quality: dict[str, float] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = q
    png = quality.get("image/png", 0.0)
    return png > 0 and png >= quality.get("application/json", 0.0)


def build_router(engine: Engine) -> APIRouter:
    """The ``/api/v1`` routes, bound to one engine (its model, queue and limits)."""
    router = APIRouter(prefix="/api/v1", tags=["segmentation"])
    limit = engine.config.max_upload_bytes

    @router.post(
        "/segment",
        response_model=SegmentResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": f"JSON; with Accept: image/png the {PNG_DESCRIPTION}"},
            **ERRORS,
        },
        summary="Segment an image with a list of class names",
    )
    async def segment(
        request: Request,
        image: Annotated[UploadFile, File(description=f"the image (PNG, JPEG, WebP, ...), at most {limit:,} bytes")],
        classes: Annotated[str, Form(description='comma-separated, ";" between synonyms: "person; man, car, road"')],
        method: Annotated[
            str | None, Form(description="a method from GET /api/v1/methods (default: the server's)")
        ] = None,
        background: Annotated[str | None, Form(description='names that mean background, e.g. "sky; wall"')] = None,
        prob_threshold: Annotated[
            float | None, Form(ge=0, le=1, description="pixels below it become background")
        ] = None,
        area_threshold: Annotated[float | None, Form(ge=0, le=1, description="drop classes below this area")] = None,
    ) -> Any:
        try:
            result = await engine.run(
                await image.read(),
                classes,
                method=method or None,
                background=background,
                prob_threshold=prob_threshold,
                area_threshold=area_threshold,
                client_gone=request.is_disconnected,
            )
            if wants_png(request.headers.get("accept", "")):
                headers = {"X-Classes": json.dumps(result.classes)}  # ASCII: json escapes the rest
                png = await run_in_threadpool(labels_png, result)
                return Response(png, media_type="image/png", headers=headers)
            return await run_in_threadpool(result_payload, result)
        except Exception as exc:
            return exception_response(exc)
        finally:
            await image.close()

    @router.get("/methods", response_model=MethodsResponse, summary="The methods this server offers")
    def methods() -> dict[str, Any]:
        return {"default": engine.default_method, "methods": engine.methods_info()}

    return router


def build_health_router(engine: Engine) -> APIRouter:
    router = APIRouter(tags=["server"])

    @router.get("/health", summary="Liveness, queue state and limits")
    def health() -> dict[str, Any]:
        config = engine.config
        return {
            "status": "ok",
            "version": __version__,
            "default_method": engine.default_method,
            "loaded_methods": [m for m in engine.pool.methods if engine.pool.loaded(m) is not None],
            "queue": engine.queue.stats(),
            "limits": {
                "max_upload_bytes": config.max_upload_bytes,
                "max_pixels": config.max_pixels,
                "max_classes": config.max_classes,
                "max_names": config.max_names,
                "max_name_chars": config.max_name_chars,
                "request_timeout": config.request_timeout,
            },
        }

    return router
