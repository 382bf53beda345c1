"""CAT-Seg's evaluation as settings (``vocabseg.inference.published.CATSEG_EVAL``), against a literal
re-computation of the official procedure with the same fake method.

The reference below is ``CATSeg.inference_sliding_window`` step by step (detectron2's
``ResizeShortestEdge`` on the 8-bit image with PIL, ``nn.Unfold`` / ``nn.Fold`` windows, the global view,
the sigmoid after upsampling each output to its window, ``sem_seg_postprocess``), written from the
official code's operations, not from vocabseg's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vocabseg.segmenter
from vocabseg import Segmenter
from vocabseg.errors import SettingsError
from vocabseg.inference.config import InferenceConfig
from vocabseg.inference.postprocess import NAMES_PER_STEP
from vocabseg.inference.published import CATSEG_EVAL
from vocabseg.inference.sliding import rescaled_size
from vocabseg.methods.base import SegmentationMethod
from vocabseg.text.vocabulary import Vocabulary


class Decoder96(SegmentationMethod):
    """A stand-in for CAT-Seg's decoder: logits at a quarter of the window (96 x 96 for 384), a fixed
    function of the pixels and the text; ``logits`` upsamples them to the window, as the method must."""

    method_name = "sclip"  # any registered spec: the test passes every setting itself

    def __init__(self, dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("mix", torch.randn(3, 8, generator=g))
        self.register_buffer("proj", torch.randn(8, dim, generator=g))

    def low(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(windows.float(), 4)
        x = torch.tanh(torch.einsum("bchw,cd->bdhw", x, self.mix))
        return torch.einsum("bdhw,de,ke->bkhw", x, self.proj, text)

    def logits(self, windows, text, *, pad_multiple=0, surgery=False):
        return F.interpolate(self.low(windows, text), size=windows.shape[-2:], mode="bilinear", align_corners=False)


def detectron2_output_shape(h: int, w: int, short_edge_length: int, max_size: int) -> tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape`` (detectron2 0.6)."""
    size = short_edge_length * 1.0
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def official(image: np.ndarray, method: Decoder96, text: torch.Tensor, mean, std) -> torch.Tensor:
    """(K, H, W) probabilities of the official evaluation: the dataset mapper's resize, then
    ``inference_sliding_window(kernel=384, overlap=0.333, out_res=[640, 640])`` and ``sem_seg_postprocess``."""
    height, width = image.shape[:2]
    newh, neww = detectron2_output_shape(height, width, 640, 2560)
    resized = np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))  # ResizeTransform
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()  # the "image" of the batched input

    kernel, overlap, out_res = 384, 0.333, [640, 640]
    stride = int(kernel * (1 - overlap))
    unfold = nn.Unfold(kernel_size=kernel, stride=stride)
    fold = nn.Fold(out_res, kernel_size=kernel, stride=stride)
    squashed = F.interpolate(x[None], size=out_res, mode="bilinear", align_corners=False).squeeze()
    crops = unfold(squashed)  # (C*k*k, L)
    crops = crops.T.reshape(crops.shape[1], 3, kernel, kernel)  # "(C H W) L -> L C H W"
    global_image = F.interpolate(x[None], size=(kernel, kernel), mode="bilinear", align_corners=False)
    batch = torch.cat((crops, global_image), dim=0)
    clip_images = (batch - torch.tensor(mean).view(3, 1, 1) * 255) / (torch.tensor(std).view(3, 1, 1) * 255)

    outputs = method.low(clip_images, text)
    outputs = F.interpolate(outputs, size=kernel, mode="bilinear", align_corners=False)
    outputs = outputs.sigmoid()
    global_output = F.interpolate(outputs[-1:], size=out_res, mode="bilinear", align_corners=False)
    outputs = outputs[:-1]
    outputs = fold(outputs.flatten(1).T) / fold(unfold(torch.ones([1] + out_res)))
    outputs = (outputs + global_output) / 2.0
    result = outputs[0][:, : out_res[0], : out_res[1]]  # sem_seg_postprocess: crop, then resize
    return F.interpolate(result[None], size=(height, width), mode="bilinear", align_corners=False)[0]


