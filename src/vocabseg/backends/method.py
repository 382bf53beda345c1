"""Methods whose image side runs on another backend, and :func:`wrap_method`, the way to get one.

:class:`BackendMethod` keeps everything of a training-free method but its forward pass: ``logits``
is :func:`~vocabseg.methods.base.dense_cosine_logits` (padding, cosine with the text, CLIP-Surgery,
upsampling) over the features an ONNX runtime computes from the method's export. :class:`AutoMethod`
times PyTorch and each installed runtime on the first windows and keeps the fastest: which one wins
depends on the CPU (ONNX Runtime beat PyTorch on a Zen 4 EPYC and not on an AVX2 Xeon).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import SettingsError, VocabsegError
from ..methods import get_method_spec
from ..methods.base import DenseCLIPMethod, SegmentationMethod, dense_cosine_logits
from ..text.encoder import default_cache_dir
from .base import (
    BackendOptions,
    BackendSpec,
    Session,
    backend_option,
    check_precision,
    get_backend,
    list_backends,
    register_backend,
)
from .base import require as require_runtime
from .cache import ExportCache
from .onnx_export import check_exportable, dense_methods_only, exportable_methods

__all__ = ["AutoMethod", "BackendMethod", "check_backend", "wrap_method"]

logger = logging.getLogger(__name__)

Features = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class _WrappedMethod(SegmentationMethod):
    """A method whose image side runs elsewhere: it answers for the wrapped method's name and options."""

    method: SegmentationMethod

    @property
    def method_name(self) -> str:
        return self.method.method_name

    @property
    def method_options(self) -> dict:
        return self.method.method_options


class BackendMethod(_WrappedMethod):
    """A training-free method whose features come from its ONNX export, run by ``backend``.

    One export (and one compiled session) per window size seen, at most ``max_window_sizes`` of them;
    windows of further sizes run on PyTorch (whole-image inference, ``crop=0``, has one size per
    image). The weights are watched: replacing a tensor or writing into it (``load_state_dict``,
    ``copy_``, an optimiser step) makes the next call export again; writes through ``.data`` are not
    seen, so wrap again after those.
    """

    def __init__(
        self, method: DenseCLIPMethod, backend: str, options: BackendOptions, cache: ExportCache | None = None
    ):
        super().__init__()
        spec = get_backend(backend)
        if spec.load is None:
            raise ValueError(f"Backend {backend!r} does not run ONNX exports.")
        who = backend_option(backend)
        self.method = check_exportable(method, who)
        require_runtime(spec.module, who)
        self.backend = backend
        self.options = options
        self.cache = cache or ExportCache(options.cache_dir)  # shared by AutoMethod's runtimes
        self._load = spec.load
        self._sessions: dict[tuple[int, int, bool], Session] = {}
        self._weights_version: tuple = ()
        self._warned_sizes = False
        self._lock = threading.Lock()  # a server's threads share one method: one export, one session each

    @property
    def precisions(self) -> set[str]:
        """What the compiled sessions compute in, as their runtime reports it."""
        return {s.precision for s in self._sessions.values()}

    def forward(self, images: torch.Tensor, return_global: bool = False) -> Features:
        """Dense features (B, E, h, w) [and the global embedding], as the wrapped method's ``forward``."""
        session = self._session((images.shape[-2], images.shape[-1]), return_global)
        if session is None:
            return self.method(images, return_global)
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        outputs = [torch.from_numpy(o) for o in session(array)]
        return (outputs[0], outputs[1]) if return_global else outputs[0]

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        return dense_cosine_logits(self, windows, text, pad_multiple=pad_multiple, surgery=surgery)

    def _session(self, window: tuple[int, int], with_global: bool) -> Session | None:
        with self._lock:
            return self._find_session(window, with_global)

    def _find_session(self, window: tuple[int, int], with_global: bool) -> Session | None:
        version = _weights_version(self.method)
        if version != self._weights_version:  # new or modified weights: sessions of the old ones are stale
            self._sessions.clear()
            self._weights_version = version
        key = (*window, with_global)
        if key in self._sessions:
            return self._sessions[key]
        sizes = {k[:2] for k in self._sessions}
        if window not in sizes and len(sizes) >= self.options.max_window_sizes:
            if not self._warned_sizes:
                warnings.warn(
                    f"backend={self.backend!r}: windows of more than {self.options.max_window_sizes} sizes; "
                    f"{window[0]}x{window[1]} and further sizes run on PyTorch (each size needs an export; "
                    "whole-image inference, crop=0, has one size per image: use a sliding window, crop > 0).",
                    stacklevel=5,
                )
                self._warned_sizes = True
            return None
        path = self.cache.path(self.method, window, with_global)
        threads = self.options.threads or torch.get_num_threads()
        self._sessions[key] = self._load(path, self.options.precision, threads)
        return self._sessions[key]


def _weights_version(module: torch.nn.Module) -> tuple:
    """Changes whenever a tensor of ``module`` is replaced or written in place (a cheap check per call;
    the weights' digest is computed only when this changes)."""
    version = []
    for t in (*module.parameters(), *module.buffers()):
        try:
            version.append((t.data_ptr(), t._version))
        except RuntimeError:  # inference-mode tensors have no version counter
            version.append((t.data_ptr(), None))
    return tuple(version)


