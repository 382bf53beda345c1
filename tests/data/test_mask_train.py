"""Training data from unlabeled masks (PixelCLIP): the batch format, the geometry against a literal
re-computation of the official detectron2 pipeline, the strong view's cutout, per-seed determinism,
the mask filters, and the ``sa1b`` / ``dino_masks`` training-data entries through the loader."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from PIL import Image
from torchvision.transforms.v2 import functional as F

from vocabseg.data.mask_train import (
    MaskTrainDataset,
    MaskTrainTransforms,
    collate_masks,
    gaussian_blur,
    resized_shape,
)
from vocabseg.data.sa1b import RLEMasks, SA1BMasks
from vocabseg.data.train import TrainTransforms
from vocabseg.errors import DatasetLayoutError, MethodOptionError
from vocabseg.io import rle
from vocabseg.models.clip import OPENAI_MEAN, OPENAI_STD
from vocabseg.train.recipe import DataConfig
from vocabseg.train.sampler import BatchStream, ResumableDistributedSampler, build_loader
from vocabseg.train.tasks import TRAIN_DATA

MEAN, STD = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
PLAIN = {"photometric": False, "strong": False}


def blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n masks: ellipses of varied sizes with a few holes (many RLE runs), some touching the borders."""
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1, h / 2), rng.uniform(1, w / 2)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        masks[i] &= rng.random((h, w)) < 0.97
    return masks


def write_sa1b(folder: Path, stem: str, masks: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """``stem``.jpg + ``stem``.json in SA-1B's format (RLEs by our encoder); returns the image."""
    h, w = masks.shape[1:]
    folder.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.random.default_rng(len(stem)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{stem}.jpg", quality=95)
    annotations = [{"id": i, "segmentation": rle.encode(m), "area": int(m.sum())} for i, m in enumerate(masks)]
    record = {"image": {"image_id": 1, "file_name": f"{stem}.jpg", "height": h, "width": w}, "annotations": annotations}
    (folder / f"{stem}.json").write_text(json.dumps(record))
    return image


class ArraySource:
    """A mask source over in-memory arrays (the protocol MaskTrainDataset reads)."""

    name = "arrays"
    notes: list[str] = []

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray]):
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int):
        m = self.masks[index]
        return self.images[index], RLEMasks([rle.encode(x) for x in m], m.shape[1:], m.sum((1, 2)).tolist(), Path("x"))

    def describe(self):
        return {"dataset": self.name}


def official_masks(masks: np.ndarray, g, crop: int, res: int) -> np.ndarray:
    """The official path, literally: detectron2 resizes each mask with PIL NEAREST, crops, flips; the
    model interpolates the crop's masks to res x res (torch 'nearest'), drops masks of <= 1 pixel;
    the mapper sorts by area (largest first)."""
    out = []
    for m in masks:
        resized = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((g.width, g.height), Image.NEAREST))
        cropped = resized[g.top : g.top + g.crop_height, g.left : g.left + g.crop_width]
        if g.flip:
            cropped = cropped[:, ::-1]
        assert cropped.shape == (crop, crop)  # the official path: full-size crops
        down = TF.interpolate(torch.from_numpy(cropped.copy()).float()[None, None], size=(res, res), mode="nearest")
        out.append(down[0, 0].bool().numpy())
    out = np.stack(out)
    area = out.sum((1, 2))
    keep = np.flatnonzero(area > 1)
    return out[keep[np.argsort(-area[keep], kind="stable")]]


def official_view(image: np.ndarray, g, mean=MEAN, std=STD) -> torch.Tensor:
    """The weak view without colour distortion: PIL bilinear resize of the whole image, crop, flip."""
    resized = np.asarray(Image.fromarray(image).resize((g.width, g.height), Image.BILINEAR))
    crop = resized[g.top : g.top + g.crop_height, g.left : g.left + g.crop_width]
    pixels = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255
    return ((pixels.flip(-1) if g.flip else pixels) - mean) / std