CLASSES = ["cat; kitten", "sofa", "road; street; lane", "sky", "tree; palm"]
FIRST = ["cat", "sofa", "road", "sky", "tree"]


@pytest.fixture(scope="module")
def protocol(tiny_clip):
    method = Decoder96(tiny_clip.text_projection.shape[1])
    seg = Segmenter(method=method, model=tiny_clip, text_cache_dir=None, templates=["a photo of a {}."], **CATSEG_EVAL)
    return seg, method


def photo(size: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth colour regions plus noise: windows and the global view see different things."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(5, 7, 3)).astype(np.float32)
    smooth = F.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=size, mode="bilinear")[0]
    noisy = smooth.permute(1, 2, 0).numpy() + rng.normal(0, 20, size=(*size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


# sizes: upscaled landscape / portrait (the benchmarks' usual case), shrunk (PIL antialiases), and a long
# side capped by max_size 2560
@pytest.mark.parametrize("size", [(120, 170), (150, 97), (900, 700), (40, 400)])
def test_the_settings_reproduce_the_official_sliding_window(protocol, size):
    seg, method = protocol
    image = photo(size, seed=sum(size))
    assert rescaled_size(*size, 640, 2560) == detectron2_output_shape(*size, 640, 2560)
    text = seg.text_encoder.encode(FIRST)  # CAT-Seg prompts each class by its first name
    want = official(image, method, text, seg.clip.mean, seg.clip.std)
    assert float(want.min()) > 0.01 and float(want.max()) < 0.99  # sigmoids in their sensitive range

    res = seg.segment(image, CLASSES)
    assert res.synonyms == [[n] for n in FIRST]
    torch.testing.assert_close(torch.from_numpy(res.probs), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res.labels, want.argmax(0).numpy())
    assert len(np.unique(res.labels)) >= 3

    lean = seg.segment(image, CLASSES, return_probs=False)  # what evaluation runs
    np.testing.assert_array_equal(lean.labels, res.labels)
    np.testing.assert_allclose(lean.scores, want.max(0).values.numpy(), rtol=0, atol=1e-6)


def test_each_step_matters(protocol):
    """Dropping any one ingredient moves the probabilities well beyond the parity tolerance."""
    seg, method = protocol
    image = photo((150, 97), seed=3)
    text = seg.text_encoder.encode(FIRST)
    want = official(image, method, text, seg.clip.mean, seg.clip.std)
    for change in (
        {"resize_filter": "bilinear"},
        {"square_size": 0},
        {"global_weight": 0.0},
        {"average": "logits"},
        {"stride": 128},
    ):
        got = torch.from_numpy(seg.segment(image, CLASSES, **change).probs)
        assert (got - want).abs().max() > 1e-3, change
    everything = seg.segment(image, CLASSES, synonyms="all")  # all synonyms, max-merged
    assert everything.synonyms == [c.split("; ") for c in CLASSES]


def test_pil_resize_is_detectron2s_not_a_float_bilinear(protocol):
    """The 8-bit PIL resize differs from a float bilinear one by rounding when enlarging and by its
    antialiasing when shrinking; the pipeline feeds the model exactly the PIL image."""
    seg, _ = protocol
    seen = []
    real = seg._normalize

    def spy(array):
        seen.append(np.array(array))
        return real(array)

    seg._normalize = spy
    try:
        image = photo((900, 700), seed=1)
        seg.segment(image, CLASSES)
    finally:
        del seg._normalize
    want = np.asarray(Image.fromarray(image).resize((640, 823), Image.BILINEAR))
    assert len(seen) == 1 and seen[0].shape == (823, 640, 3)
    np.testing.assert_array_equal(seen[0], want)


def test_shared_first_names_tie_to_the_first_class(protocol):
    """A benchmark list may give two classes one first name (ADE-847: three ``bag`` classes): both get
    the same probabilities, and argmax keeps the first, as the official evaluation does."""
    seg, _ = protocol
    vocab = Vocabulary.from_list(["bag; handbag", "sofa", "bag; traveling bag", "sky"], shared_names=True)
    image = photo((120, 170), seed=5)
    res = seg.segment(image, vocab)
    assert res.synonyms == [["bag"], ["sofa"], ["bag"], ["sky"]]
    np.testing.assert_array_equal(res.probs[0], res.probs[2])
    assert not np.any(res.labels == 2) and np.any(res.labels == 0)
    lean = seg.segment(image, vocab, return_probs=False)
    np.testing.assert_array_equal(lean.labels, res.labels)


def test_a_background_keeps_its_names_and_competes_under_sigmoid(protocol):
    """PAS-20b: the background class is named by other classes' names; with ``synonyms="first"`` it
    keeps them all and, without a probability threshold, they compete with the classes."""
    seg, method = protocol
    vocab = Vocabulary.from_list(["cat", "sofa"]).with_background(["sky", "tree", "road"])
    image = photo((120, 170), seed=7)
    res = seg.segment(image, vocab)
    assert res.synonyms[2] == ["sky", "tree", "road"]
    text = seg.text_encoder.encode(["cat", "sofa", "sky", "tree", "road"])
    want = official(image, method, text, seg.clip.mean, seg.clip.std)
    merged = torch.stack([want[0], want[1], want[2:].amax(0)])
    np.testing.assert_array_equal(res.labels, merged.argmax(0).numpy())
    assert np.any(res.labels == 2)
    # with a threshold, the background is the threshold (Beyond-Labels) and its names are not scored
    assert seg.segment(image, vocab, prob_threshold=0.5).synonyms[2] == []


def test_many_names_stream_a_few_at_a_time(tiny_clip, monkeypatch):
    """With ``return_probs=False`` no (K, H, W) map at the input's size is made for all names at once:
    the averaged probabilities (at the 640 x 640 working size here, scaled down) are brought to full
    size ``NAMES_PER_STEP`` names at a time, as for any method."""
    method = Decoder96(tiny_clip.text_projection.shape[1])
    small = {**CATSEG_EVAL, "short_side": 64, "max_long_side": 256, "square_size": 64, "crop": 48, "stride": 16}
    seg = Segmenter(method=method, model=tiny_clip, text_cache_dir=None, templates=["{}"], **small)
    names = ", ".join(f"thing {i}" for i in range(3 * NAMES_PER_STEP + 5))
    asked = []
    real = vocabseg.segmenter._full_size_logits

    def spy(logits, size, pamr, guide, names):
        asked.append(len(logits) if names is None else len(names))
        return real(logits, size, pamr, guide, names)

    monkeypatch.setattr(vocabseg.segmenter, "_full_size_logits", spy)
    image = photo((90, 130), seed=2)
    lean = seg.segment(image, names, return_probs=False)
    assert asked and max(asked) <= NAMES_PER_STEP and sum(asked) == 3 * NAMES_PER_STEP + 5
    asked.clear()
    full = seg.segment(image, names)
    assert asked == [3 * NAMES_PER_STEP + 5]  # only the full path materialises every name
    np.testing.assert_array_equal(lean.labels, full.labels)


def test_settings_are_checked(protocol):
    with pytest.raises(SettingsError, match=r"global_weight=0.5 \(--global-weight\) needs windows"):
        InferenceConfig(**{**CATSEG_EVAL, "crop": 0})
    for bad, flag in (("resize_filter", "--resize-filter"), ("average", "--average"), ("synonyms", "--synonyms")):
        with pytest.raises(SettingsError, match=rf"{bad}='x' \({flag}\) must be one of"):
            InferenceConfig(**{bad: "x"})
    with pytest.raises(SettingsError, match=r"global_weight=1.5 \(--global-weight\) must be a number from 0"):
        InferenceConfig(global_weight=1.5)
    with pytest.raises(SettingsError, match=r"square_size=-1 \(--square-size\)"):
        InferenceConfig(square_size=-1)
