"""The model side of the server, shared by the REST API and the page.

One :class:`Segmenter` per method, created on first use and kept (so a method's model is loaded once
and shared by every request), behind a bounded queue: at most ``workers`` requests run on a model and
at most ``queue_size`` more wait, so memory stays bounded however many clients connect.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import VocabsegError, VocabularyError
from ..methods import get_method_spec, list_methods
from ..result import SegmentationResult
from ..segmenter import Segmenter
from ..text.vocabulary import Vocabulary, parse_background
from .config import ServeConfig

log = logging.getLogger(__name__)

SegmenterFactory = Callable[[str], Segmenter]


class MethodUnavailableError(VocabsegError):
    """The requested method is not offered, or its model could not be loaded on this server."""


class ServerBusyError(RuntimeError):
    """The request queue is full; ``retry_after`` is a guess, in seconds, of when a slot frees up."""

    def __init__(self, retry_after: int):
        super().__init__(f"The server is busy (request queue full); retry in about {retry_after} s.")
        self.retry_after = retry_after


class SegmenterPool:
    """Creates each method's Segmenter once, on first use; remembers methods that failed to load."""

    def __init__(self, factory: SegmenterFactory, methods: Sequence[str]):
        if not methods:
            raise ValueError("A server needs at least one method.")
        self.methods = list(dict.fromkeys(methods))
        self._factory = factory
        self._loaded: dict[str, Segmenter] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_segmenter(cls, segmenter: Segmenter | SegmenterFactory, methods: Sequence[str] | None = None):
        """A ready Segmenter serves its own method only; a factory serves ``methods`` (default: all)."""
        if isinstance(segmenter, Segmenter):
            pool = cls(lambda name: segmenter, [segmenter.spec.name])
            pool._loaded[segmenter.spec.name] = segmenter
            return pool
        return cls(segmenter, methods or list_methods())

    def get(self, method: str) -> Segmenter:
        """The method's Segmenter, loading it now if needed (callers hold a worker slot)."""
        if method not in self.methods:
            raise MethodUnavailableError(f"Unknown method {method!r}; this server offers: {', '.join(self.methods)}.")
        with self._lock:
            if method in self._loaded:
                return self._loaded[method]
            if method in self._failed:
                raise MethodUnavailableError(f"Method {method!r} is unavailable here: {self._failed[method]}")
            try:
                segmenter = self._factory(method)
            except Exception as exc:  # any load failure marks the method unavailable; the server stays up
                expected = isinstance(exc, (VocabsegError, ValueError, OSError))
                log.warning("method %s could not be loaded: %s", method, exc, exc_info=not expected)
                self._failed[method] = str(exc).strip() or type(exc).__name__
                raise MethodUnavailableError(f"Method {method!r} is unavailable here: {self._failed[method]}") from exc
            self._loaded[method] = segmenter
            return segmenter

    def loaded(self, method: str) -> Segmenter | None:
        return self._loaded.get(method)

    def status(self, method: str) -> tuple[str, str | None]:
        """``("loaded" | "not loaded" | "unavailable", message)``."""
        if method in self._loaded:
            return "loaded", None
        if method in self._failed:
            return "unavailable", self._failed[method]
        return "not loaded", None


class InferenceQueue:
    """Admits at most ``workers + max_waiting`` requests and runs at most ``workers`` at once."""

    def __init__(self, workers: int, max_waiting: int):
        self.workers = workers
        self.capacity = workers + max_waiting
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._completed = 0
        self._mean_seconds = 1.0

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a place in the queue; raises :class:`ServerBusyError` at once when it is full."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise ServerBusyError(self._retry_after())
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    @contextmanager
    def running(self) -> Iterator[None]:
        """Wait for a worker slot (blocking) and hold it."""
        with self._slots:
            with self._lock:
                self._running += 1
            start = time.monotonic()
            try:
                yield
            finally:
                elapsed = time.monotonic() - start
                with self._lock:
                    self._running -= 1
                    self._completed += 1
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * elapsed

    def _retry_after(self) -> int:
        return int(min(max(math.ceil(self._mean_seconds * self._admitted / self.workers), 1), 3600))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "workers": self.workers,
                "capacity": self.capacity,
                "running": self._running,
                "waiting": self._admitted - self._running,
                "completed": self._completed,
            }


class Engine:
    """The pool, the queue and the limits: what every request goes through."""

    def __init__(self, pool: SegmenterPool, config: ServeConfig):
        self.pool = pool
        self.config = config
        self.queue = InferenceQueue(config.workers, config.queue_size)
        self.default_method = config.default_method or pool.methods[0]
        if self.default_method not in pool.methods:
            raise ValueError(f"default method {self.default_method!r} is not among {pool.methods}")

    def parse_classes(self, classes: str) -> Vocabulary:
        """The class list, checked before the request waits for a worker."""
        vocab = Vocabulary.parse(classes or "")
        if len(vocab) > self.config.max_classes:
            raise VocabularyError(
                f"{len(vocab)} classes given; this server accepts at most {self.config.max_classes} per request."
            )
        return vocab

    def segment(
        self,
        image: bytes | str | Path,
        classes: str,
        *,
        method: str | None = None,
        background: str | None = None,
        prob_threshold: float | None = None,
        area_threshold: float | None = None,
    ) -> SegmentationResult:
        """Segment encoded image bytes (or a server-side file the page received) with the given classes.

        Blocks until a worker is free; call it inside ``queue.admitted()``. The image is decoded on
        the worker, so waiting requests hold only their encoded bytes.
        """
        vocab = self.parse_classes(classes)
        method = method or self.default_method
        if method not in self.pool.methods:
            offered = ", ".join(self.pool.methods)
            raise MethodUnavailableError(f"Unknown method {method!r}; this server offers: {offered}.")
        parse_background(background)  # refuse a malformed background before waiting for a worker
        with self.queue.running():
            segmenter = self.pool.get(method)
            (outcome,) = segmenter.segment_many(
                [image],
                vocab,
                background=background,
                max_pixels=self.config.max_pixels,
                prob_threshold=prob_threshold,
                area_threshold=area_threshold,
            )
            return outcome.result

    def methods_info(self) -> list[dict[str, Any]]:
        """Every offered method with its summary, defaults and load status."""
        info = []
        for name in self.pool.methods:
            spec = get_method_spec(name)
            status, message = self.pool.status(name)
            info.append(
                {
                    "name": name,
                    "summary": spec.summary,
                    "reference": spec.reference,
                    "status": status,
                    "message": message,
                    "default": name == self.default_method,
                    "defaults": spec.defaults.to_dict(),
                    "settings": loaded.config.to_dict() if (loaded := self.pool.loaded(name)) else None,
                }
            )
        return info