@pytest.mark.parametrize("seed", range(6))
def test_geometry_equals_the_official_pipeline(seed):
    rng = np.random.default_rng(seed)
    h, w = (90, 130) if seed % 2 else (140, 95)
    masks = blob_masks(rng, 12, h, w)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    t = MaskTrainTransforms(crop=48, scale=(0.9, 1.3), base_size=64, max_size=110, mask_resolution=20, **PLAIN)
    torch.manual_seed(seed)
    g = t.draw_geometry(h, w)
    torch.manual_seed(seed)
    sample = t(image, ArraySource([image], [masks]).load(0)[1])
    np.testing.assert_array_equal(sample["masks"].numpy(), official_masks(masks, g, 48, 20))
    expected = official_view(image, g)
    assert torch.equal(sample["image"], sample["teacher_image"])  # no strong augmentation: one view
    assert (sample["teacher_image"] - expected).abs().max() <= 1.01 / 255 / min(OPENAI_STD)  # PIL box rounding


def test_resize_rule_is_detectron2s_resize_shortest_edge():
    assert resized_shape(750, 1125, 1024, 1333) == (889, 1333)  # a prepared SA-1B image: the long side caps it
    assert resized_shape(1125, 750, 1024, 1333) == (1333, 889)
    assert resized_shape(750, 900, 1024, 1333) == (1024, 1229)  # short side 1024: 900 * 1024 / 750 = 1228.8
    assert resized_shape(100, 100, 640 * 1.6, 1333) == (1024, 1024)  # the recipe's 1.6 x 640
    t = MaskTrainTransforms()
    assert (t.crop, t.scale, t.max_size, t.mask_resolution, t.max_masks) == (640, (1.6, 1.6), 1333, 256, 512)
    g = t.draw_geometry(750, 1125)
    assert (g.height, g.width, g.crop_height, g.crop_width) == (889, 1333, 640, 640)


def test_small_images_are_padded_and_masks_cover_the_same_canvas():
    rng = np.random.default_rng(1)
    masks = blob_masks(rng, 6, 30, 40)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    t = MaskTrainTransforms(crop=48, scale=None, mask_resolution=24, flip=False, **PLAIN)  # no resize: 30x40
    sample = t(image, ArraySource([image], [masks]).load(0)[1])
    assert sample["teacher_image"].shape == (3, 48, 48)
    assert (sample["teacher_image"][:, 30:] == 0).all() and (sample["teacher_image"][:, :, 40:] == 0).all()
    np.testing.assert_allclose(sample["teacher_image"][:, :30, :40], official_view(image, t.draw_geometry(30, 40)))
    got = sample["masks"].numpy()
    assert not got[:, 15:].any() and not got[:, :, 20:].any()  # grid points i * 48 // 24 >= 30 are padding
    expected = masks[:, ::2, ::2]  # grid point i samples canvas pixel 2i: the image pixel itself
    area = expected.sum((1, 2))
    keep = np.flatnonzero(area > 1)
    np.testing.assert_array_equal(got[:, :15, :20], expected[keep[np.argsort(-area[keep], kind="stable")]])


def test_one_pixel_masks_are_dropped_and_the_cap_keeps_the_largest():
    h = w = 32
    masks = np.zeros((7, h, w), dtype=bool)
    masks[0, 5, 5] = True  # one pixel: dropped
    masks[1, 8, 8:10] = True  # two pixels: kept
    for i, side in zip(range(2, 7), (3, 9, 5, 12, 7)):
        masks[i, 10 : 10 + side, 1 : 1 + side] = True
    image = np.zeros((h, w, 3), dtype=np.uint8)
    identity = {"crop": 32, "scale": None, "mask_resolution": 32, "flip": False, **PLAIN}
    got = MaskTrainTransforms(**identity)(image, ArraySource([image], [masks]).load(0)[1])["masks"].numpy()
    np.testing.assert_array_equal(got, masks[[5, 3, 6, 4, 2, 1]])  # largest first, the 1-pixel mask gone
    capped = MaskTrainTransforms(**identity, max_masks=3)(image, ArraySource([image], [masks]).load(0)[1])["masks"]
    np.testing.assert_array_equal(capped.numpy(), masks[[5, 3, 6]])


