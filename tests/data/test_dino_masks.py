"""DINO k-means masks: k-means against a literal Lloyd iteration, determinism, upsampling, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vfm
from PIL import Image
from torch import nn

from vocabseg.data import dino_masks
from vocabseg.data.dino_masks import DINO_K, DinoMasks, cluster_map, kmeans, kmeans_plus_plus, upsample_labels
from vocabseg.errors import DatasetLayoutError


def brute_force_lloyd(x: np.ndarray, centroids: np.ndarray, iters: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lloyd with Python loops (float64): assign each point to its nearest centroid, move each
    centroid to its points' mean (an empty one stays), stop when the total movement is <= tol."""
    c = centroids.astype(np.float64).copy()

    def assign(c):
        return np.array([min(range(len(c)), key=lambda j: sum((p - c[j]) ** 2)) for p in x])

    for _ in range(iters):
        labels = assign(c)
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
        shift = sum(np.sqrt(((new[j] - c[j]) ** 2).sum()) for j in range(len(c)))
        c = new
        if shift <= tol:
            break
    return assign(c), c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_matches_a_literal_lloyd_iteration(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 5)) * 3
    x = np.concatenate([centres[i] + rng.normal(size=(15, 5)) for i in range(4)] + [rng.normal(size=(10, 5)) * 4])
    x = x.astype(np.float32)
    labels, centroids = kmeans(torch.from_numpy(x), 4, seed=seed)
    init = kmeans_plus_plus(torch.from_numpy(x), 4, torch.Generator().manual_seed(seed))
    expected_labels, expected_centroids = brute_force_lloyd(x.astype(np.float64), init.numpy(), 100, 1e-4)
    np.testing.assert_array_equal(labels.numpy(), expected_labels)
    np.testing.assert_allclose(centroids.numpy(), expected_centroids, atol=1e-5)
    assert len(np.unique(labels.numpy())) == 4


def test_kmeans_plus_plus_spreads_over_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    blobs = torch.from_numpy(np.concatenate([rng.normal(size=(20, 3)) * 0.01 + 100 * i for i in range(5)])).float()
    for seed in range(5):
        init = kmeans_plus_plus(blobs, 5, torch.Generator().manual_seed(seed))
        assert sorted((init[:, 0] / 100).round().int().tolist()) == [0, 1, 2, 3, 4]  # one per blob
    draws = {tuple(kmeans(blobs, 3, seed=s)[1].flatten().tolist()) for s in range(6)}
    assert len(draws) > 1  # the seed matters...
    a, b = kmeans(blobs, 3, seed=4), kmeans(blobs, 3, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # ...and fixes the result


def test_kmeans_edge_cases():
    x = torch.zeros(3, 2)  # fewer distinct points (and rows) than clusters
    labels, centroids = kmeans(x, 5)
    assert centroids.shape == (3, 2) and labels.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="k must be at least 1"):
        kmeans(x, 0)


def test_bilinear_argmax_upsampling():
    grid = torch.tensor([[0, 1], [2, 3]])
    up = upsample_labels(grid, (32, 32), 4)
    expected = grid.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(up, expected)
    corner = upsample_labels(torch.tensor([[0, 1], [1, 2]]), (32, 32), 3)
    assert corner[0, 0] == 0 and corner[31, 31] == 2
    assert corner[15, 15] == 1  # two neighbours of label 1 outweigh one of label 0: not nearest's 0
    stripe = torch.tensor([[0, 1, 0]])
    assert upsample_labels(stripe, (1, 9), 2).tolist() == [[0, 0, 0, 1, 1, 1, 0, 0, 0]]


