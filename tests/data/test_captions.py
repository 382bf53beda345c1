"""Image-caption training data: DINO's multi-crop, the CSV/TSV list and COCO Captions readers, the
TRAIN_DATA entries. (The WebDataset shards and their trainer seam: tests/train/test_streaming.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vocabseg.data import captions as cap
from vocabseg.data.captions import (
    CaptionDataset,
    MultiCrop,
    build_caption_list,
    build_coco_captions,
    collate_captions,
    multicrop_from_options,
)
from vocabseg.data.train import TrainTransforms
from vocabseg.errors import DatasetLayoutError, ImageLoadError, SettingsError
from vocabseg.models.clip import OPENAI_MEAN, OPENAI_STD
from vocabseg.train import DataConfig
from vocabseg.train.tasks import TRAIN_DATA

SMALL = MultiCrop(global_size=16, local_size=8, num_local=3)


def write_image(path: Path, rgb=(200, 30, 90), size=(20, 28), seed: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        pixels = np.full((*size, 3), rgb, dtype=np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def normalised(rgb) -> torch.Tensor:
    """A flat colour after CLIP normalisation, written out: (c / 255 - mean) / std per channel."""
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, OPENAI_MEAN, OPENAI_STD)])


# -- multi-crop ---------------------------------------------------------------------------------------------


def test_multicrop_shapes_defaults_and_normalisation():
    image = np.full((40, 50, 3), (10, 120, 250), dtype=np.uint8)
    g, local = MultiCrop()(image, seed=0)
    assert g.shape == (3, 224, 224) and local.shape == (6, 3, 96, 96)  # DINO / ViL-Seg: 1 x 224 + 6 x 96
    assert g.dtype == local.dtype == torch.float32
    expected = normalised((10, 120, 250)).view(3, 1, 1)
    torch.testing.assert_close(g, expected.expand_as(g), atol=1e-5, rtol=0)  # a flat image stays flat
    torch.testing.assert_close(local, expected.expand_as(local[0]).expand_as(local), atol=1e-5, rtol=0)
    assert MultiCrop(num_local=0)(image, seed=0)[1].shape == (0, 3, 96, 96)


def test_multicrop_is_a_function_of_the_seed_only():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = SMALL(image, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor advanced
    torch.manual_seed(999)
    b = SMALL(image, seed=5)
    c = SMALL(image, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[1][0], a[1][1])  # each local view draws its own crop


def test_full_image_view_is_dinos_pil_bicubic_resize_and_flips_half_the_time():
    # scale (1, 1) on a square image: every draw keeps the whole image (torchvision's fallback), so the
    # view is the image resized and maybe flipped; DINO resizes with PIL's bicubic filter in 8 bits
    x = np.linspace(0, 255, 48)
    image = np.stack([np.tile(x, (48, 1)), np.tile(x[::-1], (48, 1)).T, np.full((48, 48), 90.0)], -1).astype(np.uint8)
    crop = MultiCrop(global_size=16, global_scale=(1.0, 1.0), num_local=0)
    pil = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC)).astype(np.float64) / 255
    plain = torch.from_numpy((pil - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)).permute(2, 0, 1).float()
    flips = 0
    for seed in range(40):
        view = crop(image, seed)[0]
        if torch.allclose(view, plain.flip(-1), atol=1e-5):
            flips += 1
        else:
            torch.testing.assert_close(view, plain, atol=1e-5, rtol=0)
    assert 8 <= flips <= 32, flips
    no_flip = MultiCrop(global_size=16, global_scale=(1.0, 1.0), num_local=0, flip=False)
    assert all(torch.allclose(no_flip(image, s)[0], plain, atol=1e-5) for s in range(10))


def test_crop_boxes_cover_the_configured_area_fractions(monkeypatch):
    boxes = []
    real = cap.F.resized_crop

    def spy(pixels, top, left, height, width, size, **kw):
        boxes.append((size[0], height * width / (pixels.shape[-2] * pixels.shape[-1])))
        return real(pixels, top, left, height, width, size, **kw)

    monkeypatch.setattr(cap.F, "resized_crop", spy)
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    crop = MultiCrop(global_size=16, local_size=8, num_local=6)
    for seed in range(30):
        crop(image, seed)
    globals_, locals_ = [f for s, f in boxes if s == 16], [f for s, f in boxes if s == 8]
    assert len(globals_) == 30 and len(locals_) == 180
    assert all(0.4 - 0.01 <= f <= 1.0 for f in globals_) and max(globals_) > 0.8 and min(globals_) < 0.5
    assert all(0.05 - 0.01 <= f <= 0.4 + 0.01 for f in locals_) and max(locals_) > 0.3 and min(locals_) < 0.1


def test_multicrop_options_and_their_errors():
    crop = multicrop_from_options(
        {"local_crops": 4, "local_size": 64, "local_scale": [0.1, 0.3]}, global_size=112, global_scale=(0.5, 1.0)
    )
    assert (crop.global_size, crop.global_scale, crop.num_local, crop.local_size, crop.local_scale) == (
        112,
        (0.5, 1.0),
        4,
        64,
        (0.1, 0.3),
    )
    with pytest.raises(SettingsError, match="data.scale"):
        multicrop_from_options({}, global_size=224, global_scale=(0.5, 2.0))  # the segmentation default
    with pytest.raises(SettingsError, match="local_scale"):
        multicrop_from_options({"local_scale": 0.3}, global_size=224)
    with pytest.raises(SettingsError, match="local_crops"):
        multicrop_from_options({"local_crops": -1}, global_size=224)


def test_collate_gives_the_vilseg_batch():
    samples = [
        {"image": torch.randn(3, 16, 16), "local_crops": torch.randn(3, 3, 8, 8), "caption": f"c{i}"} for i in range(4)
    ]
    batch = collate_captions(samples)
    assert batch["image"].shape == (4, 3, 16, 16) and batch["local_crops"].shape == (4, 3, 3, 8, 8)
    assert batch["caption"] == ["c0", "c1", "c2", "c3"]
    assert torch.equal(batch["local_crops"][2], samples[2]["local_crops"])


# -- the caption list -----------------------------------------------------------------------------------------


def test_tsv_list_relative_paths_blank_lines_and_empty_captions(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg", (250, 0, 0))
    write_image(tmp_path / "imgs" / "b.png", seed=2)  # noise
    lst = tmp_path / "pairs.tsv"
    lst.write_text("imgs/a.jpg\ta red  thing\n\nimgs/b.png\t   \nimgs/b.png\tgreen\twith a tab\n", encoding="utf-8")
    ds = build_caption_list(lst, SMALL)
    assert [(p.name, c) for p, c in ds.entries] == [("a.jpg", ("a red thing",)), ("b.png", ("green with a tab",))]
    assert ds.notes == ["1 row(s) with an empty caption skipped"]
    sample = ds[(0, 11)]
    assert sample["caption"] == "a red thing"
    assert sample["image"].shape == (3, 16, 16) and sample["local_crops"].shape == (3, 3, 8, 8)
    torch.testing.assert_close(sample["image"][:, 0, 0], normalised((250, 0, 0)), atol=0.03, rtol=0)  # JPEG
    noisy = ds[(1, 11)]
    again = build_caption_list(lst, SMALL)[(1, 11)]  # another instance, the same seed: the same views
    assert torch.equal(again["image"], noisy["image"]) and torch.equal(again["local_crops"], noisy["local_crops"])
    assert not torch.equal(ds[(1, 12)]["local_crops"], noisy["local_crops"])
    assert ds.collate_fn is collate_captions and ds.describe()["num_samples"] == 2


def test_csv_list_with_quotes_and_a_named_header(tmp_path):
    write_image(tmp_path / "x.jpg")
    write_image(tmp_path / "sub" / "y.jpg")
    lst = tmp_path / "train.csv"
    lst.write_text('url,filepath,title\nhttp://a,x.jpg,"a cat, sitting"\nhttp://b,sub/y.jpg,"say ""hi"""\n')
    ds = build_caption_list(lst, SMALL)
    assert [(p.relative_to(tmp_path).as_posix(), c[0]) for p, c in ds.entries] == [
        ("x.jpg", "a cat, sitting"),
        ("sub/y.jpg", 'say "hi"'),
    ]