def test_at_most_512_masks_the_largest():
    rng = np.random.default_rng(2)
    masks = rng.random((600, 24, 24)) < rng.uniform(0.05, 0.9, (600, 1, 1))
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    t = MaskTrainTransforms(crop=24, scale=None, mask_resolution=24, flip=False, **PLAIN)
    got = t(image, ArraySource([image], [masks]).load(0)[1])["masks"].numpy()
    area = masks.sum((1, 2))
    assert got.shape == (512, 24, 24)
    np.testing.assert_array_equal(got, masks[np.argsort(-area, kind="stable")[:512]])


def near_grey_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Bright, almost grey pixels: no colour augmentation here turns a pixel exactly black."""
    rng = np.random.default_rng(seed)
    base = rng.integers(120, 200, (h, w, 1))
    return np.clip(base + rng.integers(-5, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def black_box(view: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the pixels that are exactly the normalised black, or None."""
    black = ((view - (0 - MEAN) / STD).abs() < 1e-6).all(0)
    ys, xs = torch.nonzero(black.any(1)).flatten(), torch.nonzero(black.any(0)).flatten()
    if len(ys) == 0:
        return None
    box = (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
    assert black[box[0] : box[1], box[2] : box[3]].all() and int(black.sum()) == (box[1] - box[0]) * (box[3] - box[2])
    return box


def test_strong_view_cutout_is_removed_from_the_masks():
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, 10, 60, 80)
    masks[0] = True  # covers everything: its pixels under the cutout must go
    image = near_grey_image(60, 80)
    source = ArraySource([image], [masks])
    strong = MaskTrainDataset(source, MaskTrainTransforms(crop=48, scale=(1.0, 1.0), base_size=60, mask_resolution=24))
    plain = MaskTrainDataset(source, MaskTrainTransforms(crop=48, scale=(1.0, 1.0), base_size=60, mask_resolution=24,
                                                         strong=False))  # fmt: skip
    sizes = []
    for seed in range(8):
        cut, whole = strong[(0, seed)], plain[(0, seed)]  # the same geometry: drawn first from the seed
        assert black_box(whole["image"]) is None
        y0, y1, x0, x1 = black_box(cut["image"])
        sizes += [(y1 - y0) / 48, (x1 - x0) / 48]
        grid = np.arange(24) * 48 // 24
        inside = ((grid >= y0) & (grid < y1))[:, None] & ((grid >= x0) & (grid < x1))[None, :]
        expected = whole["masks"].numpy() & ~inside
        expected = expected[expected.sum((1, 2)) > 1]
        expected = expected[np.argsort(-expected.sum((1, 2)), kind="stable")]
        np.testing.assert_array_equal(cut["masks"].numpy(), expected)
        assert cut["masks"][0].sum() == 24 * 24 - inside.sum()  # the full mask lost exactly the cutout
    assert min(sizes) >= 0.1 - 1 / 48 and max(sizes) <= 0.5  # 10-50 % of each side


def bright_rectangle(h: int, w: int) -> np.ndarray:
    image = np.full((h, w, 3), 90, dtype=np.uint8)  # grey: no colour augmentation here makes it black
    image[10:25, 50:70] = 235  # off-centre, so a flip or a wrong crop moves it
    return image


def centroid(view: torch.Tensor) -> tuple[float, float]:
    """Centroid of the bright pixels: above the midpoint between the brightest and the median (background)."""
    lum = view.mean(0)
    weight = (lum > (lum.max() + lum.median()) / 2).float()
    ys, xs = torch.meshgrid(torch.arange(lum.shape[0]), torch.arange(lum.shape[1]), indexing="ij")
    return float((weight * ys).sum() / weight.sum()), float((weight * xs).sum() / weight.sum())


