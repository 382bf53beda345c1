"""Backends against PyTorch: every exportable method's logits through ONNX Runtime and OpenVINO equal its
own (f32), with and without CLIP-Surgery; exports are cached, reused and made again when the weights
change; missing runtimes, trained methods and bad settings are refused clearly."""

from __future__ import annotations

import copy
import json
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAINED_OPTIONS, make_tiny_clip, make_tiny_sam

from vocabseg.backends import (
    AutoMethod,
    BackendMethod,
    RuntimeUnavailableError,
    check_backend,
    exportable_methods,
    get_backend,
    wrap_method,
)
from vocabseg.errors import MethodOptionError, SettingsError, UnknownNameError, VocabsegError
from vocabseg.inference.sliding import centered_padding
from vocabseg.methods import create_method, get_method_spec, list_methods

from .helpers import ATOL, unit_text, windows

RUNTIMES = ["onnxruntime", "openvino"]


def pad_of(name: str) -> int:
    return get_method_spec(name).defaults.pad_multiple


@pytest.mark.parametrize("surgery", [False, True], ids=["plain", "surgery"])
@pytest.mark.parametrize("backend", RUNTIMES)
@pytest.mark.parametrize("name", exportable_methods())
def test_backend_logits_equal_torch(dense_methods, onnx_cache, name, backend, surgery):
    method = dense_methods[name]
    x, text, pad = windows(), unit_text(), pad_of(name)
    wrapped = wrap_method(method, backend, "f32", cache_dir=onnx_cache)
    assert isinstance(wrapped, BackendMethod) and wrapped.method is method
    with torch.inference_mode():
        expected = method.logits(x, text, pad_multiple=pad, surgery=surgery)
        got = wrapped.logits(x, text, pad_multiple=pad, surgery=surgery)
        padded = F.pad(x, centered_padding(32, 48, pad))  # what the model sees (56 x 56 for ProxyCLIP)
        features, features_torch = wrapped(padded, surgery), method(padded, surgery)
    assert got.shape == expected.shape == (3, 5, 32, 48)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    pairs = zip(features, features_torch) if surgery else [(features, features_torch)]  # (+ global embedding)
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    assert wrapped.precisions == {"f32"}


def test_the_batch_axis_is_dynamic(dense_methods, onnx_cache):
    method, text = dense_methods["sclip"], unit_text()
    wrapped = wrap_method(method, "onnxruntime", cache_dir=onnx_cache)
    with torch.inference_mode():
        for b in (1, 5):
            x = windows(b=b, seed=b)
            torch.testing.assert_close(wrapped.logits(x, text), method.logits(x, text), atol=ATOL, rtol=0)
    assert len(wrapped._sessions) == 1  # one export and session for every batch size


def test_a_second_wrap_reuses_the_cached_export(dense_methods, onnx_cache):
    method, x, text = dense_methods["clearclip"], windows(), unit_text()
    with torch.inference_mode():
        wrap_method(method, "onnxruntime", cache_dir=onnx_cache).logits(x, text)
        files = {p: p.stat().st_mtime_ns for p in (onnx_cache / "onnx").glob("clearclip-*")}
        again = wrap_method(method, "openvino", cache_dir=onnx_cache)
        again.logits(x, text)
        again.logits(x, text, surgery=True)  # the other graph of the same export
    assert again.cache.exports == 0
    assert {p: p.stat().st_mtime_ns for p in (onnx_cache / "onnx").glob("clearclip-*")} == files
    stem = next(p for p in files if p.suffix == ".data").stem
    suffixes = {".data", ".onnx", "-global.onnx", ".json"}
    assert sorted(p.name for p in files) == sorted(stem + s for s in suffixes)


