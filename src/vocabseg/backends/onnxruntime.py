"""The ``onnxruntime`` backend: ONNX Runtime's CPU execution provider (float32 at either precision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import backend_option, require
from .method import runtime_backend


class OnnxRuntimeSession:
    """An export compiled by ONNX Runtime; ``run`` is thread-safe, so one session serves every caller."""

    precision = "f32"  # the CPU provider computes float32 models in float32

    def __init__(self, path: Path, precision: str, threads: int):
        ort = require("onnxruntime", backend_option("onnxruntime"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the exporter's graphs make it chatty about shapes
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        return self._session.run(None, {self._input: images})


runtime_backend("onnxruntime", "ONNX Runtime on the CPU (float32)", "onnxruntime", OnnxRuntimeSession)