def test_student_and_teacher_views_share_the_geometry():
    image = bright_rectangle(60, 90)
    masks = np.zeros((1, 60, 90), dtype=bool)
    masks[0, 10:25, 50:70] = True
    data = MaskTrainDataset(ArraySource([image], [masks]), MaskTrainTransforms(crop=48, scale=(0.8, 1.0), base_size=60,
                                                                               mask_resolution=48))  # fmt: skip
    compared, flips = 0, set()
    for seed in range(30):
        s = data[(0, seed)]
        rect = s["masks"][0] if len(s["masks"]) else None
        box = black_box(s["image"])
        if rect is None or rect.sum() < 20 or box is None:
            continue
        y0, y1, x0, x1 = box
        if rect[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3].any():
            continue  # the cutout touches the rectangle: its centroid moves
        ty, tx = centroid(s["teacher_image"])
        sy, sx = centroid(s["image"])
        my, mx = (float(v) for v in torch.nonzero(rect).float().mean(0))
        assert abs(ty - sy) < 1.0 and abs(tx - sx) < 1.0, seed  # the same pixel positions in both views
        assert abs(ty - my) < 1.0 and abs(tx - mx) < 1.0, seed  # and the mask where the pixels are
        flips.add(tx > 24)
        compared += 1
    assert compared >= 5 and flips == {True, False}  # seen on both sides: flips and crops vary


def test_same_seed_same_sample_whatever_the_global_rng(tmp_path):
    rng = np.random.default_rng(4)
    write_sa1b(tmp_path, "sa_1", blob_masks(rng, 15, 60, 90))
    data = MaskTrainDataset(SA1BMasks(tmp_path), MaskTrainTransforms(crop=32, base_size=40, scale=(0.8, 1.5),
                                                                     mask_resolution=16))  # fmt: skip
    torch.manual_seed(0)
    a = data[(0, 12345)]
    torch.manual_seed(99)
    torch.rand(100)
    b = data[(0, 12345)]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = data[(0, 54321)]
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["teacher_image"], c["teacher_image"])
    state = torch.random.get_rng_state()
    data[(0, 7)]
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded sample leaves the global RNG alone
    data[0]  # unseeded: the global RNG
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_collate_pads_masks_to_the_largest_count():
    r = 8
    samples = [
        {
            "image": torch.full((3, 16, 16), float(i)),
            "teacher_image": torch.full((3, 16, 16), -float(i)),
            "masks": torch.rand(n, r, r, generator=torch.Generator().manual_seed(i)) < 0.5,
            "index": torch.tensor(i),
        }
        for i, n in enumerate((3, 0, 5))
    ]
    batch = collate_masks(samples)
    assert set(batch) == {"image", "teacher_image", "masks", "mask_valid", "index"}
    assert batch["image"].dtype == batch["teacher_image"].dtype == torch.float32
    assert batch["image"].shape == batch["teacher_image"].shape == (3, 3, 16, 16)
    assert batch["masks"].dtype == torch.bool and batch["masks"].shape == (3, 5, r, r)
    assert batch["mask_valid"].tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] * 5]
    for b, s in enumerate(samples):
        n = len(s["masks"])
        assert torch.equal(batch["masks"][b, :n], s["masks"]) and not batch["masks"][b, n:].any()
        assert torch.equal(batch["image"][b], s["image"]) and torch.equal(batch["teacher_image"][b], s["teacher_image"])
    assert batch["index"].tolist() == [0, 1, 2]
    empty = collate_masks([{**samples[1], "index": torch.tensor(0)}])
    assert empty["masks"].shape == (1, 0, r, r) and empty["mask_valid"].shape == (1, 0)