def test_caption_list_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"not found: .*nope\.tsv.*data.options.file"):
        build_caption_list(tmp_path / "nope.tsv", SMALL)
    write_image(tmp_path / "a.jpg")
    lst = tmp_path / "l.tsv"
    lst.write_text("a.jpg\tok\nmissing.jpg\tgone\n")
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 images .*missing\.jpg"):
        build_caption_list(lst, SMALL)
    lst.write_text("a.jpg\tok\njust-a-path.jpg\n")
    with pytest.raises(DatasetLayoutError, match="line 2"):
        build_caption_list(lst, SMALL)
    lst.write_text("\n\n")
    with pytest.raises(DatasetLayoutError, match="no image-caption pairs"):
        build_caption_list(lst, SMALL)


def test_an_unreadable_image_falls_back_to_the_next_entry(tmp_path):
    write_image(tmp_path / "good.jpg", (0, 0, 250))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    lst = tmp_path / "l.tsv"
    lst.write_text("bad.jpg\tbroken\ngood.jpg\tfine\n")
    ds = build_caption_list(lst, SMALL)
    with pytest.warns(UserWarning, match="bad.jpg"):
        sample = ds[(0, 3)]
    assert sample["caption"] == "fine"
    (tmp_path / "good.jpg").write_bytes(b"broken too")
    with pytest.warns(UserWarning), pytest.raises(ImageLoadError, match="consecutive unreadable"):
        ds[(0, 3)]


