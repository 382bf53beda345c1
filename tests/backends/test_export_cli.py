"""``vocabseg export``: the ONNX model it writes runs under ONNX Runtime and gives what PyTorch gives, and the
JSON sidecar documents its input, normalisation, outputs and classes; mistakes are refused before any model
is loaded."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vocabseg import Segmenter
from vocabseg.backends import exportable_methods, onnx_export
from vocabseg.cli import main as cli
from vocabseg.methods import list_methods

from .helpers import ATOL, windows


def run_onnx(path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})


def test_export_with_classes_gives_the_segmenters_logits(tmp_path, tiny_clip_dir, capsys):
    model = tmp_path / "voc.onnx"
    code = cli.main(["export", "-o", str(model), "--method", "sclip", "--model", f"local-dir:{tiny_clip_dir}",
                     "--window", "32x48", "-c", "cat, dog; puppy", "--surgery", "--logit-scale", "50"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"wrote {model} (input images ['batch', 3, 32, 48] -> logits ['batch', 3, 32, 48])" in out
    seg = Segmenter("sclip", f"local-dir:{tiny_clip_dir}", surgery=True)
    names = ["cat", "dog", "puppy"]
    x = windows()
    with torch.inference_mode():
        expected = seg.method.logits(x, seg.text_encoder.encode(names), surgery=True)
    (logits,) = run_onnx(model, x)
    assert logits.shape == (3, 3, 32, 48)
    torch.testing.assert_close(torch.from_numpy(logits) / 50, expected, atol=ATOL, rtol=0)

    sidecar = json.loads(model.with_suffix(".json").read_text())
    (image,) = sidecar["inputs"]
    assert image["name"] == "images" and image["shape"] == ["batch", 3, 32, 48] and image["dtype"] == "float32"
    assert (image["normalization"]["mean"], image["normalization"]["std"]) == (list(seg.clip.mean), list(seg.clip.std))
    assert [(o["name"], o["shape"]) for o in sidecar["outputs"]] == [("logits", ["batch", 3, 32, 48])]
    assert (sidecar["classes"], sidecar["names"], sidecar["name_to_class"]) == (["cat", "dog"], names, [0, 1, 1])
    facts = (sidecar["method"], sidecar["logit_scale"], sidecar["surgery"], sidecar["opset"])
    assert facts == ("sclip", 50.0, True, 18)


def test_a_features_export_too_large_for_one_file_keeps_its_weights_apart(tmp_path, tiny_clip_dir, tiny_clip,
                                                                          monkeypatch):  # fmt: skip
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the weights passed protobuf's 2 GiB
    model = tmp_path / "out" / "naclip.onnx"
    code = cli.main(["export", "-o", str(model), "--method", "naclip", "--model", f"local-dir:{tiny_clip_dir}",
                     "--window", "48", "--surgery"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in model.parent.iterdir()) == ["naclip.json", "naclip.onnx", "naclip.onnx.data"]
    seg = Segmenter("naclip", f"local-dir:{tiny_clip_dir}")
    x = windows(h=48, w=48)
    with torch.inference_mode():
        features, global_embedding = seg.method(x, return_global=True)
    got = run_onnx(model, x)
    torch.testing.assert_close(torch.from_numpy(got[0]), features, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got[1]), global_embedding, atol=ATOL, rtol=1e-4)
    outputs = json.loads(model.with_suffix(".json").read_text())["outputs"]
    assert [(o["name"], o["shape"]) for o in outputs] == [("features", ["batch", 32, 3, 3]),
                                                          ("global_embedding", ["batch", 32])]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "proxyclip", "--window", "100"],
         "--window 100x100: proxyclip features need windows padded to a multiple of 56 (--pad-multiple); "
         "export 112x112"),
        (["--method", "maskclip"], "--window is needed: this method runs on whole images"),
        (["--method", "sclip", "--window", "32y48"], "--window '32y48' must be SIZE or HxW in pixels"),
        (["--method", "sclip", "--logit-scale", "-1"], "logit_scale=-1.0 (--logit-scale) must be"),
    ],
)  # fmt: skip
def test_mistakes_are_refused_before_a_model_is_loaded(tmp_path, capsys, args, message):
    code = cli.main(["export", "-o", str(tmp_path / "m.onnx"), "--model", "local-dir:/nonexistent", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("vocabseg: error: ") and message in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", [n for n in list_methods() if n not in exportable_methods()])
def test_methods_no_export_can_hold_are_not_offered(tmp_path, capsys, name):
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "-o", str(tmp_path / "m.onnx"), "--method", name])
    assert info.value.code == 2
    assert f"invalid choice: '{name}'" in capsys.readouterr().err
