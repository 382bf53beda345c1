"""The ``openvino`` backend: OpenVINO on the CPU, exact float32 or its native lower precision.

OpenVINO computes in bf16 by default on CPUs with AVX-512-BF16 or AMX (features then differ from
PyTorch's by a few hundredths); ``precision="f32"`` sets ``INFERENCE_PRECISION_HINT`` to f32, which
matches PyTorch to ~1e-6.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .base import backend_option, require
from .method import runtime_backend


class OpenVINOSession:
    """An export compiled by OpenVINO for the CPU (one infer request, used by one caller at a time)."""

    def __init__(self, path: Path, precision: str, threads: int):
        ov = require("openvino", backend_option("openvino"))
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        #: what it computes in, as OpenVINO reports it ("f32", "bf16")
        self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        with self._lock:  # outputs live in the request's buffers: copy them before the next call
            self._request.infer({0: images})
            return [self._request.get_output_tensor(i).data.copy() for i in range(len(self._compiled.outputs))]


runtime_backend("openvino", "OpenVINO on the CPU (f32, or bf16 where the CPU has it)", "openvino", OpenVINOSession)
