"""The Segmenter with a trained method: weights from a checkpoint folder or file, every way they can be wrong,
``segment_many`` with unreadable images, and sigmoid scoring with a background."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny_clip
from safetensors import safe_open
from safetensors.torch import save_file

from vocabseg import Segmenter
from vocabseg.errors import CheckpointError, ImageLoadError, MethodOptionError, WeightsUnavailableError
from vocabseg.methods import create_method
from vocabseg.methods.weights import file_digest

HEAD = dict(width=32, depth=1, heads=2, decoder_stages=2, fourier_frequencies=8)
SMALL = dict(short_side=64, crop=32, stride=16)
CLASSES = "cat, dog; puppy, sofa"


def random_head_segmenter(tiny_clip_dir, **kwargs) -> Segmenter:
    with pytest.warns(UserWarning, match="RANDOM"):
        return Segmenter(
            method="beyond_labels",
            model=f"local-dir:{tiny_clip_dir}",
            weights=None,
            text_cache_dir=None,
            method_kwargs=HEAD,
            **{**SMALL, **kwargs},
        )


def write_checkpoint(seg: Segmenter, folder, manifest: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(seg.method.checkpoint_state(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(seg.method.checkpoint_config()))
    if manifest:
        files = {
            name: {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
            for name in ("config.json", "model.safetensors")
        }
        (folder / "manifest.json").write_text(json.dumps({"files": files}))
    return folder


@pytest.fixture(scope="module")
def trial(tiny_clip_dir):
    """A random-head segmenter whose head is then perturbed, so loading it cannot pass by chance."""
    seg = random_head_segmenter(tiny_clip_dir)
    with torch.no_grad():
        for i, p in enumerate(seg.method.head.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return seg


@pytest.fixture(scope="module")
def checkpoint(trial, tmp_path_factory):
    return write_checkpoint(trial, tmp_path_factory.mktemp("ckpt") / "checkpoint-last")


def load(tiny_clip_dir, weights, **kwargs) -> Segmenter:
    return Segmenter(
        method="beyond_labels",
        model=f"local-dir:{tiny_clip_dir}",
        weights=weights,
        text_cache_dir=None,
        **SMALL,
        **kwargs,
    )


# -- loading -------------------------------------------------------------------------------------------------
def test_config_names_the_method_options_and_base_clip(trial, checkpoint, tiny_clip_dir):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["method"] == "beyond_labels"
    assert {k: config["options"][k] for k in HEAD} == HEAD
    assert config["clip"]["model"] == f"local-dir:{tiny_clip_dir}"  # the whole id, not its first path part
    assert config["stores_clip"] is False
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {f"head.{k}" for k in trial.method.head.state_dict()}  # a head-only checkpoint


@pytest.mark.parametrize("which", ["folder", "file", "folder_without_manifest"])
def test_weights_reproduce_the_trial(trial, checkpoint, tiny_clip_dir, rgb_image, which, tmp_path):
    want = trial.segment(rgb_image, CLASSES)
    if which == "folder":
        weights = checkpoint
    elif which == "file":
        weights = checkpoint / "model.safetensors"
    else:
        weights = write_checkpoint(trial, tmp_path / "ckpt", manifest=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # real weights: no RANDOM warning
        seg = load(tiny_clip_dir, str(weights))
    got = seg.segment(rgb_image, CLASSES)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.info["weights"] == str(weights) and want.info["weights"] == "random (weights=None)"
    # the head is not a fresh random one
    other = random_head_segmenter(tiny_clip_dir).segment(rgb_image, CLASSES)
    assert np.abs(other.probs - want.probs).max() > 1e-3


def test_the_base_clip_comes_from_the_checkpoint(trial, checkpoint, rgb_image):
    """``model`` omitted: the CLIP the checkpoint names is loaded (here the local-dir tiny model)."""
    seg = Segmenter(method="beyond_labels", weights=checkpoint, text_cache_dir=None, **SMALL)
    np.testing.assert_allclose(
        seg.segment(rgb_image, CLASSES).probs, trial.segment(rgb_image, CLASSES).probs, atol=1e-6
    )


def test_a_clip_module_with_a_head_only_checkpoint(trial, checkpoint, rgb_image):
    seg = Segmenter(method="beyond_labels", model=make_tiny_clip(), weights=checkpoint, text_cache_dir=None, **SMALL)
    np.testing.assert_allclose(
        seg.segment(rgb_image, CLASSES).probs, trial.segment(rgb_image, CLASSES).probs, atol=1e-6
    )


def test_a_built_method_module(trial, rgb_image):
    clip = make_tiny_clip()
    method = create_method("beyond_labels", clip, **HEAD)
    method.load_checkpoint_state(trial.method.checkpoint_state())
    seg = Segmenter(method=method, model=clip, text_cache_dir=None, **SMALL)
    np.testing.assert_allclose(
        seg.segment(rgb_image, CLASSES).probs, trial.segment(rgb_image, CLASSES).probs, atol=1e-6
    )
    with pytest.raises(MethodOptionError, match="CLIP model object"):
        Segmenter(method=method, model="ViT-B-16", text_cache_dir=None)


# -- errors --------------------------------------------------------------------------------------------------
def test_weights_omitted_says_how_to_pass_them(tiny_clip_dir):
    with pytest.raises(MethodOptionError, match="trained method: pass its weights") as info:
        Segmenter(method="beyond_labels", model=f"local-dir:{tiny_clip_dir}", text_cache_dir=None)
    text = str(info.value)
    assert "weights=PATH" in text and "--weights" in text and "weights=None" in text
    assert "vocabseg train --recipe beyond_labels_pascal5i" in text  # where the weights come from


def test_a_folder_without_config_json(checkpoint, tiny_clip_dir, tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"not a vocabseg checkpoint: config\.json missing.*model\.safetensors"):
        load(tiny_clip_dir, folder)


def test_a_missing_folder(tiny_clip_dir, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load(tiny_clip_dir, tmp_path / "nowhere")


def test_a_truncated_model_file(checkpoint, tiny_clip_dir, tmp_path):
    folder = tmp_path / "torn"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoint / "config.json").read_text())
    data = (checkpoint / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load(tiny_clip_dir, folder)


@pytest.mark.parametrize("wrong", ["size", "sha256", "missing_file", "unreadable"])
def test_a_manifest_that_does_not_match(checkpoint, tiny_clip_dir, tmp_path, wrong):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "manifest.json"):
        (folder / name).write_bytes((checkpoint / name).read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    if wrong == "size":
        manifest["files"]["model.safetensors"]["size"] += 1
        message = r"model\.safetensors has \d+ bytes, expected \d+"
    elif wrong == "sha256":
        manifest["files"]["model.safetensors"]["sha256"] = "0" * 64
        message = "sha256 differs"
    elif wrong == "missing_file":
        manifest["files"]["extra.bin"] = {"size": 3}
        message = r"extra\.bin is missing \(listed in manifest\.json\)"
    else:
        manifest = None
        message = "manifest.json is unreadable"
    (folder / "manifest.json").write_text(json.dumps(manifest) if manifest is not None else "{not json")
    with pytest.raises(CheckpointError, match=message):
        load(tiny_clip_dir, folder)


def test_a_config_that_is_not_a_checkpoint_config(checkpoint, tiny_clip_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    (folder / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load(tiny_clip_dir, folder)
    (folder / "config.json").write_text(json.dumps({"options": {}}))
    with pytest.raises(CheckpointError, match="does not name the method"):
        load(tiny_clip_dir, folder)


def test_weights_of_another_method(checkpoint, tiny_clip_dir, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "method": "other"}))
    with pytest.raises(CheckpointError, match="for method 'other', not 'beyond_labels'; use --method other"):
        load(tiny_clip_dir, folder)


def test_weights_of_another_head_size(trial, tiny_clip_dir, tmp_path):
    """config.json's options rebuild the head; an explicit method_kwargs that contradicts the tensors fails."""
    folder = write_checkpoint(trial, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load(tiny_clip_dir, folder, method_kwargs={"width": 64})


def test_training_free_methods_take_no_weights_and_no_surgery_for_trained(tiny_clip, tiny_clip_dir):
    with pytest.raises(MethodOptionError, match="'sclip' is training-free and takes no weights"):
        Segmenter(method="sclip", model=tiny_clip, weights="x", text_cache_dir=None)
    with pytest.raises(MethodOptionError, match="surgery=True applies to training-free methods"):
        Segmenter(
            method="beyond_labels", model=f"local-dir:{tiny_clip_dir}", weights=None, surgery=True, text_cache_dir=None
        )


# -- segment_many --------------------------------------------------------------------------------------------
def test_segment_many_skips_unreadable_images(trial, rgb_image):
    other = np.ascontiguousarray(rgb_image[:40, 10:])
    sources = [rgb_image, b"not an image", other]
    outcomes = list(trial.segment_many(sources, CLASSES, on_error="skip", images_per_batch=2))
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, ImageLoadError) and outcomes[1].result is None
    assert outcomes[1].source == b"not an image"
    for outcome, image in ((outcomes[0], rgb_image), (outcomes[2], other)):
        alone = trial.segment(image, CLASSES)
        np.testing.assert_allclose(outcome.result.probs, alone.probs, atol=1e-6)
        np.testing.assert_array_equal(outcome.result.labels, alone.labels)
    with pytest.raises(ImageLoadError):
        list(trial.segment_many(sources, CLASSES, on_error="raise"))
    with pytest.raises(ValueError, match=r"images_per_batch \(--images-per-batch\) must be at least 1"):
        list(trial.segment_many(sources, CLASSES, images_per_batch=0))
    with pytest.raises(ValueError, match="on_error"):
        list(trial.segment_many(sources, CLASSES, on_error="ignore"))


