"""LPOSS / LPOSS+ through the Segmenter and the command line: the result equals the refinement
composed by hand from the method's window logits, on any method, and the settings reach result.json
and the evaluation run identity."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_vfm
from PIL import Image

from vocabseg import Segmenter
from vocabseg.cli.main import main
from vocabseg.data import build_dataset
from vocabseg.data.synthetic import write_synthetic
from vocabseg.errors import SettingsError, UnknownNameError, WeightsUnavailableError
from vocabseg.eval.records import run_id, run_identity
from vocabseg.inference.sliding import window_boxes
from vocabseg.models.vfm import IMAGENET_MEAN, IMAGENET_STD
from vocabseg.refine import LPOSS
from vocabseg.refine.lposs import last_block_values

SMALL = dict(short_side=64, crop=32, stride=16)
CLASSES = "red thing, blue thing; azure thing, green thing"
NAMES = ["red thing", "blue thing", "azure thing", "green thing"]
#: the image (50 x 70) resized to short side 64
RESIZED = (64, 90)


@pytest.fixture(autouse=True)
def _keep_the_global_rng():
    """Random weights built here (tiny VFMs seed torch) must not change what later tests draw."""
    with torch.random.fork_rng(devices=[]):
        yield


def refined_segmenter(tiny_clip, refine: str, method: str = "sclip", **kwargs) -> Segmenter:
    return Segmenter(
        method=method,
        model=tiny_clip,
        text_cache_dir=None,
        refine=refine,
        refine_vfm=make_tiny_vfm(),
        **{**SMALL, **kwargs},
    )


def literal_probs(seg: Segmenter, image: np.ndarray, pixel: bool, crop: int = SMALL["crop"]) -> torch.Tensor:
    """The pipeline written out: CLIP-normalise and resize, each window's logits from the method and
    last-block values from the VFM (ImageNet-normalised; a window resized to a multiple of the VFM's
    8-pixel patch), ``refine_windows``, upsample, softmax, merge synonyms."""
    clip = seg.clip.model
    mean = torch.tensor(clip.visual.image_mean).view(3, 1, 1)
    std = torch.tensor(clip.visual.image_std).view(3, 1, 1)
    rgb = F.interpolate(torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255, size=RESIZED, mode="bilinear")[0]
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    x = F.interpolate(x[None], size=RESIZED, mode="bilinear", align_corners=False)[0]
    pixels = x * std + mean  # the refiner sees the resized image, un-normalised
    torch.testing.assert_close(pixels, rgb, atol=1e-5, rtol=0)
    dino = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    text = seg.text_encoder.encode(NAMES)
    boxes = window_boxes(*RESIZED, crop, SMALL["stride"])
    scores, feats = [], []
    with torch.no_grad():
        for y1, y2, x1, x2 in boxes:
            scores.append(seg.method.logits(x[None, :, y1:y2, x1:x2], text)[0])
            window = dino[None, :, y1:y2, x1:x2]
            if (y2 - y1) % 8 or (x2 - x1) % 8:
                size = (int((y2 - y1) / 8 + 0.5) * 8, int((x2 - x1) / 8 + 0.5) * 8)
                window = F.interpolate(window, size=size, mode="bilinear", align_corners=False)
            feats.append(last_block_values(seg.refine_vfm, window)[0])
    refined = LPOSS(pixel=pixel).refine_windows(pixels, boxes, scores, feats)
    full = F.interpolate(refined[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    p = (seg.config.logit_scale * full).softmax(0)
    return torch.stack([p[0], torch.maximum(p[1], p[2]), p[3]])


@pytest.mark.parametrize("refine", ["lposs", "lposs+"])
def test_segmenter_equals_the_refinement_composed_by_hand(tiny_clip, rgb_image, refine):
    seg = refined_segmenter(tiny_clip, refine)
    assert len(window_boxes(*RESIZED, SMALL["crop"], SMALL["stride"])) == 15  # 3 rows x 5 columns, overlapping
    res = seg.segment(rgb_image, CLASSES)
    want = literal_probs(seg, rgb_image, pixel=refine == "lposs+")
    np.testing.assert_allclose(res.probs, want.numpy(), atol=1e-5)
    np.testing.assert_array_equal(res.labels, want.argmax(0).numpy())
    plain = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, **SMALL).segment(rgb_image, CLASSES)
    assert np.abs(plain.probs - res.probs).max() > 1e-2  # the refinement changed the scores


@pytest.mark.parametrize("refine", ["lposs", "lposs+"])
def test_labels_only_path_gives_the_same_labels_and_scores(tiny_clip, rgb_image, refine):
    seg = refined_segmenter(tiny_clip, refine)
    full = seg.segment(rgb_image, CLASSES)
    lean = seg.segment(rgb_image, CLASSES, return_probs=False)
    assert lean.probs is None
    np.testing.assert_array_equal(lean.labels, full.labels)
    best = np.take_along_axis(full.probs, full.labels[None].astype(np.int64), 0)[0]
    np.testing.assert_allclose(lean.scores, best, atol=1e-5)


def test_images_in_one_batch_are_refined_each_on_its_own(tiny_clip, rgb_image):
    """Windows of several images run in shared batches; each image's graph holds only its windows."""
    seg = refined_segmenter(tiny_clip, "lposs", batch_size=3)
    other = np.ascontiguousarray(rgb_image[:40, :45])
    together = seg.segment([rgb_image, other], CLASSES)
    alone = [seg.segment(rgb_image, CLASSES), seg.segment(other, CLASSES)]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_whole_image_inference_is_one_window(tiny_clip, rgb_image):
    """crop=0: one window of 64 x 90, which the VFM (patch 8) sees resized to 64 x 88."""
    seg = refined_segmenter(tiny_clip, "lposs+", crop=0)
    res = seg.segment(rgb_image, CLASSES)
    want = literal_probs(seg, rgb_image, pixel=True, crop=0)
    np.testing.assert_allclose(res.probs, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("method", ["cliper", "beyond_labels"])
def test_other_methods_take_a_refinement(tiny_clip, rgb_image, method):
    """CLIPer's window output is log-probabilities and beyond_labels is a trained head: LPOSS
    propagates whatever scores a method gives, so both run and keep their shapes."""
    options = dict(weights=None) if method == "beyond_labels" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM.*")
        seg = refined_segmenter(tiny_clip, "lposs+", method=method, **options)
    res = seg.segment(rgb_image, CLASSES)
    assert res.labels.shape == (50, 70) and res.probs.shape == (3, 50, 70)
    assert np.isfinite(res.probs).all()
    assert res.info["refine"]["name"] == "lposs+"


def test_describe_records_the_refinement(tiny_clip):
    seg = refined_segmenter(tiny_clip, "lposs+", refine_options={"k": 50})
    refine = seg.describe()["refine"]
    assert refine["name"] == "lposs+" and refine["vfm"] == "custom"
    assert refine["options"]["k"] == 50 and refine["options"]["pixel"] is True and refine["options"]["alpha"] == 0.95
    assert "refine" not in Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None).describe()


