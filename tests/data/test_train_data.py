"""Training data: joint augmentation, per-sample seeds, PASCAL-5i training images and targets, splits."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vocabseg.data import build_dataset
from vocabseg.data.layouts import Sample
from vocabseg.data.pascal5i import LAYOUT, build_pascal5i_train, fold_classes, seen_classes
from vocabseg.data.synthetic import write_sample, write_synthetic, write_synthetic_pascal5i_shapes
from vocabseg.data.train import SegTrainDataset, TrainTransforms
from vocabseg.errors import DatasetLayoutError

PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], dtype=np.uint8)
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # output pixels stay in [0, 1]


def identity(raw: np.ndarray) -> np.ndarray:
    return raw


def colour_coded(tmp_path: Path, labels: np.ndarray, name: str = "a") -> Sample:
    """A lossless image whose colour is its label's palette entry."""
    image, label = tmp_path / f"{name}.png", tmp_path / f"{name}_label.png"
    Image.fromarray(PALETTE[labels % len(PALETTE)]).save(image)
    Image.fromarray(labels.astype(np.uint8)).save(label)
    return Sample(name, image, label)


def decode(image: torch.Tensor) -> np.ndarray:
    """Nearest palette entry of each pixel of a [0, 1] (3, H, W) image."""
    pixels = image.permute(1, 2, 0).numpy()[..., None, :] * 255
    return np.abs(pixels - PALETTE).sum(-1).argmin(-1)


