"""Server options and limits, in one frozen dataclass printed at start-up."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import SettingsError
from ..io.images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ServeConfig:
    """What one ``vocabseg serve`` process accepts and how much work it takes on at once.

    Attributes:
        host, port: where uvicorn binds; loopback unless the operator asks otherwise.
        max_upload_bytes: larger request bodies (API) and uploads (page) are refused with 413.
        max_pixels: larger images are refused with 413 from their header, before decoding.
        max_classes: more classes in one request are refused with 422.
        max_names: more names in one request (classes, their ``;`` synonyms and background names) are
            refused with 422: every name is encoded once per prompt template, so the text encoding
            cost grows with the names, not the classes.
        max_name_chars: a longer name is refused with 422.
        request_timeout: seconds a request may take (waiting for a worker included) before it is
            answered 504; a segmentation that already started still finishes in the background.
        shutdown_grace: seconds a running request is given to finish once the server is told to stop.
        workers: requests that run on the model at the same time.
        queue_size: requests that may wait for a worker; beyond that the API answers 503 + Retry-After.
        default_method: the method used when a request names none (``None``: the first one offered).
        examples_dir: images offered as examples on the page (``None``: the bundled ones).
        keep_seconds: how long the page's result files (downloads, masks) are kept for the browser.
        title: the page title.
    """

    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_classes: int = 100
    max_names: int = 200
    max_name_chars: int = 200
    request_timeout: float = 300.0
    shutdown_grace: float = 10.0
    workers: int = 1
    queue_size: int = 8
    default_method: str | None = None
    examples_dir: Path | None = None
    keep_seconds: int = 600
    title: str = "vocabseg: open-vocabulary semantic segmentation"

    def __post_init__(self) -> None:
        positive = ("max_upload_bytes", "max_classes", "max_names", "max_name_chars", "workers", "keep_seconds")
        bad = [name for name in positive if getattr(self, name) < 1]
        if not self.request_timeout > 0:
            bad.append("request_timeout")
        if not self.shutdown_grace >= 0:
            bad.append("shutdown_grace")
        if self.queue_size < 0:
            bad.append("queue_size")
        if self.max_pixels is not None and self.max_pixels < 1:
            bad.append("max_pixels")
        if not 0 <= self.port <= 65535:
            bad.append("port")
        if bad:
            raise SettingsError(f"Invalid server setting(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        if self.examples_dir is not None and not Path(self.examples_dir).is_dir():
            raise SettingsError(f"examples_dir (--examples) {self.examples_dir} is not a folder of example images.")

    def limits_text(self) -> str:
        """The limits clients run into, for the start-up banner."""
        pixels = "none" if self.max_pixels is None else f"{self.max_pixels:,} pixels"
        return (
            f"upload limit {self.max_upload_bytes:,} bytes, image limit {pixels}, "
            f"at most {self.max_classes} classes and {self.max_names} names ({self.max_name_chars} characters each), "
            f"{self.request_timeout:g} s per request; {self.workers} worker(s), queue of {self.queue_size}"
        )

    def to_dict(self) -> dict[str, object]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)}