def test_changed_weights_make_a_new_export(tiny_clip, onnx_cache):
    clip = copy.deepcopy(tiny_clip)  # the session's weights (their export is cached), to be changed here
    method = create_method("sclip", clip).eval()
    x, text = windows(), unit_text()
    wrapped = wrap_method(method, "onnxruntime", cache_dir=onnx_cache)
    with torch.inference_mode():
        before = wrapped.logits(x, text)
    made = wrapped.cache.exports
    with torch.no_grad():
        clip.visual.transformer.resblocks[-1].attn.out_proj.weight.mul_(1.5)
    with torch.inference_mode():
        after, expected = wrapped.logits(x, text), method.logits(x, text)
    assert wrapped.cache.exports == made + 1
    torch.testing.assert_close(after, expected, atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 1e-2  # the old export would have given the old logits
    rewrapped = wrap_method(method, "openvino", cache_dir=onnx_cache)
    with torch.inference_mode():
        torch.testing.assert_close(rewrapped.logits(x, text), expected, atol=ATOL, rtol=0)
    assert rewrapped.cache.exports == 0


def test_windows_of_too_many_sizes_run_on_torch(dense_methods, onnx_cache):
    method, text = dense_methods["sclip"], unit_text()
    wrapped = wrap_method(method, "onnxruntime", cache_dir=onnx_cache, max_window_sizes=1)
    other = windows(h=48, w=32)
    with torch.inference_mode():
        wrapped.logits(windows(), text)
        with pytest.warns(UserWarning, match=r"48x32 and further sizes run on PyTorch"):
            got = wrapped.logits(other, text)
        torch.testing.assert_close(got, method.logits(other, text))  # torch's own result, exactly
    assert {k[:2] for k in wrapped._sessions} == {(32, 48)}


def test_auto_times_every_installed_backend_and_keeps_the_fastest(dense_methods, onnx_cache):
    method, x, text = dense_methods["maskclip"], windows(), unit_text()
    auto = wrap_method(method, "auto", cache_dir=onnx_cache)
    assert isinstance(auto, AutoMethod) and auto.chosen is None
    with torch.inference_mode():
        got = auto.logits(x, text)
        torch.testing.assert_close(got, method.logits(x, text), atol=ATOL, rtol=0)
    assert set(auto.timings) == {"torch", *RUNTIMES}
    assert auto.chosen == min(auto.timings, key=auto.timings.get)


def test_openvino_native_precision_is_the_cpus_default(dense_methods, onnx_cache):
    import openvino as ov

    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    method, x, text = dense_methods["clip"], windows(), unit_text()
    native = wrap_method(method, "openvino", "native", cache_dir=onnx_cache)
    exact = wrap_method(method, "openvino", "f32", cache_dir=onnx_cache)
    with torch.inference_mode():
        expected = method.logits(x, text)
        low = native.logits(x, text)
        torch.testing.assert_close(exact.logits(x, text), expected, atol=ATOL, rtol=0)
    assert native.precisions == {default} and exact.precisions == {"f32"}
    assert (low - expected).abs().max() < 0.1  # bf16 features: close, not exact


@pytest.mark.parametrize("backend", RUNTIMES)
def test_a_missing_runtime_is_a_clear_error(dense_methods, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    assert not get_backend(backend).installed
    with pytest.raises(RuntimeUnavailableError, match=rf"backend='{backend}' \(--backend\) needs the {backend} "
                       r"package, which is not installed: pip install 'vocabseg\[cpu\]'") as info:  # fmt: skip
        wrap_method(dense_methods["sclip"], backend)
    assert isinstance(info.value, VocabsegError)
    auto = wrap_method(dense_methods["sclip"], "auto", cache_dir=None)
    assert set(auto._candidates) == {"torch", *RUNTIMES} - {backend}


#: options making each method small on the tiny CLIP
SMALL = {
    **TINY_TRAINED_OPTIONS,
    "corrclip": dict(vfm_pretrained=None, masks="fixed", mask_options={"masks": []}),  # random DINO, no masks
    "trident": dict(vfm_pretrained=None, sam=make_tiny_sam()),
}


@pytest.mark.parametrize("name", [n for n in list_methods() if n not in exportable_methods()])
def test_methods_no_export_can_hold_stay_on_torch(name):
    """Trained methods, and training-free ones that score names themselves (CLIPer), have no dense
    features to export: the ONNX backends refuse them, auto and torch keep them."""
    torch.manual_seed(0)
    method = create_method(name, make_tiny_clip(), **SMALL.get(name, {})).eval()
    dense = ", ".join(exportable_methods())
    for backend in RUNTIMES:
        message = (rf"backend='{backend}' \(--backend\) supports the training-free dense-feature methods only "
                   rf"\({dense}\); '{name}' is not one: use backend='torch'")  # fmt: skip
        with pytest.raises(MethodOptionError, match=message):
            wrap_method(method, backend)
        with pytest.raises(MethodOptionError, match=message):
            check_backend(backend, method=name)
    assert wrap_method(method, "auto") is method
    assert wrap_method(method, "torch") is method
    assert "beyond_labels" in list_methods(trainable=True) and "beyond_labels" not in exportable_methods()


def test_bad_settings_are_refused(dense_methods):
    method = dense_methods["sclip"]
    with pytest.raises(UnknownNameError, match=r"Unknown backend 'onnx'.* Available: auto, onnxruntime, openvino"):
        wrap_method(method, "onnx")
    with pytest.raises(SettingsError, match=r"precision='bf16' \(--precision\) must be one of f32, native"):
        wrap_method(method, "openvino", "bf16")
    half = create_method("sclip", make_tiny_clip()).to(torch.bfloat16)
    with pytest.raises(SettingsError, match=r"runs float32 models on the CPU; this sclip model is bfloat16 on cpu"):
        wrap_method(half, "onnxruntime")
    assert wrap_method(half, "auto") is half  # nothing but torch can run it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wrap_method(method, "torch") is method


def test_choices_are_checked_before_a_model_is_loaded(monkeypatch):
    check_backend("onnxruntime", "f32", method="sclip", device="cpu")
    check_backend("auto", "native", method="beyond_labels", device="cuda")  # auto and torch take anything
    check_backend("torch", method="beyond_labels", device="cuda")
    with pytest.raises(UnknownNameError, match=r"Unknown backend 'openvin'\. Did you mean 'openvino'\?"):
        check_backend("openvin")
    with pytest.raises(SettingsError, match=r"precision='fp32' \(--precision\)"):
        check_backend("torch", "fp32")
    with pytest.raises(SettingsError, match=r"\(--backend\) runs on the CPU, not on device='cuda:0'"):
        check_backend("openvino", device="cuda:0")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'vocabseg\[cpu\]'"):
        check_backend("openvino")


@pytest.mark.parametrize("backend", RUNTIMES)
def test_segmenter_and_cli_run_on_a_backend(backend, tiny_clip_dir, onnx_cache, tmp_path):
    """`Segmenter(backend=...)` / `--backend` give torch's probabilities, and result.json says what ran."""
    from vocabseg.cli.main import main
    from vocabseg.segmenter import Segmenter

    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    common = dict(method="sclip", model=f"local-dir:{tiny_clip_dir}", text_cache_dir=onnx_cache, short_side=0)
    seg = Segmenter(backend=backend, **common, crop=32, stride=16)
    torch_seg = Segmenter(**common, crop=32, stride=16)
    assert seg.runner is not seg.method and torch_seg.runner is torch_seg.method
    got, want = seg.segment(image, "cat, dog"), torch_seg.segment(image, "cat, dog")
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    assert seg.describe()["backend"] == backend and seg.describe()["precision"] == "f32"

    from PIL import Image

    Image.fromarray(image).save(tmp_path / "img.png")
    out = tmp_path / "out"
    model = f"local-dir:{tiny_clip_dir}"
    args = ["segment", str(tmp_path / "img.png"), "-c", "cat, dog", "-o", str(out), "--method", "sclip",
            "--model", model, "--backend", backend, "--crop", "32", "--stride", "16"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "img" / "result.json").read_text())["backend"] == backend


def test_a_backend_for_a_method_it_cannot_export_is_refused_before_loading():
    from vocabseg.segmenter import Segmenter

    with pytest.raises(MethodOptionError, match="backend='onnxruntime'.*cliper"):
        Segmenter(method="cliper", model="local-dir:/does-not-matter", backend="onnxruntime")