class AutoMethod(_WrappedMethod):
    """Runs the fastest of PyTorch and every installed ONNX runtime, timed on the first windows.

    The first call runs each candidate once untimed (export, compilation, first allocations) and
    ``repeats`` times timed on its first ``probe_windows`` windows; the fastest is kept from then on
    (``chosen``, with ``timings`` in seconds). A runtime that fails there is skipped with a warning.
    """

    def __init__(self, method: DenseCLIPMethod, options: BackendOptions, probe_windows: int = 2, repeats: int = 2):
        super().__init__()
        self.method = method
        self.options = options
        self.probe_windows = probe_windows
        self.repeats = repeats
        self.chosen: str | None = None
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        runtimes = [n for n in list_backends(runtimes_only=True) if get_backend(n).installed]
        cache = ExportCache(options.cache_dir)  # one export serves every runtime
        self._candidates = {"torch": method, **{n: BackendMethod(method, n, options, cache) for n in runtimes}}

    def forward(self, images: torch.Tensor, return_global: bool = False) -> Features:
        with self._lock:
            if self.chosen is None:
                self._choose(images[: self.probe_windows], return_global)
        return self._candidates[self.chosen](images, return_global)

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        return dense_cosine_logits(self, windows, text, pad_multiple=pad_multiple, surgery=surgery)

    def _choose(self, probe: torch.Tensor, return_global: bool) -> None:
        for name, candidate in self._candidates.items():
            try:
                candidate(probe, return_global)
            except Exception as exc:
                if name == "torch":
                    raise
                warnings.warn(
                    f"backend='auto': {name} failed ({type(exc).__name__}: {exc}); not using it.", stacklevel=5
                )
                continue
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                candidate(probe, return_global)
                times.append(time.perf_counter() - start)
            self.timings[name] = min(times)
        self.chosen = min(self.timings, key=self.timings.__getitem__)
        logger.info("backend='auto' chose %s (seconds per probe: %s)", self.chosen, self.timings)


def _auto(method: SegmentationMethod, options: BackendOptions) -> SegmentationMethod:
    """Methods no runtime can run (trained ones, those scoring names themselves, GPU or half-precision
    models) stay on PyTorch."""
    try:
        check_exportable(method, backend_option("auto"))
    except VocabsegError:
        return method
    return AutoMethod(method, options)


def _runtime(name: str):
    return lambda method, options: BackendMethod(method, name, options)


register_backend(BackendSpec("torch", "PyTorch itself (any method, any device)", lambda method, options: method))
register_backend(
    BackendSpec("auto", "the fastest of torch and the installed runtimes, timed on the first windows", _auto)
)


def runtime_backend(name: str, summary: str, module: str, load) -> BackendSpec:
    """Register an ONNX runtime: ``load(path, precision, threads)`` compiles an exported model."""
    return register_backend(BackendSpec(name, summary, _runtime(name), module, load))


def check_backend(
    backend: str, precision: str = "f32", *, method: str | None = None, device: str | torch.device = "cpu"
) -> None:
    """Refuse before any model is loaded what :func:`wrap_method` would refuse after: an unknown
    backend or precision, a runtime that is not installed, or an ONNX runtime for a ``method`` (a
    registered name) it cannot export or a device other than the CPU (``torch`` and ``auto`` take any)."""
    spec = get_backend(backend)
    check_precision(precision)
    if spec.load is None:
        return
    who = backend_option(backend)
    if method is not None and get_method_spec(method).name not in exportable_methods():
        raise dense_methods_only(who, method)
    if torch.device(device).type != "cpu":
        raise SettingsError(f"{who} runs on the CPU, not on device={str(device)!r}: use backend='torch' there.")
    require_runtime(spec.module, who)


def wrap_method(
    method: SegmentationMethod,
    backend: str = "onnxruntime",
    precision: str = "f32",
    *,
    cache_dir: str | os.PathLike | None = "default",
    threads: int | None = None,
    max_window_sizes: int = 4,
) -> SegmentationMethod:
    """``method`` running its image side on ``backend`` (``"torch"`` returns it unchanged).

    Args:
        method: a method from :func:`~vocabseg.methods.create_method` (for the ONNX backends one
            of ``exportable_methods()``, with float32 weights on the CPU).
        backend: ``"torch"``, ``"onnxruntime"``, ``"openvino"`` or ``"auto"`` (see ``list_backends()``).
        precision: ``"f32"`` (exact) or ``"native"`` (the runtime's faster default where the CPU has
            one: OpenVINO's bf16 on AVX-512-BF16/AMX CPUs; the others stay float32).
        cache_dir: the vocabseg cache folder; exports go to its ``onnx/`` subfolder. ``"default"``:
            ``$VOCABSEG_CACHE`` or ``~/.cache/vocabseg`` (next to the text embeddings); ``None``: a
            temporary folder, exports made again by every new wrap.
        threads: CPU threads of the runtimes (default: as many as PyTorch uses).
        max_window_sizes: window sizes that get their own export; further sizes run on PyTorch.
    """
    spec = get_backend(backend)
    folder = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir is not None else None)
    options = BackendOptions(check_precision(precision), folder, threads, max_window_sizes)
    return spec.build(method, options)