def interior(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2 radius + 1)^2 neighbourhood has a single label."""
    t = torch.from_numpy(label).float()[None, None]
    size = 2 * radius + 1
    high = torch.nn.functional.max_pool2d(t, size, stride=1, padding=radius)
    low = -torch.nn.functional.max_pool2d(-t, size, stride=1, padding=radius)
    return (high == low)[0, 0].numpy()


def digest(item: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(item["image"].numpy().tobytes() + item["label"].numpy().tobytes()).hexdigest()


def test_joint_transforms_keep_image_and_mask_aligned(tmp_path):
    blocks = np.random.default_rng(0).integers(0, 4, size=(4, 6))
    labels = np.kron(blocks, np.ones((16, 16), dtype=np.int64))  # 64 x 96, not mirror-symmetric
    t = TrainTransforms(crop=48, scale=(0.5, 1.5), base_size=64, photometric=False, **PLAIN)
    ds = SegTrainDataset([colour_coded(tmp_path, labels)], identity, ["r", "g", "b", "y"], t)
    agree, padded = [], 0
    for seed in range(24):
        item = ds[(0, seed)]
        image, label = item["image"], item["label"].numpy()
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and label.dtype == np.int64
        scored = label != 255
        inner = scored & interior(label)  # resizing blends colours across class edges
        agree.append((decode(image)[inner] == label[inner]).mean())
        # the only ignored pixels are padding: image 0, at the bottom / right
        assert (image.permute(1, 2, 0).numpy()[~scored] == 0).all()
        rows, cols = (~scored).all(1), (~scored).all(0)
        assert (~scored == rows[:, None] | cols[None, :]).all()
        padded += int((~scored).any())
    assert min(agree) > 0.99, agree
    assert 0 < padded < 24  # short sides 32..96 around a 48 crop: some samples are padded, some not


def test_no_resize_normalises_and_pads(tmp_path):
    labels = np.arange(20 * 30).reshape(20, 30) % 4
    t = TrainTransforms(crop=40, scale=None, flip=False, photometric=False)
    ds = SegTrainDataset([colour_coded(tmp_path, labels)], identity, ["r", "g", "b", "y"], t)
    item = ds[0]
    mean, std = torch.tensor(t.mean)[:, None, None], torch.tensor(t.std)[:, None, None]
    expected = (torch.from_numpy(PALETTE[labels]).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(item["image"][:, :20, :30], expected)
    assert (item["image"][:, 20:] == 0).all() and (item["image"][:, :, 30:] == 0).all()
    np.testing.assert_array_equal(item["label"][:20, :30], labels)
    assert (item["label"][20:] == 255).all() and (item["label"][:, 30:] == 255).all()
    assert item["index"].dtype == torch.int64 and item["index"].ndim == 0


def test_cat_max_ratio(tmp_path):
    labels = np.zeros((100, 100), dtype=np.int64)
    labels[:, :30] = 1  # a 50-px crop has <= 75% of class 0 only when it starts within 17 px of the left
    labels[60:70] = 255  # ignored pixels do not count

    def honoured(ratio: float) -> int:
        t = TrainTransforms(crop=50, scale=None, cat_max_ratio=ratio, flip=False, photometric=False)
        ds = SegTrainDataset([colour_coded(tmp_path, labels)], identity, ["r", "g", "b", "y"], t)
        count = 0
        for seed in range(30):
            label = ds[(0, seed)]["label"]
            counts = torch.bincount(label[label != 255], minlength=2)
            count += int(counts.max() / counts.sum() <= 0.75)
        return count

    assert honoured(0.75) >= 28 and honoured(1.0) <= 20


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return write_synthetic_pascal5i_shapes(tmp_path_factory.mktemp("shapes"), 24, 20, size=(48, 48), seed=1)


def test_seeded_samples_are_reproducible_anywhere(shapes_root):
    ds = build_pascal5i_train(shapes_root, 0, TrainTransforms(crop=32))
    torch.manual_seed(0)
    first = digest(ds[(3, 1234)])
    state = torch.get_rng_state()
    torch.manual_seed(99)
    torch.rand(7)
    assert digest(ds[(3, 1234)]) == first
    torch.manual_seed(0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    ds[(3, 1234)]
    assert torch.equal(torch.get_rng_state(), state)
    assert len({digest(ds[(3, seed)]) for seed in range(6)}) == 6  # other seeds, other crops
    # DataLoader workers (other processes and global RNG states) give the same tensors
    keys = [(i, 1000 + i) for i in range(4)] + [(3, 1234)]
    loader = DataLoader(ds, batch_size=1, sampler=keys, num_workers=2)
    assert [digest({k: v[0] for k, v in b.items()}) for b in loader] == [digest(ds[k]) for k in keys]
    # ... and so does a fresh interpreter
    code = (
        "import hashlib, sys, torch; from vocabseg.data.pascal5i import build_pascal5i_train; "
        "from vocabseg.data.train import TrainTransforms; torch.manual_seed(5); "
        "item = build_pascal5i_train(sys.argv[1], 0, TrainTransforms(crop=32))[(3, 1234)]; "
        "print(hashlib.sha256(item['image'].numpy().tobytes() + item['label'].numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(shapes_root)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == first


def test_batches_stack(shapes_root):
    ds = build_pascal5i_train(shapes_root, 1, TrainTransforms(crop=32))
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2]
    values = set(batch["label"].unique().tolist())
    assert values <= set(range(16)) | {255} and 15 in values


def stored(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(LAYOUT.label_path(root, image_id)))


def test_derived_training_images(tmp_path):
    root = write_synthetic_pascal5i_shapes(tmp_path, 30, 20, size=(32, 32))
    train_ids = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    seen = seen_classes(2)
    expected = [i for i in train_ids if np.isin(stored(root, i), seen).any()]
    assert 0 < len(expected) < len(train_ids)  # some images show only held-out classes
    with (root / "ImageSets/Segmentation/train_aug.txt").open("a") as f:
        f.write("2007_000000\n2008_000000\n")  # a val image, and a duplicate
    ds = build_pascal5i_train(root, 2, TrainTransforms(crop=32))
    assert [s.id for s in ds.samples] == expected and any("train_aug.txt" in n for n in ds.notes)
    # without train_aug.txt: VOC's train.txt
    (root / "ImageSets/Segmentation/train_aug.txt").unlink()
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in train_ids[:10]))
    ds = build_pascal5i_train(root, 2, TrainTransforms(crop=32))
    assert [s.id for s in ds.samples] == [i for i in expected if i in train_ids[:10]]


def test_hsnet_training_lists(tmp_path):
    root = write_synthetic_pascal5i_shapes(tmp_path, 30, 20, size=(32, 32), hsnet_lists=True)
    lines = {k: (root / f"splits/pascal/trn/fold{k}.txt").read_text().split() for k in range(4)}
    expected = sorted({ln.split("__")[0] for k in (0, 1, 3) for ln in lines[k]})
    extra = [ln for ln in lines[2] if ln.split("__")[0] not in expected]  # images of the held-out fold only
    assert extra
    (root / "splits/pascal/trn/fold3.txt").write_text("\n".join([*lines[3], "2007_000001__16"]) + "\n")  # val
    ds = build_pascal5i_train(root, 2, TrainTransforms(crop=32))
    assert [s.id for s in ds.samples] == expected  # one sample per image, no val image
    assert any("HSNet lists" in n for n in ds.notes) and any("dropped 1 images" in n for n in ds.notes)
    (root / "splits/pascal/trn/fold0.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"incomplete.*fold0.txt"):
        build_pascal5i_train(root, 2, TrainTransforms(crop=32))
    # an explicit pairs file must not name a held-out class
    (root / "pairs.txt").write_text("2008_000001__12\n")  # class 12 (dog) is in fold 2
    with pytest.raises(DatasetLayoutError, match=r"pairs.txt:1: expected '<image>__<class>'"):
        build_pascal5i_train(root, 2, TrainTransforms(crop=32), pairs_file=root / "pairs.txt")
    (root / "pairs.txt").write_text("2008_000001__01\n2008_000002__20\n2008_000001__03\n")
    ds = build_pascal5i_train(root, 2, TrainTransforms(crop=32), pairs_file=root / "pairs.txt")
    assert [s.id for s in ds.samples] == ["2008_000001", "2008_000002"]
    with pytest.raises(DatasetLayoutError, match="pairs list not found: expected a file at"):
        build_pascal5i_train(root, 2, TrainTransforms(crop=32), pairs_file=root / "nope.txt")


def test_targets_seen_background_and_unseen(tmp_path):
    root = write_synthetic_pascal5i_shapes(tmp_path, 1, 1, size=(8, 8))
    raw = np.array([[0, 1, 6, 255], [5, 7, 20, 0]])  # fold 0 holds out 1..5; 6..20 are seen
    write_sample(LAYOUT, root, "2008_000000", np.zeros((2, 4, 3), np.uint8), raw)
    ds = build_pascal5i_train(root, 0, TrainTransforms(crop=4))
    assert ds.class_names[:3] == ["bus", "car", "cat"] and len(ds.class_names) == 15
    assert ds.vocabulary.classes[-1].names[0] == "tv monitor" and ds.background_index == 15
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), [[15, 255, 0, 255], [255, 1, 14, 15]])
    ds = build_pascal5i_train(root, 0, TrainTransforms(crop=4), unseen="background")
    np.testing.assert_array_equal(ds.read_label(ds.samples[0]), [[15, 15, 0, 255], [15, 1, 14, 15]])
    assert ds.describe()["background_index"] == 15 and ds.describe()["transforms"]["crop"] == 4
    assert fold_classes(0) == [c for c in range(1, 21) if c not in seen_classes(0)]
    write_sample(LAYOUT, root, "2008_000000", np.zeros((2, 4, 3), np.uint8), np.full((2, 4), 21))
    with pytest.raises(DatasetLayoutError, match=r"2008_000000.png has label value\(s\) that map to \[-1\]"):
        ds[0]
    (root / "JPEGImages/2008_000000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetLayoutError, match=r"2008_000000.jpg: unreadable image"):
        ds[0]


def test_training_layout_errors(tmp_path):
    root = write_synthetic_pascal5i_shapes(tmp_path, 4, 2, size=(16, 16))
    (root / "ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"no training list.*train_aug.txt.*train.txt"):
        build_pascal5i_train(root, 0, TrainTransforms(crop=16))
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000000\n2007_000001\n")  # val images only
    with pytest.raises(DatasetLayoutError, match="no training images"):
        build_pascal5i_train(root, 0, TrainTransforms(crop=16))
    (root / "SegmentationClassAug").rename(root / "labels")
    with pytest.raises(DatasetLayoutError, match=r"SegmentationClassAug/ \(labels\)"):
        build_pascal5i_train(root, 0, TrainTransforms(crop=16))


def test_benchmark_train_split(tmp_path):
    root = write_synthetic("voc21", tmp_path, num_images=3)
    with pytest.raises(DatasetLayoutError, match=r"ImageSets/Segmentation/train.txt \(split list\)"):
        build_dataset("voc21", root, split="train")
    (root / "ImageSets/Segmentation/train.txt").write_text("2008_000002\n2008_000000\n")
    ds = build_dataset("voc21", root, split="train")
    assert [s.id for s in ds.samples] == ["2008_000000", "2008_000002"] and "train split" in ds.description
    assert [s.id for s in build_dataset("voc21", root).samples] == ["2008_000000", "2008_000001", "2008_000002"]
    with pytest.raises(DatasetLayoutError, match="no 'test' split"):
        build_dataset("voc20", root, split="test")
    with pytest.raises(DatasetLayoutError, match="no 'train' split"):
        build_dataset("pascal5i-0", root, split="train")
    train = SegTrainDataset.from_benchmark(ds, TrainTransforms(crop=24))
    assert train.class_names[0] == "background" and train.background_index == 0 and len(train) == 2
    assert set(train[(1, 0)]["label"].unique().tolist()) <= set(range(21)) | {255}
