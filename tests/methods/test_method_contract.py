"""The contract every registered method keeps, checked for each name in ``list_methods()``.

A method registered in ``vocabseg.methods`` is picked up here with no edit: its logits' shapes on
square and non-square windows, batching (a batch equals its windows run one by one), determinism,
crop >= image giving the whole-image result, the Segmenter end to end, device and dtype, and the
completeness of its spec. Each method is built on a private tiny random CLIP (a method may freeze or
rewire its CLIP) plus, when its spec says it uses a VFM, the tiny random VFM. A method that needs
anything else (a mask generator, small head sizes to stay fast) gets it from :data:`EXTRA_KWARGS`.

The checks are plain functions, and the last tests feed them deliberately broken methods and specs,
so none of them can pass by construction.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAINED_OPTIONS, make_tiny_clip, make_tiny_sam
from torch import nn

import vocabseg.segmenter as segmenter_module
from vocabseg import Segmenter
from vocabseg.data.registry import DATASETS
from vocabseg.errors import MethodOptionError, SettingsError
from vocabseg.inference.config import InferenceConfig
from vocabseg.inference.sliding import rescaled_size
from vocabseg.methods import create_method, get_method_spec, list_methods, register_method
from vocabseg.methods import registry as method_registry
from vocabseg.methods.base import SegmentationMethod
from vocabseg.methods.registry import TEXT_INPUTS, MethodSpec, PaperSettings
from vocabseg.text.templates import resolve_templates

#: per-method extra ``create_method`` keywords, built from pytest's ``request`` (so an entry can use any
#: fixture: ``request.getfixturevalue("tiny_vfm")``). Methods whose spec uses a VFM get ``vfm=tiny_vfm``
#: without an entry; an entry's keywords are applied on top.
EXTRA_KWARGS: dict[str, Callable[[pytest.FixtureRequest], dict[str, Any]]] = {
    **{name: (lambda request, name=name: dict(TINY_TRAINED_OPTIONS[name])) for name in TINY_TRAINED_OPTIONS},
    "corrclip": lambda request: dict(masks=lambda image: [np.indices(image.shape[:2])[1] < image.shape[1] // 2]),
    "trident": lambda request: dict(sam=make_tiny_sam(), slide_crop=32, slide_stride=16),
}

SIZES = [(64, 64), (48, 80)]  # the tiny CLIP's native 4x4 grid, and a wide window
SMALL = dict(short_side=64, crop=32, stride=16)  # the 50x70 test image becomes 64x90, in several windows
CLASSES = "cat, dog, sofa"  # no synonyms, no background: softmax probabilities sum to 1
K = 3
TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------------------------
class Built(NamedTuple):
    name: str
    spec: MethodSpec
    method: nn.Module
    clip: nn.Module
    kwargs: dict[str, Any]


def method_kwargs(name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The keywords the tests build ``name`` with: the tiny VFM if it uses one, then its EXTRA_KWARGS entry."""
    kwargs: dict[str, Any] = {"vfm": request.getfixturevalue("tiny_vfm")} if get_method_spec(name).uses_vfm else {}
    if name in EXTRA_KWARGS:
        kwargs.update(EXTRA_KWARGS[name](request))
    return kwargs