def test_eval_run_identity_differs_with_refinement(tiny_clip, tmp_path):
    ds = build_dataset("voc21", write_synthetic("voc21", tmp_path / "data", num_images=1, seed=0))
    plain = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, **SMALL)
    ids = {}
    for refine in ("lposs", "lposs+"):
        seg = refined_segmenter(tiny_clip, refine)
        identity = run_identity(seg, ds, seg.config)
        assert identity["refine"]["name"] == refine and len(identity["refine"]["vfm_weights"]) > 0
        ids[refine] = run_id(identity)
    plain_identity = run_identity(plain, ds, plain.config)
    assert "refine" not in plain_identity  # runs without a refinement keep their identity (and records)
    assert len({run_id(plain_identity), *ids.values()}) == 3
    other_vfm = Segmenter(
        method="sclip", model=tiny_clip, text_cache_dir=None, refine="lposs", refine_vfm=make_tiny_vfm(seed=1), **SMALL
    )
    assert run_id(run_identity(other_vfm, ds, other_vfm.config)) != ids["lposs"]


def test_bad_refine_settings_are_refused_before_any_model_load():
    with pytest.raises(UnknownNameError, match=r"Unknown refiner 'lpos'\..*Available: lposs, lposs\+\."):
        Segmenter(method="sclip", model="no-such-model", refine="lpos")
    with pytest.raises(SettingsError, match=r"--refine-vfm.*add refine= \(--refine lposs\+\)"):
        Segmenter(method="sclip", model="no-such-model", refine_vfm="dino_vits16")
    with pytest.raises(SettingsError, match=r"refine_vfm='sam_vitb' \(--refine-vfm\) runs at one fixed size"):
        Segmenter(method="sclip", model="no-such-model", refine="lposs", refine_vfm="sam_vitb")
    with pytest.raises(UnknownNameError, match=r"Unknown VFM 'dino_vitb17'"):
        Segmenter(method="sclip", model="no-such-model", refine="lposs", refine_vfm="dino_vitb17")
    with pytest.raises(SettingsError, match=r"Refiner 'lposs' does not take kk; it takes k=400"):
        Segmenter(method="sclip", model="no-such-model", refine="lposs", refine_options={"kk": 3})