def texture_image(seed: int = 0) -> np.ndarray:
    """48x64: a striped left part and a flat right part, with noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, size=(48, 64, 3), dtype=np.uint8)
    img[:, :32] += np.uint8(200) * (np.arange(32) % 4 < 2)[None, :, None].astype(np.uint8)
    img[:, 32:, 1] += 150
    return img


def test_cluster_map_is_a_deterministic_partition(tiny_vfm):
    image = texture_image()
    labels = cluster_map(tiny_vfm, image, 4, input_size=64)
    assert labels.dtype == np.uint8 and labels.shape == (48, 64)
    assert 1 < len(np.unique(labels)) <= 4
    np.testing.assert_array_equal(labels, cluster_map(tiny_vfm, image, 4, input_size=64))
    masks = dino_masks.masks_from_map(labels)
    assert masks.dtype == bool and (masks.sum(0) == 1).all()
    assert DINO_K == 16 and dino_masks.DINO_VFM == "dino_vits16"


class CountingVFM(nn.Module):
    """The tiny VFM, counting forward calls."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.inner = make_tiny_vfm(seed)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(texture_image(0)).save(folder / "a.png")
    Image.fromarray(texture_image(1)).save(folder / "sub" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_dataset_samples_and_cache_reuse(images, tmp_path):
    cache = tmp_path / "cache"
    vfm = CountingVFM()
    data = DinoMasks(images, vfm, k=4, cache_dir=cache, input_size=64)
    assert [p.relative_to(images).as_posix() for p in data.images] == ["a.png", "sub/b.png"]
    first = data[0]
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (3, 48, 64)
    assert first["masks"].dtype == torch.bool and 1 < len(first["masks"]) <= 4
    assert (first["masks"].sum(0) == 1).all()
    np.testing.assert_array_equal(first["image"].permute(1, 2, 0).numpy(), texture_image(0))
    assert vfm.calls == 1 and len(list((cache / "dino_masks").glob("*.safetensors"))) == 1

    again = DinoMasks(images, vfm, k=4, cache_dir=cache, input_size=64)[0]  # a later epoch / process
    assert vfm.calls == 1 and torch.equal(again["masks"], first["masks"])
    assert data.build_cache() == 1 and vfm.calls == 2 and data.build_cache() == 0

    DinoMasks(images, vfm, k=3, cache_dir=cache, input_size=64)[0]  # another k: another entry
    assert vfm.calls == 3
    with torch.no_grad():
        next(vfm.parameters()).add_(1.0)  # other weights: never served the old masks
    DinoMasks(images, vfm, k=4, cache_dir=cache, input_size=64)[0]
    assert vfm.calls == 4 and len(list((cache / "dino_masks").glob("*.safetensors"))) == 4
    assert not list((cache / "dino_masks").glob(".*.tmp"))  # atomic writes leave no temporary file


def test_cache_is_keyed_by_content_and_corrupt_entries_are_recomputed(images, tmp_path):
    cache = tmp_path / "cache"
    vfm = CountingVFM()
    data = DinoMasks(images, vfm, k=4, cache_dir=cache, input_size=64)
    first = data[0]
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "renamed.png").write_bytes((images / "a.png").read_bytes())
    assert torch.equal(DinoMasks(copy, vfm, k=4, cache_dir=cache, input_size=64)[0]["masks"], first["masks"])
    assert vfm.calls == 1
    entry = data.cache_path((images / "a.png").read_bytes())
    entry.write_bytes(b"garbage")
    assert torch.equal(data[0]["masks"], first["masks"]) and vfm.calls == 2
    uncached = DinoMasks(images, vfm, k=4, cache_dir=None, input_size=64)
    uncached[0], uncached[0]
    assert vfm.calls == 4 and uncached.cache_path(b"x") is None and uncached.build_cache() == 0


def test_downscaled_images_get_masks_at_their_size(images, tmp_path):
    sample = DinoMasks(images, make_tiny_vfm(), k=4, cache_dir=None, input_size=32, max_short_side=24)[1]
    assert sample["image"].shape == (3, 24, 32) and sample["masks"].shape[1:] == (24, 32)


def test_errors(tmp_path, tiny_vfm):
    with pytest.raises(DatasetLayoutError, match="image folder not found"):
        DinoMasks(tmp_path / "missing", tiny_vfm)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match=r"no images \(.jpg, .jpeg"):
        DinoMasks(tmp_path, tiny_vfm)
    with pytest.raises(ValueError, match="k must be in 1..256"):
        DinoMasks(tmp_path, tiny_vfm, k=300)
