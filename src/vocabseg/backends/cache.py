"""ONNX exports of methods' image sides, cached on disk next to the text embeddings.

An export is keyed like the text cache: by a fingerprint of the exact weights it was made from (the
CLIP image tower and, for ProxyCLIP, the VFM), and by everything else that shapes the graph: the
method and its options, the window size, the ONNX opset and the PyTorch version that traced it.
Changed weights get a new key, so a stale export is never served.

One trace gives two graphs sharing one weights file: ``STEM-global.onnx`` (features and CLIP's
global embedding, for CLIP-Surgery) and ``STEM.onnx`` (features only: the global branch pruned, so
the usual case does not run CLIP's last block twice), with ``STEM.data`` and a ``STEM.json``
description. Files are written to a scratch folder and renamed into place, weights first, so a
reader (another process sharing the folder) finds a graph only when everything it needs is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from ..io.files import atomic_write, atomic_write_text
from ..methods.base import DenseCLIPMethod
from ..models.fingerprint import hash_tensors, weights_fingerprint
from .onnx_export import OPSET, ImageSide, describe_export, option_value, trace

__all__ = ["ExportCache", "export_key"]


def export_key(method: DenseCLIPMethod, window: tuple[int, int]) -> str:
    """The cache key of ``method``'s image side at ``window`` = (H, W) pixels."""
    options = {k: option_value(v) for k, v in sorted(getattr(method, "method_options", {}).items())}
    parts = [
        getattr(method, "method_name", type(method).__qualname__),
        options,
        weights_fingerprint(method),
        hash_tensors(method.named_buffers()),  # non-persistent buffers too (ProxyCLIP's normalisation change)
        list(window),
        OPSET,
        torch.__version__,
    ]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


class ExportCache:
    """Exports in ``cache_dir/onnx/`` (``cache_dir=None``: a temporary folder removed with this object).

    ``exports`` counts the exports this object had to make (0 when everything came from disk).
    """

    def __init__(self, cache_dir: str | os.PathLike | None):
        self._scratch = None if cache_dir is not None else tempfile.TemporaryDirectory(prefix="vocabseg-onnx-")
        root = Path(cache_dir) if cache_dir is not None else Path(self._scratch.name)
        self.folder = root / "onnx"
        self.exports = 0

    def path(self, method: DenseCLIPMethod, window: tuple[int, int], with_global: bool) -> Path:
        """The ONNX file of ``method``'s image side at ``window`` (with the global embedding output if
        asked), exported now if it is not there."""
        stem = f"{getattr(method, 'method_name', 'method')}-{window[0]}x{window[1]}-{export_key(method, window)}"
        path = self.folder / (f"{stem}-global.onnx" if with_global else f"{stem}.onnx")
        if not path.is_file():
            self._export(method, window, stem)
            self.exports += 1
        return path

    def _export(self, method: DenseCLIPMethod, window: tuple[int, int], stem: str) -> None:
        import onnx_ir as ir
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        side = ImageSide(method, with_global=True)
        model = trace(side, window)
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=f".{stem}.") as scratch:
            both = Path(scratch) / f"{stem}-global.onnx"
            ir.save(model, both, external_data=f"{stem}.data")
            features = ir.load(both)  # its weights stay references into STEM.data
            for extra in [v for v in features.graph.outputs if v.name != side.output_names[0]]:
                features.graph.outputs.remove(extra)
            RemoveUnusedNodesPass()(features)
            os.replace(Path(scratch) / f"{stem}.data", self.folder / f"{stem}.data")
            os.replace(both, self.folder / both.name)
            proto = ir.serde.serialize_model(features)
            atomic_write(self.folder / f"{stem}.onnx", lambda f: f.write(proto.SerializeToString()))
        # for people looking into the folder; the graphs and weights are what counts
        description = describe_export(side, window, files={"features": f"{stem}.onnx", "with_global": both.name})
        atomic_write_text(self.folder / f"{stem}.json", json.dumps(description, indent=2) + "\n")
