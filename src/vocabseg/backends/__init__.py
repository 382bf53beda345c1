"""Inference backends for the image side of training-free methods: PyTorch, or an ONNX export run by
ONNX Runtime or OpenVINO (the ``cpu`` extra).

>>> from vocabseg.backends import wrap_method
>>> fast = wrap_method(create_method("sclip", clip), "openvino", precision="f32")  # doctest: +SKIP
>>> fast.logits(windows, text)  # what the method's own logits give, to ~1e-5  # doctest: +SKIP
"""

from . import onnxruntime, openvino  # noqa: F401  (registration)
from .base import PRECISIONS, BackendSpec, RuntimeUnavailableError, get_backend, list_backends
from .method import AutoMethod, BackendMethod, check_backend, wrap_method
from .onnx_export import ImageSide, VocabularyLogits, describe_export, export_onnx, exportable_methods

__all__ = [
    "PRECISIONS",
    "AutoMethod",
    "BackendMethod",
    "BackendSpec",
    "ImageSide",
    "RuntimeUnavailableError",
    "VocabularyLogits",
    "check_backend",
    "describe_export",
    "export_onnx",
    "exportable_methods",
    "get_backend",
    "list_backends",
    "wrap_method",
]
