"""SA-1B mask source: decoding against pycocotools-encoded masks, the mask cap, subsets, downscaling,
layout errors, and per-sample reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vocabseg.data import sa1b
from vocabseg.data.sa1b import MAX_MASKS, PIXELCLIP_TARS, SA1B_SHORT_SIDE, SA1BMasks, scaled_size
from vocabseg.errors import DatasetLayoutError, VocabsegError
from vocabseg.io import rle

coco = pytest.importorskip("pycocotools.mask")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' numpy 2 notice


def random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n boolean masks of distinct sizes: rectangles with a few holes, so RLEs have many runs."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        masks[i, top : top + 2 + i % (h // 2), left : left + 3 + (i * 7) % (w // 2)] = True
        masks[i] &= rng.random((h, w)) < 0.9
    return masks


def write_image(folder: Path, stem: str, masks: np.ndarray, image_hw: tuple[int, int] | None = None) -> None:
    """``stem``.jpg and ``stem``.json in SA-1B's format, RLEs encoded by pycocotools."""
    h, w = masks.shape[1:]
    ih, iw = image_hw or (h, w)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (ih, iw, 3), dtype=np.uint8)).save(folder / f"{stem}.jpg")
    annotations = []
    for i, mask in enumerate(masks):
        enc = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(
            {
                "id": i,
                "segmentation": {"size": enc["size"], "counts": enc["counts"].decode("ascii")},
                "area": int(coco.area(enc)),
                "bbox": [float(v) for v in coco.toBbox(enc)],
                "predicted_iou": 0.9,
            }
        )
    record = {"image": {"image_id": 1, "file_name": f"{stem}.jpg", "width": w, "height": h}, "annotations": annotations}
    (folder / f"{stem}.json").write_text(json.dumps(record))


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    originals = {"sa_10": random_masks(rng, 6, 40, 60), "sa_2": random_masks(rng, 4, 50, 30)}
    for stem, masks in originals.items():
        write_image(tmp_path / "sa_000000", stem, masks)
    return tmp_path, originals


def test_decoded_masks_equal_the_originals(folder):
    root, originals = folder
    data = SA1BMasks(root, max_short_side=None)
    assert [p.name for p in data.images] == ["sa_2.jpg", "sa_10.jpg"]  # numeric id order
    for i, stem in enumerate(["sa_2", "sa_10"]):
        sample = data[i]
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, *originals[stem].shape[1:])
        assert sample["masks"].dtype == torch.bool
        np.testing.assert_array_equal(sample["masks"].numpy(), originals[stem])
        assert int(sample["index"]) == i


def test_cap_keeps_the_largest_masks_in_file_order(tmp_path):
    masks = random_masks(np.random.default_rng(1), 9, 40, 40)
    write_image(tmp_path, "sa_1", masks)
    areas = masks.sum((1, 2))
    keep = sorted(np.argsort(-areas, kind="stable")[:4])
    got = SA1BMasks(tmp_path, max_masks=4, max_short_side=None)[0]["masks"].numpy()
    np.testing.assert_array_equal(got, masks[keep])
    assert MAX_MASKS == 512 and SA1BMasks(tmp_path).max_masks == 512


def test_tiny_masks_are_dropped(tmp_path):
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 2:9, 3:8] = True
    masks[1, 5, 5] = True  # one pixel: dropped, as PixelCLIP does
    masks[2, 10:12, 10] = True  # two pixels: kept
    write_image(tmp_path, "sa_1", masks)
    np.testing.assert_array_equal(SA1BMasks(tmp_path, max_short_side=None)[0]["masks"].numpy(), masks[[0, 2]])


def test_downscaling_resizes_image_and_masks_nearest(tmp_path):
    masks = random_masks(np.random.default_rng(2), 3, 45, 70)
    write_image(tmp_path, "sa_1", masks)
    sample = SA1BMasks(tmp_path, max_short_side=20)[0]
    assert scaled_size(45, 70, 20) == (20, 31)
    pil = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((31, 20), Image.NEAREST)) > 0 for m in masks]
    expected = np.stack([m for m in pil if m.sum() >= 2])  # a mask left with < 2 pixels is dropped
    assert 0 < len(expected) < len(masks)
    assert sample["image"].shape == (3, 20, 31)
    np.testing.assert_array_equal(sample["masks"].numpy(), expected)
    assert SA1B_SHORT_SIDE == 750 and scaled_size(1500, 2250, SA1B_SHORT_SIDE) == (750, 1125)
    assert scaled_size(45, 70, 100) == (45, 70)  # never upscaled


