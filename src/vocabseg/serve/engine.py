"""The model side of the server, shared by the REST API and the page.

One :class:`Segmenter` per method, created on first use and kept (so a method's model is loaded once
and shared by every request), behind a bounded queue: at most ``workers`` requests run on a model and
at most ``queue_size`` more wait, so memory stays bounded however many clients connect.

Each admitted request runs on its own daemon thread and the event loop waits for it (see
:meth:`Engine.run`), so the loop can give up on a request (time limit, client gone, shutdown) without
interrupting the model: an abandoned request that has not started is dropped when its turn comes, one
that has started finishes in the background and keeps its queue place and worker until then. Daemon
threads do not keep a stopping process alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
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
POLL_SECONDS = 0.2  # how often a request that waits for its answer checks that its client is still there


class MethodUnavailableError(VocabsegError):
    """The requested method is not offered, or its model could not be loaded on this server."""


class ServiceError(RuntimeError):
    """The server cannot answer this request now, through no fault of the request: ``status`` is its HTTP code."""

    status = 503


class ServerBusyError(ServiceError):
    """The request queue is full; ``retry_after`` is a guess, in seconds, of when a slot frees up."""

    def __init__(self, retry_after: int):
        super().__init__(f"The server is busy (request queue full); retry in about {retry_after} s.")
        self.retry_after = retry_after


class ServerStoppingError(ServiceError):
    """The server is shutting down: the request was not started, or did not finish within the grace period."""


class RequestTimeoutError(ServiceError):
    """The request did not finish within the server's time limit per request."""

    status = 504


class RequestDroppedError(ServiceError):
    """The client went away before its answer was ready; nobody reads this error but the access log."""

    status = 499  # "client closed request", as nginx logs it


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
        self._dropped = 0
        self._mean_seconds = 1.0

    def admit(self) -> Callable[[], None]:
        """Take a place in the queue and return the function that gives it back (call it once).

        Raises :class:`ServerBusyError` at once when the queue is full.
        """
        with self._lock:
            if self._admitted >= self.capacity:
                raise ServerBusyError(self._retry_after())
            self._admitted += 1

        def release() -> None:
            with self._lock:
                self._admitted -= 1

        return release

    @contextlib.contextmanager
    def running(self, claim: Callable[[], bool] | None = None) -> Iterator[None]:
        """Wait for a worker slot (blocking) and hold it.

        ``claim`` is asked once the slot is free; when it answers False (nobody waits for the result
        any more) the request is dropped without running: :class:`RequestDroppedError`.
        """
        with self._slots:
            if claim is not None and not claim():
                with self._lock:
                    self._dropped += 1
                raise RequestDroppedError("Nobody waits for this request any more; it was dropped before it ran.")
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
                "dropped": self._dropped,
            }