# -- COCO Captions ---------------------------------------------------------------------------------------------


def write_coco(root: Path, split: str = "train2017") -> Path:
    images = [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 3, "file_name": "000000000003.jpg"}]
    images.append({"id": 9, "file_name": "000000000009.jpg"})  # no caption
    anns = [
        {"id": 1, "image_id": 7, "caption": "A dog  on a sofa. "},
        {"id": 2, "image_id": 7, "caption": "a brown dog"},
        {"id": 3, "image_id": 3, "caption": "two cups"},
        {"id": 4, "image_id": 7, "caption": "   "},
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for im in images:
        write_image(root / split / im["file_name"], seed=im["id"])
    return root


def test_coco_captions_one_sample_per_image_with_a_seeded_caption(tmp_path):
    write_coco(tmp_path / "coco")
    ds = build_coco_captions(tmp_path, SMALL)  # found in DATA/coco
    assert [(p.name, c) for p, c in ds.entries] == [
        ("000000000003.jpg", ("two cups",)),
        ("000000000007.jpg", ("A dog on a sofa.", "a brown dog")),
    ]
    assert ds.notes == ["1 image(s) without a caption skipped"]
    picks = [ds[(1, seed)]["caption"] for seed in range(30)]
    assert set(picks) == {"A dog on a sofa.", "a brown dog"}
    assert picks == [ds[(1, seed)]["caption"] for seed in range(30)]
    pairs = build_coco_captions(tmp_path / "coco", SMALL, captions="all")
    assert len(pairs) == 3 and [c for _, c in pairs.entries][1:] == [("A dog on a sofa.",), ("a brown dog",)]


def test_coco_captions_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"annotations/captions_train2017\.json.*annotations_trainval2017"):
        build_coco_captions(tmp_path, SMALL)
    root = write_coco(tmp_path / "c")
    (root / "train2017" / "000000000003.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 2 images .*000000000003\.jpg"):
        build_coco_captions(root, SMALL)
    for f in (root / "train2017").iterdir():
        f.unlink()
    (root / "train2017").rmdir()
    with pytest.raises(DatasetLayoutError, match="train2017 images are missing"):
        build_coco_captions(root, SMALL)
    with pytest.raises(SettingsError, match="captions"):
        build_coco_captions(root, SMALL, captions="first")


# -- the TRAIN_DATA entries -------------------------------------------------------------------------------------


def transforms(crop: int = 32, scale=(0.4, 1.0)) -> TrainTransforms:
    return TrainTransforms(crop=crop, scale=scale)


def test_train_data_entries_build_the_caption_datasets(tmp_path):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "captions.tsv").write_text("a.jpg\ta thing\n")
    entry = TRAIN_DATA["caption_csv"]
    assert entry.validation is None and set(entry.options) >= {"file", "local_crops", "local_size", "local_scale"}
    config = DataConfig(dataset="caption_csv", crop=32, scale=(0.5, 1.0), options={"local_crops": 2, "local_size": 12})
    ds = entry.train(config, tmp_path, transforms(32, (0.5, 1.0)))  # finds DATA/captions.tsv
    sample = ds[(0, 1)]
    assert sample["image"].shape == (3, 32, 32) and sample["local_crops"].shape == (2, 3, 12, 12)
    assert ds.transform.global_scale == (0.5, 1.0)
    config = DataConfig(dataset="caption_csv", crop=32, options={"file": "other.tsv"})
    with pytest.raises(DatasetLayoutError, match="other.tsv"):
        entry.train(config, tmp_path, transforms())
    write_coco(tmp_path / "coco")
    coco = TRAIN_DATA["coco_captions"]
    assert coco.validation is None and {"split", "captions"} <= set(coco.options)
    ds = coco.train(DataConfig(dataset="coco_captions", crop=32, options={"captions": "all"}), tmp_path, transforms())
    assert isinstance(ds, CaptionDataset) and len(ds) == 3
    assert TRAIN_DATA["caption_shards"].validation is None
    assert {"shards", "shuffle_buffer", "shuffle_shards"} <= set(TRAIN_DATA["caption_shards"].options)