def test_subset_list_restricts_and_orders_images(folder, tmp_path):
    root, originals = folder
    listing = tmp_path / "sa1b.txt"
    listing.write_text("# official 5 %\nsa_10.jpg\n\n2\nsa_999.jpg\n")
    data = SA1BMasks(root, subset=listing, max_short_side=None)
    assert [p.stem for p in data.images] == ["sa_10", "sa_2"]
    assert data.notes == [f"1 of 3 names of subset {listing} match no image or folder"]
    np.testing.assert_array_equal(data[1]["masks"].numpy(), originals["sa_2"])
    listing.write_text("sa_999\n")
    with pytest.raises(DatasetLayoutError, match=r"no SA-1B sa_\*.jpg \+ sa_\*.json pairs in subset"):
        SA1BMasks(root, subset=listing)


def test_subset_names_tar_folders_as_pixelclip_lists_them(tmp_path):
    """PixelCLIP's list names tar files (``sa_000020``): every image of such a folder is selected, in
    the official layout of separate images/ and annotations/ trees too."""
    rng = np.random.default_rng(5)
    for tar, stems in (("sa_000020", ["sa_7", "sa_3"]), ("sa_000021", ["sa_9"]), ("sa_000999", ["sa_1"])):
        for stem in stems:
            write_image(tmp_path / "images" / tar, stem, random_masks(rng, 2, 20, 30))
            (tmp_path / "annotations" / tar).mkdir(parents=True, exist_ok=True)
            (tmp_path / "images" / tar / f"{stem}.json").rename(tmp_path / "annotations" / tar / f"{stem}.json")
    listing = tmp_path / "list.txt"
    listing.write_text("sa_000021\nsa_000020.tar\nsa_000022\n")
    data = SA1BMasks(tmp_path, subset=listing)
    assert [p.stem for p in data.images] == ["sa_9", "sa_3", "sa_7"]  # list order, numeric within a folder
    assert [p.parent.parent.name for p in data.annotations] == ["annotations"] * 3
    assert data.notes == [f"1 of 3 names of subset {listing} match no image or folder"]
    official = SA1BMasks(tmp_path, subset="pixelclip")  # the 100 tar files of PixelCLIP's datasets/sa1b.txt
    assert [p.stem for p in official.images] == ["sa_3", "sa_7", "sa_9"]
    assert official.notes == ["98 of 100 names of subset pixelclip match no image or folder"]
    assert len(PIXELCLIP_TARS) == 100 and PIXELCLIP_TARS[:2] == ("sa_000020", "sa_000021")
    assert PIXELCLIP_TARS[-1] == "sa_000719" and "sa_000130" in PIXELCLIP_TARS and "sa_000030" not in PIXELCLIP_TARS
    assert [p.stem for p in SA1BMasks(tmp_path, subset=["sa_1", "3"]).images] == ["sa_1", "sa_3"]


def test_a_sample_reads_only_its_own_json(folder, monkeypatch):
    root, _ = folder
    reads: list[str] = []
    real = sa1b._load_json
    monkeypatch.setattr(sa1b, "_load_json", lambda path: reads.append(path.name) or real(path))
    data = SA1BMasks(root)
    assert reads == []  # building the index reads no annotation file
    data[1]
    assert reads == ["sa_10.json"]


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="SA-1B folder not found"):
        SA1BMasks(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match=r"no SA-1B sa_\*.jpg \+ sa_\*.json pairs under"):
        SA1BMasks(tmp_path)
    masks = random_masks(np.random.default_rng(3), 2, 20, 30)
    write_image(tmp_path, "sa_1", masks)
    (tmp_path / "sa_1.json").rename(tmp_path / "sa_2.json")
    with pytest.raises(DatasetLayoutError, match=r"2 SA-1B image\(s\) lack their .* partner .*sa_1, sa_2"):
        SA1BMasks(tmp_path)


def test_sample_errors(tmp_path):
    masks = random_masks(np.random.default_rng(4), 2, 20, 30)
    write_image(tmp_path / "a", "sa_1", masks)
    record = json.loads((tmp_path / "a" / "sa_1.json").read_text())
    (tmp_path / "a" / "sa_1.json").write_text(json.dumps({**record, "annotations": []}))
    with pytest.raises(DatasetLayoutError, match="empty/missing 'annotations'"):
        SA1BMasks(tmp_path / "a")[0]

    write_image(tmp_path / "b", "sa_1", masks, image_hw=(21, 30))  # the jpg is not the json's size
    with pytest.raises(DatasetLayoutError, match=r"sa_1.jpg is 21x30 \(height x width\) but sa_1.json says 20x30"):
        SA1BMasks(tmp_path / "b")[0]

    write_image(tmp_path / "c", "sa_1", masks)
    record = json.loads((tmp_path / "c" / "sa_1.json").read_text())
    record["annotations"][1]["segmentation"]["size"] = [30, 20]
    (tmp_path / "c" / "sa_1.json").write_text(json.dumps(record))
    with pytest.raises(DatasetLayoutError, match=r"annotation 1 has mask size \[30, 20\], but the image record says"):
        SA1BMasks(tmp_path / "c")[0]

    (tmp_path / "c" / "sa_1.json").write_text("{not json")
    with pytest.raises(VocabsegError, match="unreadable SA-1B annotation file"):
        SA1BMasks(tmp_path / "c")[0]
    with pytest.raises(IndexError, match="out of range"):
        SA1BMasks(tmp_path / "c")[1]