def test_segment_many_max_pixels(trial, rgb_image):
    outcomes = list(trial.segment_many([rgb_image], CLASSES, on_error="skip", max_pixels=100))
    assert not outcomes[0].ok and "100" in str(outcomes[0].error)
    assert list(trial.segment_many([rgb_image], CLASSES, max_pixels=None))[0].ok


# -- sigmoid scoring -----------------------------------------------------------------------------------------
def test_sigmoid_scores_and_the_background(trial, rgb_image):
    assert trial.config.score == "sigmoid" and trial.config.logit_scale == pytest.approx(12.5)
    res = trial.segment(rgb_image, CLASSES, background="sky; wall", prob_threshold=0.5)
    assert res.classes == ["cat", "dog", "sofa", "background"] and res.background_index == 3
    assert res.synonyms[3] == []  # background names are not scored under sigmoid: the threshold decides
    assert np.all(res.probs[3] == 0)
    best = res.probs[:3].max(0)
    low = best < 0.5
    assert low.any() and (~low).any()  # both sides of the 0.5 rule occur
    np.testing.assert_array_equal(res.labels[low], 3)
    np.testing.assert_array_equal(res.labels[~low], res.probs[:3].argmax(0)[~low])
    # independent per-class sigmoids: class probabilities are not a distribution, and they equal the
    # scores without a background
    plain = trial.segment(rgb_image, CLASSES)
    np.testing.assert_allclose(res.probs[:3], plain.probs, atol=1e-6)
    assert np.abs(plain.probs.sum(0) - 1).max() > 0.05
    # the same background names do compete under softmax scoring
    soft = trial.segment(rgb_image, CLASSES, background="sky; wall", prob_threshold=0.5, score="softmax")
    assert soft.synonyms[3] == ["sky", "wall"] and soft.probs[3].max() > 0


def test_hub_weights_offline_fail_with_a_way_out():
    from vocabseg.methods.weights import read_trained_weights

    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set") as info:
        read_trained_weights("hf-hub:nobody/no-such-checkpoint")
    assert "weights='/path/to/folder'" in str(info.value)