@pytest.mark.parametrize("h, w, rows, cols", [(37, 53, 11, 9), (40, 7, 40, 7), (5, 300, 3, 1)])
def test_rle_sampling_equals_decoding_then_indexing(h, w, rows, cols):
    rng = np.random.default_rng(h * w)
    masks = np.concatenate([blob_masks(rng, 8, h, w), np.zeros((1, h, w), bool), np.ones((1, h, w), bool)])
    masks[0] = False
    masks[0, :, -1] = True  # only the last column
    masks[1] = False
    masks[1, 0, 0] = True  # only the first pixel
    r = np.sort(rng.integers(0, h, rows))
    c = rng.integers(0, w, cols)  # any order (a flip reverses it)
    got = RLEMasks([rle.encode(m) for m in masks], (h, w), [0] * len(masks), Path("x")).sample(r, c)
    np.testing.assert_array_equal(got, masks[:, r[:, None], c[None, :]])


def test_rle_sampling_decodes_only_the_sampled_columns():
    h, w = 1500, 2250  # SA-1B's stored size: a full mask is 3.4 MB as bool
    mask = np.zeros((h, w), dtype=bool)
    mask[100:1400, 200:2100] = True
    masks = RLEMasks([rle.encode(mask)] * 4, (h, w), [0] * 4, Path("x"))
    rows, cols = np.arange(0, h, 6), np.arange(1000, 1040)
    tracemalloc.start()
    got = masks.sample(rows, cols)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(got[0], mask[rows[:, None], cols[None, :]])
    assert peak < 1_000_000, peak  # 40 columns (60 kB per mask), never one whole mask


@pytest.mark.parametrize("sigma", [0.1, 0.4, 1.3, 2.0])
def test_separable_blur_equals_torchvisions(sigma):
    x = torch.rand(3, 30, 41, generator=torch.Generator().manual_seed(0))
    size = 2 * int(np.ceil(3 * sigma)) + 1
    expected = F.gaussian_blur(x, [size, size], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(x, sigma), expected, rtol=0, atol=2e-6)


def test_vectorised_counts_parser_equals_the_reference_loop():
    rng = np.random.default_rng(6)
    for mask in blob_masks(rng, 20, 70, 90):
        counts = rle.encode(mask)["counts"]  # deltas of both signs
        np.testing.assert_array_equal(rle.string_to_runs_array(counts), rle.string_to_runs(counts))
    big = np.zeros((3000, 3000), dtype=bool)
    big[1234:2999, 17:2000] = True  # runs above 2^20: values of five characters
    counts = rle.encode(big)["counts"]
    np.testing.assert_array_equal(rle.string_to_runs_array(counts), rle.string_to_runs(counts))
    assert rle.string_to_runs_array("").tolist() == []
    for bad in ("0\x7f", "1Q", "ab\u00e9", "0" + "P" * 13 + "0"):  # out of range, truncated, non-ASCII, too long
        with pytest.raises(ValueError, match="malformed RLE"):
            rle.string_to_runs_array(bad)


# -- the training-data entries, through the trainer's loader -----------------------------------------------------


@pytest.fixture()
def sa1b_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    for tar, stems in (("sa_000020", ("sa_11", "sa_3")), ("sa_000555", ("sa_8",))):
        for stem in stems:
            write_sa1b(tmp_path / "sa1b" / tar, stem, blob_masks(rng, int(rng.integers(3, 25)), 90, 135))
    return tmp_path / "sa1b"


def recipe_data(dataset: str, **options) -> tuple[DataConfig, TrainTransforms]:
    """A recipe's data section and the transforms ``build_training`` derives from it."""
    config = DataConfig(dataset=dataset, crop=48, scale=(1.5, 1.5), cat_max_ratio=1.0, num_workers=0, options=options)
    transforms = TrainTransforms(crop=config.crop, scale=config.scale, cat_max_ratio=config.cat_max_ratio,
                                 flip=config.flip, photometric=config.photometric)  # fmt: skip
    return config, transforms