class _Job:
    """One request handed from the event loop, which waits for it, to the worker thread that runs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.future: asyncio.Future[SegmentationResult] = loop.create_future()
        self._lock = threading.Lock()
        self.started = False
        self.abandoned = False

    def claim(self) -> bool:
        """On the worker, once a slot is free: run (True) unless nobody waits for the result any more."""
        with self._lock:
            self.started = not self.abandoned
            return self.started

    def abandon(self, *, unless_started: bool = False) -> bool:
        """Nobody will wait for the result (``unless_started``: only if it has not started); returns
        whether it had started."""
        with self._lock:
            if not (unless_started and self.started):
                self.abandoned = True
            return self.started

    def fail(self, error: BaseException) -> None:
        """Answer the waiting request with ``error`` now (on the event loop)."""
        if not self.future.done():
            self.future.set_exception(error)

    def settle(self, result: SegmentationResult | None, error: BaseException | None) -> None:
        """Hand the outcome to the event loop (from the worker thread)."""

        def deliver() -> None:
            if self.future.done():  # answered already (shutdown) or given up on (time limit, client gone)
                if error is not None and not isinstance(error, (VocabsegError, ServiceError)):
                    log.error("an abandoned request failed", exc_info=error)
            elif error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody can be answered
            self.loop.call_soon_threadsafe(deliver)


class Engine:
    """The pool, the queue and the limits: what every request goes through."""

    def __init__(self, pool: SegmenterPool, config: ServeConfig):
        self.pool = pool
        self.config = config
        self.queue = InferenceQueue(config.workers, config.queue_size)
        self.default_method = config.default_method or pool.methods[0]
        if self.default_method not in pool.methods:
            raise ValueError(f"default method {self.default_method!r} is not among {pool.methods}")
        self.stopping = False
        self._jobs: set[_Job] = set()

    def check(self, classes: str, method: str | None = None, background: str | None = None) -> tuple[Vocabulary, str]:
        """The class list and the method, checked against the limits before the request takes a place in
        the queue."""
        config = self.config
        vocab = Vocabulary.parse(classes or "")
        if len(vocab) > config.max_classes:
            raise VocabularyError(
                f"{len(vocab)} classes given; this server accepts at most {config.max_classes} per request."
            )
        names = [*vocab.prompt_names, *parse_background(background)]
        if len(names) > config.max_names:
            raise VocabularyError(
                f"{len(names)} names given (classes, their ';' synonyms and background names); "
                f"this server accepts at most {config.max_names} per request."
            )
        for name in names:
            if len(name) > config.max_name_chars:
                shown = name if len(name) <= 40 else name[:40] + "..."
                raise VocabularyError(
                    f"The name {shown!r} is {len(name):,} characters long; "
                    f"this server accepts names of at most {config.max_name_chars} characters."
                )
        method = method or self.default_method
        if method not in self.pool.methods:
            offered = ", ".join(self.pool.methods)
            raise MethodUnavailableError(f"Unknown method {method!r}; this server offers: {offered}.")
        return vocab, method

    def segment(
        self,
        image: bytes | str | Path,
        classes: str,
        *,
        method: str | None = None,
        background: str | None = None,
        prob_threshold: float | None = None,
        area_threshold: float | None = None,
        claim: Callable[[], bool] | None = None,
    ) -> SegmentationResult:
        """Segment encoded image bytes (or a server-side file the page received) with the given classes.

        Blocks until a worker is free (no queue place, no time limit: :meth:`run` adds them). The image
        is decoded on the worker, so waiting requests hold only their encoded bytes. ``claim``: see
        :meth:`InferenceQueue.running`.
        """
        vocab, method = self.check(classes, method, background)
        with self.queue.running(claim):
            segmenter = self.pool.get(method)
            (outcome,) = segmenter.segment_many(
                [image],
                vocab,
                background=background,
                max_pixels=self.config.max_pixels,
                prob_threshold=prob_threshold,
                area_threshold=area_threshold,
                return_probs=False,  # the page and the API show labels and per-class scores only
            )
            return outcome.result

    async def run(
        self,
        image: bytes | str | Path,
        classes: str,
        *,
        method: str | None = None,
        background: str | None = None,
        prob_threshold: float | None = None,
        area_threshold: float | None = None,
        client_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> SegmentationResult:
        """:meth:`segment` on a worker thread, with a place in the queue and the time limit.

        Raises (besides the request's own errors) :class:`ServerBusyError` when the queue is full,
        :class:`RequestTimeoutError` after ``config.request_timeout`` seconds, :class:`ServerStoppingError`
        when the server shuts down first, and :class:`RequestDroppedError` when ``client_gone()`` (asked
        every :data:`POLL_SECONDS` while waiting) says the client disconnected. In the last three cases
        a request that has not started never runs; one that has started finishes in the background.
        """
        if self.stopping:
            raise ServerStoppingError("The server is shutting down; send the request again once it is back.")
        self.check(classes, method, background)
        release = self.queue.admit()
        job = _Job(asyncio.get_running_loop())
        work = functools.partial(
            self.segment,
            image,
            classes,
            method=method,
            background=background,
            prob_threshold=prob_threshold,
            area_threshold=area_threshold,
            claim=job.claim,
        )
        try:
            threading.Thread(target=_work, args=(job, work, release), name="vocabseg-request", daemon=True).start()
        except BaseException:
            release()
            raise
        self._jobs.add(job)
        try:
            return await self._wait(job, client_gone)
        finally:
            self._jobs.discard(job)
            job.abandon()
            job.future.cancel()  # a no-op once answered; otherwise the late outcome is not delivered

    async def _wait(self, job: _Job, client_gone: Callable[[], Awaitable[bool]] | None) -> SegmentationResult:
        timeout = self.config.request_timeout
        deadline = job.loop.time() + timeout
        while not job.future.done():
            remaining = deadline - job.loop.time()
            if remaining <= 0:
                if job.abandon():
                    message = (
                        f"The segmentation did not finish within this server's limit of {timeout:g} s per request "
                        "(fewer classes or synonyms, or a smaller image, take less time)."
                    )
                else:
                    message = (
                        f"The request waited {timeout:g} s (this server's limit per request) without reaching a "
                        "worker: the server is busy; retry later."
                    )
                raise RequestTimeoutError(message)
            await asyncio.wait([job.future], timeout=min(remaining, POLL_SECONDS) if client_gone else remaining)
            if not job.future.done() and client_gone is not None and await client_gone():
                started = job.abandon()
                log.info(
                    "client disconnected; its request %s", "goes on in the background" if started else "is dropped"
                )
                raise RequestDroppedError("The client disconnected before its answer was ready.")
        return job.future.result()

    def stop(self) -> None:
        """Begin shutting down (call on the event loop): refuse new requests, answer those waiting for a
        worker now (they never run) and those running after ``config.shutdown_grace`` seconds unless they
        have finished; all with :class:`ServerStoppingError`."""
        self.stopping = True
        grace = self.config.shutdown_grace
        for job in list(self._jobs):
            if job.abandon(unless_started=True):
                error = ServerStoppingError(
                    f"The server is shutting down; the segmentation did not finish within its {grace:g} s grace period."
                )
                job.loop.call_later(grace, job.fail, error)
            else:
                job.fail(ServerStoppingError("The server is shutting down; the request was not started."))

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


def _work(job: _Job, work: Callable[[], SegmentationResult], release: Callable[[], None]) -> None:
    """A request's worker thread: run, give the queue place back, then hand the outcome over."""
    result, error = None, None
    try:
        result = work()
    except BaseException as exc:  # delivered to the waiting request, which decides what to answer
        error = exc
    finally:
        release()
    job.settle(result, error)
