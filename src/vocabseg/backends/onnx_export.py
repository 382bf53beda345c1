"""Exporting a training-free method's image side to ONNX, for the backends and ``vocabseg export``.

Two graphs: :class:`ImageSide` (CLIP-normalised images -> the method's dense features, and CLIP's
global embedding when CLIP-Surgery needs it; ProxyCLIP's VFM is part of the method, so it is part of
the graph) and :class:`VocabularyLogits` (windows -> logits for a fixed vocabulary, the unit text
embeddings baked in as a constant). The window size is fixed (position embeddings are interpolated
for it), the batch axis is dynamic.

PyTorch's dynamo exporter (``torch.export`` + onnxscript) is used: the TorchScript exporter cannot
trace the bicubic ``scale_factor`` resize of CLIP's position embeddings. Everything that depends only
on the weights and the window size is then folded into constants, with limits high enough for the
position tables: timm's anti-aliased bicubic resize of a VFM's positions, left in the graph, is
computed differently by OpenVINO (0.05 off), and folded it is exact everywhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import MethodOptionError, SettingsError
from ..methods import get_method_spec, list_methods
from ..methods.base import DenseCLIPMethod, SegmentationMethod, dense_cosine_logits
from ..models.clip import clip_normalization
from .base import require

__all__ = [
    "OPSET",
    "INPUT",
    "ImageSide",
    "VocabularyLogits",
    "check_exportable",
    "describe_export",
    "exportable_methods",
    "export_onnx",
    "trace",
]

#: the ONNX opset of every export (part of the cache key)
OPSET = 18
#: the graphs' input: CLIP-normalised RGB images (B, 3, H, W) float32
INPUT = "images"
#: constant folding may read and write tensors up to this many elements (a ViT-L/14 position table at
#: a 1024-pixel window has ~5.5 M; onnxscript's default of 8192 leaves every position resize in the graph)
FOLD_LIMIT = 1 << 24
#: from this many bytes of weights on, an ONNX file keeps them in ``NAME.onnx.data`` (a protobuf message
#: holds at most 2 GiB; 64 MiB are left for the graph)
EXTERNAL_DATA_BYTES = 2**31 - 2**26


class ImageSide(nn.Module):
    """Images -> dense features (B, E, h, w) [and the global embedding (B, E)]: what a backend runs."""

    def __init__(self, method: DenseCLIPMethod, with_global: bool = False):
        super().__init__()
        self.method = method
        self.with_global = with_global

    @property
    def output_names(self) -> list[str]:
        return ["features", "global_embedding"] if self.with_global else ["features"]

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.method(images, return_global=self.with_global)


class VocabularyLogits(nn.Module):
    """Windows (B, 3, H, W) -> ``logit_scale`` x the method's logits (B, K, H, W) for fixed names.

    The logits are those :meth:`DenseCLIPMethod.logits` gives (cosine with the unit text embeddings,
    or CLIP-Surgery's, upsampled to the window) times ``logit_scale``, so a softmax over names gives
    vocabseg's probabilities; padding to ``pad_multiple`` happens inside the graph.
    """

    output_names = ["logits"]

    def __init__(
        self,
        method: DenseCLIPMethod,
        text: torch.Tensor,
        logit_scale: float,
        pad_multiple: int = 0,
        surgery: bool = False,
    ):
        super().__init__()
        self.method = method
        self.register_buffer("text", text.detach().float().clone())
        self.logit_scale = float(logit_scale)
        self.pad_multiple = pad_multiple
        self.surgery = surgery

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cos = dense_cosine_logits(self.method, images, self.text, pad_multiple=self.pad_multiple, surgery=self.surgery)
        return self.logit_scale * cos


def exportable_methods() -> list[str]:
    """The registered methods an export can hold: those whose logits are the cosine of dense features
    with the text (:class:`DenseCLIPMethod`), all training-free."""
    return [n for n in list_methods() if issubclass(get_method_spec(n).cls, DenseCLIPMethod)]


def dense_methods_only(who: str, name: str) -> MethodOptionError:
    """The error for a method no export can hold (a trained one, or one that scores names itself)."""
    return MethodOptionError(
        f"{who} supports the training-free dense-feature methods only ({', '.join(exportable_methods())}); "
        f"{name!r} is not one: use backend='torch'."
    )


def check_exportable(method: SegmentationMethod, who: str) -> DenseCLIPMethod:
    """``method`` if it can be exported: a dense-feature method with float32 weights on the CPU."""
    name = getattr(method, "method_name", type(method).__name__)
    if not isinstance(method, DenseCLIPMethod):
        raise dense_methods_only(who, name)
    vfm = getattr(method, "vfm", None)
    if vfm is not None and not isinstance(vfm, nn.Module):
        raise MethodOptionError(f"{who} needs the VFM of {name!r} as an nn.Module, not a {type(vfm).__name__}.")
    tensors = [*method.parameters(), *method.buffers()]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
    devices = sorted({t.device.type for t in tensors})
    if dtypes != ["float32"] or devices != ["cpu"]:
        raise SettingsError(
            f"{who} runs float32 models on the CPU; this {name} model is {'/'.join(dtypes)} on "
            f"{'/'.join(devices)}: use device='cpu', dtype='float32' (or backend='torch')."
        )
    return method


def _example(window: tuple[int, int], batch: int = 2) -> torch.Tensor:
    # batch 2: torch.export specialises axes of size 0 and 1, and the batch axis must stay symbolic
    return torch.randn(batch, 3, *window, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def trace(module: ImageSide | VocabularyLogits, window: tuple[int, int]) -> Any:
    """``module`` as an ONNX graph (an ``onnx_ir`` model) for windows of ``window`` = (H, W) pixels and
    any batch size, with everything that depends only on the weights folded into constants."""
    require("onnxscript", "the ONNX export")  # torch's exporter needs it; say how to install it
    import onnxscript.optimizer

    example = _example(window)
    training = module.training
    module.eval()
    try:
        module(example)  # fills per-grid caches (NACLIP's prior) before tracing, so they are constants
        program = torch.onnx.export(
            module,
            (example,),
            None,
            input_names=[INPUT],
            output_names=module.output_names,
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=False,
            verbose=False,
        )
    finally:
        module.train(training)
    onnxscript.optimizer.optimize(program.model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    return program.model


def export_onnx(module: ImageSide | VocabularyLogits, window: tuple[int, int], path: str | os.PathLike) -> Path:
    """Export ``module`` (see :func:`trace`) to ``path``, written atomically: a reader sees the old file
    or the whole new one, never a part. One self-contained file unless the weights need ``PATH.data``."""
    return _save(trace(module, window), Path(path))


def _save(model: Any, path: Path) -> Path:
    """Write an onnx_ir model atomically; weights beyond protobuf's limit go to ``PATH.data`` first."""
    import onnx_ir as ir

    from ..io.files import atomic_write

    weights = sum(t.const_value.nbytes for t in model.graph.initializers.values() if t.const_value is not None)
    if weights < EXTERNAL_DATA_BYTES:
        proto = ir.serde.serialize_model(model)
        return atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.name + ".data"  # the name the model refers to its weights by
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        ir.save(model, Path(scratch) / path.name, external_data=data)
        os.replace(Path(scratch) / data, path.parent / data)
        os.replace(Path(scratch) / path.name, path)
    return path


@torch.no_grad()
def describe_export(module: ImageSide | VocabularyLogits, window: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """The JSON sidecar of an export: what goes in, what comes out, and what it was made from."""
    method = module.method
    mean, std = clip_normalization(method.tower.visual)
    outputs = module(_example(window, batch=1))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    meaning = {
        "features": "dense features in CLIP's joint space (before L2 normalisation), one per patch of the grid",
        "global_embedding": "CLIP's image embedding (what encode_image returns), for CLIP-Surgery",
        "logits": "logit_scale x cosine of the unit dense features with each name's unit text embedding "
        "(CLIP-Surgery's adjusted cosine when surgery is true), "
        "upsampled (bilinear) to the window; softmax over names, then the max over a class's names",
    }
    return {
        "format": "vocabseg-onnx",
        "vocabseg_version": __version__,
        "torch_version": torch.__version__,
        "opset": OPSET,
        "method": getattr(method, "method_name", type(method).__name__),
        "method_options": {k: option_value(v) for k, v in getattr(method, "method_options", {}).items()},
        "inputs": [
            {
                "name": INPUT,
                "shape": ["batch", 3, *window],
                "dtype": "float32",
                "window": list(window),
                "layout": "NCHW, RGB",
                "normalization": {
                    "description": "RGB scaled to [0, 1], then (x - mean) / std per channel",
                    "mean": list(mean),
                    "std": list(std),
                },
            }
        ],
        "outputs": [
            {"name": n, "shape": ["batch", *o.shape[1:]], "dtype": "float32", "description": meaning[n]}
            for n, o in zip(module.output_names, outputs)
        ],
        **extra,
    }


def option_value(value: Any) -> Any:
    """A method option as JSON: plain values as they are, modules and callables by their class name."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