def test_nearest_index_is_pils_nearest_exactly():
    """PIL's NEAREST (which detectron2 applies to masks) is floor((k + 0.5) in / out) except at ties,
    where its double-precision running sum decides; nearest_index reproduces it."""
    rng = np.random.default_rng(8)
    pairs = [(2, 7), (2, 15), (750, 889), (1125, 1333), (1500, 750), (2250, 1125), (750, 1024)]
    pairs += [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(300)]
    for n_in, n_out in pairs:
        column = np.arange(n_in, dtype=np.int32)[:, None]
        pil = np.asarray(Image.fromarray(column, mode="I").resize((1, n_out), Image.NEAREST))[:, 0]
        np.testing.assert_array_equal(sa1b.nearest_index(n_out, n_in, n_out), pil, err_msg=f"{n_in} -> {n_out}")
        np.testing.assert_array_equal(sa1b.nearest_index(np.arange(n_out)[::-1], n_in, n_out), pil[::-1])
    floor_rule = ((np.arange(7) + 0.5) * 2 / 7).astype(int)
    assert floor_rule[3] == 1 and sa1b.nearest_index(7, 2, 7)[3] == 0  # (3 + 0.5) * 2/7 sums to just below 1


def test_prepare_halves_images_and_masks_and_resumes(tmp_path):
    from vocabseg.data.sa1b_prepare import main, prepare_sa1b

    rng = np.random.default_rng(9)
    originals = {"sa_4": random_masks(rng, 5, 40, 60), "sa_12": random_masks(rng, 3, 60, 44)}
    for stem, masks in originals.items():
        write_image(tmp_path / "src" / "sa_000020", stem, masks)
        h, w = masks.shape[1:]
        smooth = np.stack(np.broadcast_arrays(*np.ogrid[:h, :w], 128), -1) * [3, 2, 1] % 256  # JPEG-friendly
        Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "src" / "sa_000020" / f"{stem}.jpg", quality=95)
    record = json.loads((tmp_path / "src" / "sa_000020" / "sa_4.json").read_text())
    record["annotations"][0].update(point_coords=[[10.0, 20.0]], crop_box=[0.0, 0.0, 60.0, 40.0])
    (tmp_path / "src" / "sa_000020" / "sa_4.json").write_text(json.dumps(record))

    assert prepare_sa1b(tmp_path / "src", tmp_path / "out", short_side=20) == 2
    prepared = SA1BMasks(tmp_path / "out", max_short_side=None)
    on_the_fly = SA1BMasks(tmp_path / "src", max_short_side=20)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in prepared.images] == [
        "sa_000020/sa_4.jpg", "sa_000020/sa_12.jpg"
    ]  # fmt: skip
    for i, (h, w) in enumerate([(20, 30), (27, 20)]):
        assert prepared[i]["image"].shape == on_the_fly[i]["image"].shape == (3, h, w)
        np.testing.assert_array_equal(prepared[i]["masks"].numpy(), on_the_fly[i]["masks"].numpy())
        assert np.abs(prepared[i]["image"].int() - on_the_fly[i]["image"].int()).float().mean() < 3  # JPEG again
    out = json.loads((tmp_path / "out" / "sa_000020" / "sa_4.json").read_text())
    assert out["image"]["height"] == 20 and out["image"]["width"] == 30
    for annotation, mask in zip(out["annotations"], originals["sa_4"]):
        half = sa1b.resize_mask(mask, (20, 30))
        np.testing.assert_array_equal(rle.decode(annotation["segmentation"]), half)
        assert annotation["area"] == int(half.sum())
        ys, xs = np.nonzero(half)
        box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] if len(ys) else [0, 0, 0, 0]
        assert annotation["bbox"] == box
    assert out["annotations"][0]["area"] == 0 and out["annotations"][4]["area"] > 10  # a mask may vanish
    assert out["annotations"][0]["point_coords"] == [[5.0, 10.0]]  # scaled with the image
    assert out["annotations"][0]["crop_box"] == [0, 0, 30, 20]

    assert prepare_sa1b(tmp_path / "src", tmp_path / "out", short_side=20) == 0  # done pairs are skipped
    (tmp_path / "out" / "sa_000020" / "sa_12.json").unlink()  # interrupted before its json was written
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--short-side", "20", "--workers", "2"]) == 0
    assert len(SA1BMasks(tmp_path / "out")) == 2
    with pytest.raises(DatasetLayoutError, match="inside the source folder"):
        prepare_sa1b(tmp_path / "src", tmp_path / "src" / "half")
    assert main([str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
