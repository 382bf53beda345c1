"""``return_probs=False``: the labels and per-class scores of the full path, from a few names at a time.

The reference is the full path itself: ``decide_labels(class_probabilities(...))`` on every name's
logits at once (unit level), and ``Segmenter.segment(..., return_probs=True)`` (end to end).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocabseg import Segmenter
from vocabseg.data import build_dataset
from vocabseg.data.synthetic import write_synthetic
from vocabseg.eval.runner import evaluate
from vocabseg.inference.postprocess import NAMES_PER_STEP, class_probabilities, decide_labels, stream_labels
from vocabseg.methods.base import SegmentationMethod
from vocabseg.result import SegmentationResult

SMALL = dict(short_side=64, crop=32, stride=16)


def reference(logits, name_to_class, num_classes, scale, score, background, prob_threshold, area_threshold):
    probs = class_probabilities(logits, scale, name_to_class, num_classes, score)
    labels = decide_labels(probs, background, prob_threshold, area_threshold)
    return labels, probs.gather(0, labels[None])[0]


def streamed(logits, name_to_class, num_classes, scale, score, background, prob_threshold, area_threshold, **kw):
    asked: list[list[int]] = []

    def logits_of(names: list[int]) -> torch.Tensor:
        asked.append(list(names))
        return logits[names]

    labels, scores = stream_labels(
        logits_of, name_to_class, num_classes, scale, score, background, prob_threshold, area_threshold, **kw
    )
    return labels, scores, asked


def random_vocabulary(rng: np.random.Generator, num_classes: int, background: str) -> tuple[list[int], int | None]:
    """name -> class with 1 to 3 synonyms per class, names of a class not adjacent (shuffled);
    ``background``: "none", "named" (the last class has names) or "threshold" (the last has none)."""
    name_to_class = [c for c in range(num_classes) for _ in range(rng.integers(1, 4))]
    if background == "threshold":
        name_to_class = [c for c in name_to_class if c != num_classes - 1]
    rng.shuffle(name_to_class)
    return [int(c) for c in name_to_class], (None if background == "none" else num_classes - 1)


# -- stream_labels against the full path ---------------------------------------------------------------------
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("background", ["none", "named", "threshold"])
@pytest.mark.parametrize(("prob_threshold", "area_drops"), [(0.0, 0), (0.3, 0), (0.0, 2), (0.2, 3)])
@pytest.mark.parametrize("num_classes", [5, 40])
def test_labels_and_scores_equal_the_full_path(score, background, prob_threshold, area_drops, num_classes):
    """``area_drops``: the area threshold is set to drop that many of the classes that are best somewhere."""
    rng = np.random.default_rng(num_classes)
    name_to_class, bg = random_vocabulary(rng, num_classes, background)
    # smooth random maps, so that classes own regions of different sizes (the area threshold bites)
    logits = torch.nn.functional.interpolate(
        torch.from_numpy(rng.normal(0, 0.1, size=(1, len(name_to_class), 6, 7))).float(), size=(37, 45), mode="bicubic"
    )[0]
    args = (logits, name_to_class, num_classes, 40.0 if score == "softmax" else 20.0, score, bg)
    if prob_threshold > 0 and bg is None:  # refused alike: no class to send low-confidence pixels to
        for path in (reference, streamed):
            with pytest.raises(ValueError, match="prob_threshold needs a background class"):
                path(*args, prob_threshold, 0.0)
        return
    area_threshold = 0.0
    if area_drops:
        areas = torch.bincount(reference(*args, 0.0, 0.0)[0].flatten(), minlength=num_classes).float()
        if bg is not None:
            areas[bg] = 0
        shares = sorted((areas[areas > 0] / areas.sum()).tolist())
        area_threshold = (shares[area_drops - 1] + shares[area_drops]) / 2
    want_labels, want_scores = reference(*args, prob_threshold, area_threshold)
    labels, scores, asked = streamed(*args, prob_threshold, area_threshold, names_per_step=8)

    torch.testing.assert_close(labels, want_labels, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert len(set(want_labels.flatten().tolist())) >= 2  # the pixels are not all one class
    if area_drops:  # the threshold dropped classes that were best somewhere
        unthresholded = reference(*args, 0.0, 0.0)[0]
        assert len(set(want_labels.flatten().tolist())) < len(set(unthresholded.flatten().tolist()))
    if num_classes == 40:
        assert len(asked) >= 5  # many steps, each of whole classes of at most 8 names (3 synonyms at most)
        assert all(len(names) <= 8 for names in asked)
        for names in asked:  # a class's synonyms are never split between steps
            classes = {name_to_class[n] for n in names}
            assert sorted(names) == sorted(n for n, c in enumerate(name_to_class) if c in classes)


def test_area_threshold_falls_through_every_dropped_class():
    """Where the best and the second-best classes are both dropped, the third one wins, as when their
    probabilities are zeroed; the second pass asks only for the names of the classes kept."""
    logits = torch.zeros(4, 20, 20)  # names 0, 1 -> class 0 ("wall"); 2 -> 1 ("dot"); 3 -> 2 ("spot")
    logits[0] = 0.5
    logits[1, :, 10:] = 0.6
    logits[2, 2:5, 2:5] = 1.0  # 9 pixels where "dot" is best and "spot" second
    logits[3, 2:5, 2:5] = 0.9
    logits[3, 15:17, 15:17] = 1.0  # 4 pixels of "spot"
    name_to_class, args = [0, 0, 1, 2], (3, 40.0, "softmax", None, 0.0, 0.05)
    want, _ = reference(logits, name_to_class, *args)
    labels, scores, asked = streamed(logits, name_to_class, *args, names_per_step=1)
    assert torch.equal(labels, want)
    assert torch.all(labels == 0)  # both small classes dropped, so "wall" everywhere
    assert asked == [[0, 1], [2], [3], [0, 1]]  # pass 2: only the kept class's names
    torch.testing.assert_close(scores[3, 3], (40 * logits[:, 3, 3]).softmax(0)[:2].max())


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_an_area_threshold_that_drops_every_class(score):
    """Every probability zeroed: argmax says class 0, scored with its own (unzeroed) probability."""
    logits = torch.zeros(3, 4, 6)
    logits[0, :, :2], logits[1, :, 2:4], logits[2, :, 4:] = 0.3, 0.2, 0.1
    args = (logits, [0, 1, 2], 3, 10.0, score, None, 0.0, 0.5)
    want_labels, want_scores = reference(*args)
    labels, scores, _ = streamed(*args, names_per_step=2)
    assert torch.equal(labels, want_labels) and torch.all(labels == 0)
    torch.testing.assert_close(scores, want_scores)


def test_saturated_sigmoid_ties_go_to_the_first_class():
    """sigmoid(20) and sigmoid(30) are both 1.0 in float32: the first class wins, as with argmax."""
    logits = torch.stack([torch.full((2, 2), 2.0), torch.full((2, 2), 3.0)])
    labels, scores, _ = streamed(logits, [0, 1], 2, 10.0, "sigmoid", None, 0.0, 0.0, names_per_step=1)
    assert torch.equal(labels, reference(logits, [0, 1], 2, 10.0, "sigmoid", None, 0.0, 0.0)[0])
    assert torch.all(labels == 0) and torch.all(scores == 1.0)


def test_exact_ties_go_to_the_first_class_as_with_argmax():
    logits = torch.zeros(3, 4, 4)
    labels, _, _ = streamed(logits, [0, 1, 2], 3, 40.0, "softmax", None, 0.0, 0.0, names_per_step=1)
    assert torch.equal(labels, reference(logits, [0, 1, 2], 3, 40.0, "softmax", None, 0.0, 0.0)[0])
    assert torch.all(labels == 0)


def test_a_vocabulary_larger_than_the_default_step():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(0, 0.05, size=(3 * NAMES_PER_STEP, 9, 11))).float()
    name_to_class = list(range(3 * NAMES_PER_STEP))
    want, want_scores = reference(logits, name_to_class, len(name_to_class), 40.0, "softmax", None, 0.0, 0.0)
    labels, scores, asked = streamed(logits, name_to_class, len(name_to_class), 40.0, "softmax", None, 0.0, 0.0)
    assert [len(names) for names in asked] == [NAMES_PER_STEP] * 3
    assert torch.equal(labels, want)
    torch.testing.assert_close(scores, want_scores)


# -- the Segmenter ----------------------------------------------------------------------------------------------
MANY = ", ".join(f"thing {i}; object {i}" if i % 3 == 0 else f"thing {i}" for i in range(45))  # 60 names


@pytest.fixture(scope="module")
def sclip(tiny_clip):
    return Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["a photo of a {}."], **SMALL)


def assert_same_outputs(full, lean):
    assert full.probs is not None and lean.probs is None and lean.scores.shape == full.labels.shape
    np.testing.assert_array_equal(lean.labels, full.labels)
    np.testing.assert_allclose(lean.label_scores, full.label_scores, rtol=1e-5, atol=1e-6)
    want, got = full.to_json(), lean.to_json()
    for a, b in zip(want.pop("classes"), got.pop("classes")):
        assert b == {**a, "mean_score": pytest.approx(a["mean_score"], rel=1e-5, abs=1e-6)}
    assert got == want


FEW = "red, green; lime, blue"
CASES = {
    "softmax, synonyms": (FEW, {}),
    "sigmoid": (FEW, {"score": "sigmoid", "logit_scale": 10}),
    "named background, probability threshold": (FEW, {"background": "sky; wall", "prob_threshold": 0.4}),
    "threshold-only background": (FEW, {"prob_threshold": 0.5}),
    "sigmoid, background threshold": ("red, green", {"score": "sigmoid", "logit_scale": 10, "prob_threshold": 0.5}),
    "area threshold": (MANY, {"area_threshold": 0.05}),
    "more names than one step": (MANY, {}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("size", [(50, 70), (33, 61), (97, 40)])
def test_segment_without_probs_equals_with(sclip, case, size):
    classes, options = CASES[case]
    image = np.random.default_rng(sum(size)).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    image[: size[0] // 2, :, 0] = 250  # some structure, so that several classes win somewhere
    full = sclip.segment(image, classes, **options)
    lean = sclip.segment(image, classes, return_probs=False, **options)
    assert len(np.unique(full.labels)) >= 2
    assert_same_outputs(full, lean)
    if options.get("prob_threshold"):
        assert np.any(full.labels == full.background_index)  # the threshold sent pixels to the background


def test_area_threshold_drops_classes_that_had_pixels(sclip, rgb_image):
    """The case the second pass exists for: classes that won pixels are dropped."""
    plain = sclip.segment(rgb_image, MANY)
    kept = sclip.segment(rgb_image, MANY, area_threshold=0.1, return_probs=False)
    assert set(np.unique(kept.labels)) < set(np.unique(plain.labels))
    assert_same_outputs(sclip.segment(rgb_image, MANY, area_threshold=0.1), kept)


def test_pamr_runs_per_step_with_the_same_labels(tiny_clip, rgb_image):
    naclip = Segmenter(method="naclip", model=tiny_clip, text_cache_dir=None, templates=["{}"], pamr_steps=3, **SMALL)
    for classes in (FEW, MANY):
        full = naclip.segment(rgb_image, classes)
        lean = naclip.segment(rgb_image, classes, return_probs=False)
        assert_same_outputs(full, lean)
    off = naclip.segment(rgb_image, MANY, pamr_steps=0, return_probs=False)
    assert not np.array_equal(off.labels, lean.labels)  # PAMR did run on the streamed path


class ManyNames(SegmentationMethod):
    """SCLIP's settings; logits = a fixed random map per name, so the test controls the vocabulary size."""

    method_name = "sclip"

    def logits(self, windows, text, *, pad_multiple=0, surgery=False):
        g = torch.Generator().manual_seed(text.shape[0])
        maps = torch.rand(1, text.shape[0], 4, 5, generator=g) * 0.2
        size = windows.shape[-2:]
        return torch.nn.functional.interpolate(maps, size=size, mode="bilinear").expand(windows.shape[0], -1, -1, -1)