def batches(dataset, batch_size: int, n: int, workers: int = 0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    sampler = ResumableDistributedSampler(len(dataset), seed=seed)
    loader = build_loader(dataset, sampler, batch_size=batch_size, num_workers=workers, pin_memory=False)
    stream = BatchStream(loader, sampler, seed=seed)
    return [stream.next() for _ in range(n)]


def test_sa1b_entry_yields_batches_through_the_loader(sa1b_root):
    config, transforms = recipe_data("sa1b", mask_resolution=16, image_short_side=60)
    entry = TRAIN_DATA["sa1b"]
    assert set(config.options) <= set(entry.options)
    assert {"subset_file", "mask_resolution", "max_masks", "image_short_side", "max_size"} <= set(entry.options)
    dataset = entry.train(config, sa1b_root, transforms)
    assert len(dataset) == 3 and dataset.transforms.scale == (1.5, 1.5) and dataset.transforms.crop == 48
    first = batches(dataset, 2, 3)
    for batch in first:
        assert batch["image"].shape == batch["teacher_image"].shape == (2, 3, 48, 48)
        assert batch["masks"].dtype == torch.bool and batch["masks"].shape[-2:] == (16, 16)
        assert batch["mask_valid"].shape == batch["masks"].shape[:2]
        assert (batch["masks"].flatten(2).sum(-1)[batch["mask_valid"]] >= 2).all()
        assert not batch["masks"][~batch["mask_valid"]].any()
    again = batches(dataset, 2, 3, workers=2)  # worker processes: the same batches (seeds per sample)
    for a, b in zip(first, again):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert dataset.describe()["mask_source"] == "sa1b" and dataset.describe()["transforms"]["mask_resolution"] == 16


def test_sa1b_entry_honours_the_subset_list(sa1b_root, tmp_path):
    listing = tmp_path / "subset.txt"
    listing.write_text("sa_000555\n3\n")
    config, transforms = recipe_data("sa1b", subset_file=str(listing))
    dataset = TRAIN_DATA["sa1b"].train(config, sa1b_root, transforms)
    assert [p.stem for p in dataset.source.images] == ["sa_8", "sa_3"]
    config, transforms = recipe_data("sa1b", subset_file="pixelclip")
    dataset = TRAIN_DATA["sa1b"].train(config, sa1b_root, transforms)
    assert [p.stem for p in dataset.source.images] == ["sa_3", "sa_11"] and dataset.notes  # sa_000020 only


def test_sa1b_images_are_halved_as_prepared(sa1b_root):
    config, transforms = recipe_data("sa1b")
    source = TRAIN_DATA["sa1b"].train(config, sa1b_root, transforms).source
    assert source.max_short_side == 750  # the default: PixelCLIP's halving of SA-1B's 1500
    config, transforms = recipe_data("sa1b", image_short_side=45)
    image, masks = TRAIN_DATA["sa1b"].train(config, sa1b_root, transforms).source.load(0)
    assert image.shape == (45, 68, 3) and masks.shape == (90, 135)  # masks stay stored, sampled per crop


def test_bad_setups_are_refused_clearly(sa1b_root, tmp_path):
    config, transforms = recipe_data("sa1b")
    with pytest.raises(MethodOptionError, match=r"cat_max_ratio=0.75 .* set data.cat_max_ratio=1.0"):
        TRAIN_DATA["sa1b"].train(config, sa1b_root, TrainTransforms(crop=48))
    with pytest.raises(MethodOptionError, match="mask_resolution must be a positive integer, got '16'"):
        TRAIN_DATA["sa1b"].train(recipe_data("sa1b", mask_resolution="16")[0], sa1b_root, transforms)
    with pytest.raises(MethodOptionError, match="val_dataset .*val_root .* or val_every=null"):
        TRAIN_DATA["sa1b"].validation(config, sa1b_root)

    tars = tmp_path / "downloads"
    tars.mkdir()
    (tars / "sa_000020.tar").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match=r"found 1 .tar file\(s\) \(sa_000020.tar...\): extract them first"):
        TRAIN_DATA["sa1b"].train(config, tars, transforms)
    only_images = tmp_path / "only_images"
    only_images.mkdir()
    (sa1b_root / "sa_000555" / "sa_8.jpg").rename(only_images / "sa_8.jpg")
    with pytest.raises(DatasetLayoutError, match="1 sa_\\*.jpg image\\(s\\) but no sa_\\*.json annotation"):
        TRAIN_DATA["sa1b"].train(config, only_images, transforms)
    with pytest.raises(DatasetLayoutError, match=r"\(sa_8\); each sa_<id>.jpg needs the sa_<id>.json"):
        TRAIN_DATA["sa1b"].train(config, sa1b_root, transforms)  # sa_8.json lost its image
    (sa1b_root / "sa_000555" / "sa_8.json").unlink()

    dataset = TRAIN_DATA["sa1b"].train(config, sa1b_root, transforms)
    bad = sa1b_root / "sa_000020" / "sa_3.json"
    bad.write_text('{"image": {"height": 90, "width"')  # truncated
    with pytest.raises(DatasetLayoutError, match=r"sa_3.json: unreadable SA-1B annotation file .* re-extract"):
        dataset[(0, 0)]
    broken = {"segmentation": {"size": [90, 135], "counts": "0\x7f"}, "area": 5}
    record = {"image": {"height": 90, "width": 135}, "annotations": [broken]}
    bad.write_text(json.dumps(record))
    with pytest.raises(DatasetLayoutError, match=r"sa_3.json: annotation 0: unreadable RLE .* re-extract"):
        dataset[(0, 0)]
    (sa1b_root / "sa_000020" / "sa_11.jpg").unlink()  # deleted after indexing
    with pytest.raises(DatasetLayoutError, match=r"Image missing: expected .*sa_11.jpg"):
        dataset[(1, 0)]