def build(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """(method in eval mode, its private tiny CLIP); random initialisations are seeded by ``make_tiny_clip``."""
    clip = make_tiny_clip()
    try:
        method = create_method(name, clip, **kwargs).eval()
    except Exception as exc:  # noqa: BLE001 (any failure here means the tests do not know how to build it)
        pytest.fail(
            f"Method {name!r} could not be built with tiny random test models and {sorted(kwargs)} "
            f"({type(exc).__name__}: {exc}). If it needs something more (a mask generator, a VFM of another "
            f"kind, smaller head sizes), add an entry {name!r}: lambda request: {{...}} to EXTRA_KWARGS in "
            "tests/methods/test_method_contract.py.",
            pytrace=False,
        )
    return method, clip


@pytest.fixture(scope="module", params=list_methods())
def built(request) -> Built:
    name = request.param
    kwargs = method_kwargs(name, request)
    method, clip = build(name, kwargs)
    return Built(name, get_method_spec(name), method, clip, kwargs)


@pytest.fixture(scope="module")
def seg(built) -> Segmenter:
    """A Segmenter running exactly the module whose logits the other tests check."""
    return Segmenter(method=built.method, model=built.clip, text_cache_dir=None, **SMALL)


def text_dim(clip: nn.Module) -> int:
    return int(clip.text_projection.shape[-1])


def unit_text(spec: MethodSpec, dim: int, k: int = K, seed: int = 0) -> torch.Tensor:
    """(K, D), or (K, P, D) for a method taking per-template embeddings."""
    shape = (k, 3, dim) if spec.text_input == "per_template" else (k, dim)
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def windows(b: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def check_logits(method: nn.Module, text: torch.Tensor, size: tuple[int, int], pad: int) -> None:
    out = method.logits(windows(2, size), text, pad_multiple=pad)
    assert tuple(out.shape) == (2, text.shape[0], *size), f"logits {tuple(out.shape)} for windows (2, 3, {size})"
    assert out.dtype == torch.float32, out.dtype
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite logits"


@torch.inference_mode()
def check_batching(method: nn.Module, text: torch.Tensor, pad: int) -> None:
    x = windows(3, (48, 80))
    together = method.logits(x, text, pad_multiple=pad)
    alone = torch.cat([method.logits(x[i : i + 1], text, pad_multiple=pad) for i in range(3)])
    torch.testing.assert_close(together, alone, **TOL, msg=lambda m: f"a batch of 3 != each window alone: {m}")


@torch.inference_mode()
def check_deterministic(method: nn.Module, text: torch.Tensor, pad: int) -> None:
    x = windows(2, (48, 80))
    first, second = method.logits(x, text, pad_multiple=pad), method.logits(x, text, pad_multiple=pad)
    assert torch.equal(first, second), f"two calls differ by up to {float((first - second).abs().max()):.3g}"


def check_crop_covers_image(seg: Segmenter, image: np.ndarray) -> None:
    """A window at least as large as the (resized) image is one window over the whole image: crop=0.
    (Without CAT-Seg's square resize and global view, which make crop=0 another protocol.)"""
    plain = dict(square_size=0, global_weight=0.0)
    whole = seg.segment(image, CLASSES, crop=0, **plain).probs
    long_side = max(rescaled_size(*image.shape[:2], seg.config.short_side, seg.config.max_long_side))
    for crop in (long_side, 2 * long_side):
        got = seg.segment(image, CLASSES, crop=crop, stride=crop, **plain).probs
        np.testing.assert_array_equal(got, whole, err_msg=f"crop={crop} >= image side {long_side} vs crop=0")


def strict_json(text: str) -> Any:
    """``json.loads`` refusing NaN and Infinity, which strict parsers (browsers, jq) reject."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def check_segmenter(seg: Segmenter, image: np.ndarray, out_dir) -> None:
    res = seg.segment(image, CLASSES)
    height, width = image.shape[:2]
    assert res.labels.shape == (height, width) and res.labels.dtype == np.int32
    assert set(np.unique(res.labels)) <= set(range(K)), np.unique(res.labels)
    assert res.probs.shape == (K, height, width) and res.probs.dtype == np.float32
    assert np.isfinite(res.probs).all()
    assert res.probs.min() >= 0 and res.probs.max() <= 1, (res.probs.min(), res.probs.max())
    if seg.config.score == "softmax":
        np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5, err_msg="softmax probabilities do not sum to 1")
    data = strict_json(res.save(out_dir)["json"].read_text())
    assert (data["method"], data["height"], data["width"]) == (seg.spec.name, height, width)
    assert [c["name"] for c in data["classes"]] == ["cat", "dog", "sofa"]


def check_module_on(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    wrong = [
        f"{n} ({t.device}, {t.dtype})"
        for n, t in tensors
        if t.device.type != device.type or (t.is_floating_point() and t.dtype != dtype)
    ]
    assert not wrong, f"not on {device} in {dtype}: {wrong[:5]}"


def valid_paper_keys() -> set[str]:
    """The names :func:`~vocabseg.eval.protocols.resolve_protocol` is asked for: each benchmark's settings key."""
    return {spec.settings_key or name for name, spec in DATASETS.items()}


def check_spec(spec: MethodSpec) -> None:
    assert isinstance(spec.summary, str) and spec.summary.strip(), "empty summary"
    assert isinstance(spec.reference, str) and spec.reference.strip(), "empty reference"
    assert isinstance(spec.defaults, InferenceConfig), type(spec.defaults)
    assert spec.text_input in TEXT_INPUTS, spec.text_input
    assert resolve_templates(spec.templates), spec.templates
    if spec.paper is None:
        return
    assert isinstance(spec.paper.source, str) and spec.paper.source.strip(), "paper settings without a source"
    keys = valid_paper_keys()
    for benchmark, settings in spec.paper.settings.items():
        assert benchmark in keys, (
            f"paper settings for {benchmark!r}, which no benchmark looks up (PASCAL-5i folds read 'voc21'); "
            f"known: {sorted(keys)}"
        )
        spec.defaults.updated(**settings)  # valid settings (SettingsError / TypeError otherwise)
    for benchmark, options in spec.paper.options.items():
        assert benchmark in keys, f"paper options for {benchmark!r}, which no benchmark looks up; known: {sorted(keys)}"
        spec.check_options(options)  # options the method takes (MethodOptionError otherwise)
        same = sorted(k for k, v in options.items() if spec.options[k] == v)
        assert not same, f"paper options for {benchmark!r} repeat the constructor's defaults: {same}"


def check_options_round_trip(name: str, kwargs: dict[str, Any]) -> None:
    """Every option's default, through JSON (a trained checkpoint's config.json), passed back explicitly,
    builds the same method as leaving it out."""
    spec = get_method_spec(name)
    defaults = {k: v for k, v in spec.options.items() if k not in kwargs}
    try:
        explicit = json.loads(json.dumps(defaults))
    except TypeError as exc:
        raise AssertionError(f"{name}: an option's default is not JSON ({exc}); checkpoints cannot store it") from exc
    implicit_method, clip = build(name, kwargs)
    explicit_method, _ = build(name, {**explicit, **kwargs})
    assert list(explicit_method.method_options) == list(spec.options)
    text, x = unit_text(spec, text_dim(clip)), windows(2, (48, 80))
    pad = spec.defaults.pad_multiple
    with torch.inference_mode():
        want = implicit_method.logits(x, text, pad_multiple=pad)
        got = explicit_method.logits(x, text, pad_multiple=pad)
    assert torch.equal(got, want), f"{name}: explicit defaults {explicit} change the logits"


# ----------------------------------------------------------------------------------------------------------------
# every registered method
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_shape_and_values(built, size):
    text = unit_text(built.spec, text_dim(built.clip))
    check_logits(built.method, text, size, built.spec.defaults.pad_multiple)


def test_a_batch_equals_its_windows_one_by_one(built):
    check_batching(built.method, unit_text(built.spec, text_dim(built.clip)), built.spec.defaults.pad_multiple)


def test_two_calls_give_identical_logits(built):
    check_deterministic(built.method, unit_text(built.spec, text_dim(built.clip)), built.spec.defaults.pad_multiple)


def test_crop_at_least_the_image_is_the_whole_image(seg, rgb_image):
    check_crop_covers_image(seg, rgb_image)


def test_segmenter_end_to_end(seg, rgb_image, tmp_path):
    check_segmenter(seg, rgb_image, tmp_path)


def test_float32_on_the_cpu_and_half_precision_refused(built, seg):
    assert seg.dtype == torch.float32 and seg.device == torch.device("cpu")
    check_module_on(seg.method, torch.device("cpu"), torch.float32)
    for dtype in ("float16", "bfloat16", torch.float16):
        with pytest.raises(SettingsError, match=r"\(--dtype\) is not supported on the CPU"):
            Segmenter(method=built.method, model=built.clip, dtype=dtype, text_cache_dir=None)
    check_module_on(built.method, torch.device("cpu"), torch.float32)  # refused before anything moved


def test_spec_is_complete(built):
    check_spec(built.spec)


def test_option_defaults_round_trip_through_create_method(built):
    check_options_round_trip(built.name, built.kwargs)


# ----------------------------------------------------------------------------------------------------------------
# the checks catch broken methods and specs
# ----------------------------------------------------------------------------------------------------------------
class Faulty(SegmentationMethod):
    """A working method's logits passed through ``fault(logits, windows)``; the Segmenter sees the inner name."""

    def __init__(self, inner: nn.Module, fault: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner, self.fault = inner, fault
        self.method_name = inner.method_name

    def logits(self, windows, text, *, pad_multiple=0, surgery=False):
        return self.fault(self.inner.logits(windows, text, pad_multiple=pad_multiple, surgery=surgery), windows)


def with_nan(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[0, 0, 0, 0] = float("nan")
    return out


FAULTS = {
    "wrong size": (lambda out, w: out[..., ::2, :], check_logits),
    "non-finite": (with_nan, check_logits),
    "batch mixing": (lambda out, w: out + 0.5 * out.mean(0, keepdim=True), check_batching),
    "random": (lambda out, w: out + 1e-3 * torch.randn_like(out), check_deterministic),
}


@pytest.fixture(scope="module")
def sclip(tiny_clip) -> nn.Module:
    return create_method("sclip", tiny_clip).eval()


@pytest.mark.parametrize("fault", FAULTS)
def test_logit_checks_catch_faults(sclip, tiny_clip, fault):
    transform, check = FAULTS[fault]
    text = unit_text(get_method_spec("sclip"), text_dim(tiny_clip))
    args = ((64, 64), 0) if check is check_logits else (0,)
    check(sclip, text, *args)  # the working method passes
    with pytest.raises(AssertionError):
        check(Faulty(sclip, transform), text, *args)


def test_crop_check_catches_a_pipeline_that_slides_over_a_covering_crop(sclip, tiny_clip, rgb_image, monkeypatch):
    seg = Segmenter(method=sclip, model=tiny_clip, text_cache_dir=None, **SMALL)
    check_crop_covers_image(seg, rgb_image)
    slide = segmenter_module.sliding_window_logits

    def halved(images, fn, crop, stride, *args, **kwargs):  # still slides when the crop covers the image
        return slide(images, fn, crop // 2, max(crop // 4, 1) if crop else stride, *args, **kwargs)

    monkeypatch.setattr(segmenter_module, "sliding_window_logits", halved)
    with pytest.raises(AssertionError, match="crop=90"):
        check_crop_covers_image(seg, rgb_image)


def test_segmenter_check_catches_bad_probabilities(sclip, tiny_clip, rgb_image, tmp_path, monkeypatch):
    seg = Segmenter(method=sclip, model=tiny_clip, text_cache_dir=None, **SMALL)
    check_segmenter(seg, rgb_image, tmp_path / "ok")
    scores = segmenter_module.class_probabilities
    monkeypatch.setattr(segmenter_module, "class_probabilities", lambda *a, **k: 0.9 * scores(*a, **k))
    with pytest.raises(AssertionError, match="do not sum to 1"):
        check_segmenter(seg, rgb_image, tmp_path / "scaled")
    nan_seg = Segmenter(method=Faulty(sclip, with_nan), model=tiny_clip, text_cache_dir=None, **SMALL)
    monkeypatch.undo()
    with pytest.raises(AssertionError):
        check_segmenter(nan_seg, rgb_image, tmp_path / "nan")
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        strict_json('{"mean_score": NaN}')


def test_device_check_catches_a_stray_tensor(sclip):
    check_module_on(sclip, torch.device("cpu"), torch.float32)
    stray = Faulty(sclip, lambda out, w: out)
    stray.register_buffer("table", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(AssertionError, match=r"table \(cpu, torch.float64\)"):
        check_module_on(stray, torch.device("cpu"), torch.float32)
    stray.table = torch.zeros(2, device="meta")
    with pytest.raises(AssertionError, match=r"table \(meta"):
        check_module_on(stray, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(summary=" "), AssertionError, "empty summary"),
        (dict(reference=""), AssertionError, "empty reference"),
        (dict(defaults={"crop": 224}), AssertionError, "dict"),
        (dict(paper=PaperSettings("SCLIP configs", {"voc22": {}})), AssertionError, "'voc22'"),
        (dict(paper=PaperSettings("SCLIP configs", {"pascal5i-0": {}})), AssertionError, "'pascal5i-0'"),
        (dict(paper=PaperSettings("", {"voc21": {}})), AssertionError, "without a source"),
        (dict(paper=PaperSettings("SCLIP configs", {"voc21": {"crop": -1}})), SettingsError, "crop=-1"),
        (dict(paper=PaperSettings("SCLIP configs", {}, {"voc22": {}})), AssertionError, "options for 'voc22'"),
        (dict(paper=PaperSettings("SCLIP configs", {}, {"voc21": {"gama": 2}})), MethodOptionError, "take gama"),
        (
            dict(options={"gamma": 3.0}, paper=PaperSettings("SCLIP configs", {}, {"voc21": {"gamma": 3.0}})),
            AssertionError,
            r"repeat the constructor's defaults: \['gamma'\]",
        ),
    ],
)
def test_spec_check_catches_incomplete_specs(change, error, message):
    spec = get_method_spec("sclip")
    check_spec(spec)
    with pytest.raises(error, match=message):
        check_spec(dataclasses.replace(spec, **change))


@pytest.fixture()
def scratch_registry(monkeypatch):
    """Methods registered in a test go into a copy of the registry, dropped afterwards."""
    monkeypatch.setattr(method_registry, "_METHODS", dict(method_registry._METHODS))


def register_toy(name: str, cls: type[nn.Module]) -> None:
    register_method(name, defaults=InferenceConfig(), summary="toy", reference="none")(cls)


def test_round_trip_check_catches_defaults_that_cannot_be_passed_back(scratch_registry, sclip):
    class TupleOnly(SegmentationMethod):  # a tuple default comes back from JSON as a list
        def __init__(self, clip: nn.Module, layers: tuple[int, ...] = (1, 2)):
            super().__init__()
            if not isinstance(layers, tuple):
                raise TypeError(f"layers must be a tuple, got {layers!r}")
            self.inner = sclip

        def logits(self, windows, text, *, pad_multiple=0, surgery=False):
            return self.inner.logits(windows, text)

    class NotJSON(TupleOnly):
        def __init__(self, clip: nn.Module, norm: type = nn.LayerNorm):
            super().__init__(clip)

    register_toy("toy_tuple", TupleOnly)
    register_toy("toy_class_default", NotJSON)
    with pytest.raises(pytest.fail.Exception, match="layers must be a tuple"):
        check_options_round_trip("toy_tuple", {})
    check_options_round_trip("toy_tuple", {"layers": (1, 2)})  # passes once the option is not round-tripped
    with pytest.raises(AssertionError, match="not JSON"):
        check_options_round_trip("toy_class_default", {})


def test_a_method_the_tests_cannot_build_names_extra_kwargs(scratch_registry, request):
    class NeedsMasks(SegmentationMethod):
        def __init__(self, clip: nn.Module, masks: Callable | None = None):
            super().__init__()
            if masks is None:
                raise ValueError("toy_masks needs masks=")

    register_toy("toy_masks", NeedsMasks)
    with pytest.raises(pytest.fail.Exception) as info:
        build("toy_masks", method_kwargs("toy_masks", request))
    text = str(info.value)
    assert "'toy_masks' could not be built" in text and "ValueError: toy_masks needs masks=" in text
    assert "add an entry 'toy_masks': lambda request: {...} to EXTRA_KWARGS" in text