def test_segment_many_and_a_batch_of_sizes(tiny_clip):
    seg = Segmenter(method=ManyNames(), model=tiny_clip, text_cache_dir=None, templates=["{}"], **SMALL)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(40, 60, 3), (75, 31, 3), (64, 64, 3)]]
    full = [o.result for o in seg.segment_many(images, MANY, images_per_batch=3)]
    lean = [o.result for o in seg.segment_many(images, MANY, images_per_batch=3, return_probs=False)]
    for a, b in zip(full, lean):
        assert len(np.unique(a.labels)) >= 4
        assert_same_outputs(a, b)


def test_evaluation_asks_for_labels_only(tmp_path, sclip, monkeypatch):
    ds = build_dataset("coco_object", write_synthetic("coco_object", tmp_path / "data", num_images=2, seed=0))
    asked = []
    real = sclip.predict_arrays

    def spy(arrays, *args, **kwargs):
        asked.append(kwargs.get("return_probs", True))
        results = real(arrays, *args, **kwargs)
        assert all(r.probs is None for r in results)
        return results

    monkeypatch.setattr(sclip, "predict_arrays", spy)
    evaluate(sclip, ds, protocol="unified", overrides=SMALL, progress=False)
    assert asked and not any(asked)


def test_a_result_needs_probs_or_scores():
    with pytest.raises(ValueError, match="probs.*scores"):
        SegmentationResult(labels=np.zeros((2, 2), np.int32), classes=["a"], probs=None, image=np.zeros((2, 2, 3)))