def test_unreachable_refine_vfm_weights_name_the_refine_option(tiny_clip, tmp_path):
    with pytest.raises(WeightsUnavailableError) as err:
        Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, refine="lposs", refine_vfm="dino_vits16")
    message = str(err.value)
    assert "VFM 'dino_vits16'" in message and "`--refine-vfm-pretrained /path/to/model.safetensors`" in message
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(
        WeightsUnavailableError, match=r"refine_vfm_pretrained=.* \(--refine-vfm-pretrained\): .*not found"
    ):
        Segmenter(
            method="sclip",
            model=tiny_clip,
            refine="lposs",
            refine_vfm="dino_vits16",
            refine_vfm_pretrained=str(missing),
        )


@pytest.fixture()
def cli_args(tiny_clip_dir):
    return ["--model", f"local-dir:{tiny_clip_dir}", "--pretrained", "none", "--method", "sclip",
            "--templates", "name", "--short-side", "64", "--crop", "32", "--stride", "16"]  # fmt: skip


def test_cli_refine_lposs_plus_end_to_end(tmp_path, rgb_image, cli_args, capsys):
    Image.fromarray(rgb_image).save(tmp_path / "x.png")
    out = tmp_path / "out"
    refine = ["--refine", "lposs+", "--refine-vfm", "dino_vits16", "--refine-vfm-pretrained", "none"]
    code = main(["segment", str(tmp_path / "x.png"), "-c", "cat, dog", "-o", str(out), *cli_args, *refine])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "x" / "result.json").read_text())
    assert data["refine"]["name"] == "lposs+" and data["refine"]["vfm"] == "dino_vits16"
    assert data["refine"]["vfm_pretrained"] is None and data["refine"]["options"]["pixel"] is True
    assert np.asarray(Image.open(out / "x" / "mask.png")).shape == (50, 70)
    assert sum(c["pixels"] for c in data["classes"]) == 50 * 70


def test_cli_unknown_refiner_exits_2_with_one_line(tmp_path, rgb_image, cli_args, capsys):
    Image.fromarray(rgb_image).save(tmp_path / "x.png")
    code = main(["segment", str(tmp_path / "x.png"), "-c", "cat", "-o", str(tmp_path / "o"), *cli_args,
                 "--refine", "lposs++"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "vocabseg: error: Unknown refiner 'lposs++'. Did you mean 'lposs+', 'lposs'? Available: lposs, lposs+."
    ]