@pytest.mark.slow  # builds a random ViT-S/16 (~8 s)
def test_dino_masks_entry_yields_partition_masks(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(near_grey_image(40, 56, seed=i)).save(folder / f"p{i}.png")
    options = {"dino_weights": None, "k": 4, "input_size": 32, "cache_dir": str(tmp_path / "cache"),
               "mask_resolution": 12}  # fmt: skip
    config, transforms = recipe_data("dino_masks", **options)
    assert set(options) <= set(TRAIN_DATA["dino_masks"].options)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        dataset = TRAIN_DATA["dino_masks"].train(config, folder, transforms)
    (batch,) = batches(dataset, 2, 1)
    assert batch["image"].shape == batch["teacher_image"].shape == (2, 3, 48, 48)
    assert batch["masks"].shape[1] <= 4 and batch["masks"].shape[-2:] == (12, 12)
    assert (batch["masks"].sum(1) <= 1).all()  # a partition: no pixel in two masks
    assert dataset.describe()["mask_source"] == "dino_kmeans"
    assert len(list((tmp_path / "cache" / "dino_masks").glob("*.safetensors"))) == 2


def test_a_pixelclip_recipe_builds_and_takes_a_step_on_sa1b(sa1b_root, tiny_clip_dir):
    """The whole path: recipe -> build_training (its transforms and data options) -> loader -> the
    PixelCLIP model's training step (skipped while that method or recipe is not registered)."""
    from vocabseg.train import get_recipe, list_recipes
    from vocabseg.train.tasks import build_training

    if "pixelclip_vitb_sa1b" not in list_recipes():
        pytest.skip("the PixelCLIP recipe is not registered")
    recipe = get_recipe("pixelclip_vitb_sa1b").with_overrides([
        f'model.clip_model="local-dir:{tiny_clip_dir}"', "model.pretrained=null",
        'model.options={"resolution": 32, "num_clusters": 4}', "data.crop=48", "data.scale=[1.2,1.2]",
        'data.options={"mask_resolution": 16, "image_short_side": 60}', "data.num_workers=0", "batch_size=2",
    ])  # fmt: skip
    assert recipe.data.dataset == "sa1b"
    setup = build_training(recipe, sa1b_root)
    assert setup.validate is None and setup.dataset.transforms.mask_resolution == 16
    assert setup.dataset.transforms.scale == (1.2, 1.2) and setup.dataset.transforms.crop == 48
    (batch,) = batches(setup.dataset, 2, 1)
    loss = setup.model.training_step(batch)["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
