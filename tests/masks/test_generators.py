"""User callables, fixed masks, the registry and the per-image cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocabseg.errors import SettingsError, UnknownNameError, VocabsegError
from vocabseg.masks import (
    MASK_GENERATORS,
    CachedMasks,
    CallableMasks,
    FixedMasks,
    MaskGenerator,
    MaskGeneratorError,
    create_mask_generator,
)

H, W = 9, 13  # not multiples of 8: packed bits must round-trip exactly


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _halves() -> np.ndarray:
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, :, :6] = True
    masks[1, :, 6:] = True
    return masks


# -- callables ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "convert",
    [
        lambda m: list(m),  # list of bool arrays
        lambda m: [torch.from_numpy(x) for x in m],  # list of tensors
        lambda m: m.astype(np.uint8),  # one (M, H, W) 0/1 array
        lambda m: torch.from_numpy(m.astype(np.float32)),  # one 0./1. tensor
    ],
)
def test_callable_accepts_the_usual_forms(convert):
    generator = CallableMasks(lambda image: convert(_halves()))
    masks = generator(_image())
    assert masks.dtype == bool and np.array_equal(masks, _halves())


def test_callable_with_no_masks_gives_an_empty_array():
    masks = CallableMasks(lambda image: [])(_image())
    assert masks.shape == (0, H, W) and masks.dtype == bool


def wrong_size(image):
    return [np.ones((H, W), bool), np.ones((H, W + 1), bool)]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (wrong_size, r"mask generator wrong_size: mask 1 has shape \(9, 14\) but the image is \(9, 13\)"),
        (lambda image: [np.full((H, W), 255, np.uint8)], r"holds values other than 0 and 1 \(255\).*`mask > 0`"),
        (lambda image: None, r"returned NoneType; expected a list of \(9, 13\) binary masks"),
        (lambda image: np.ones((H, W), bool), r"returned ndarray of shape \(9, 13\)"),
        (lambda image: [np.ones((1, H, W), bool)], r"mask 0 is shape \(1, 9, 13\); each mask must be a 2-D"),
        (lambda image: [np.full((H, W), "a")], r"mask 0 has dtype <U1; masks must be boolean"),
    ],
)
def test_callable_outputs_are_checked_with_a_clear_message(fn, message):
    with pytest.raises(MaskGeneratorError, match=message) as info:
        CallableMasks(fn)(_image())
    assert isinstance(info.value, VocabsegError)


def test_images_must_be_rgb_uint8():
    with pytest.raises(
        MaskGeneratorError, match=r"take an \(H, W, 3\) uint8 RGB array; got ndarray of shape \(9, 13\)"
    ):
        CallableMasks(lambda image: [])(np.zeros((H, W), np.uint8))
    with pytest.raises(MaskGeneratorError, match="dtype float32"):
        CallableMasks(lambda image: [])(np.zeros((H, W, 3), np.float32))
    with pytest.raises(MaskGeneratorError, match="needs a function image -> masks; got 3"):
        CallableMasks(3)


def test_callable_identity_is_persistent_only_when_named():
    unnamed, named = CallableMasks(lambda image: []), CallableMasks(lambda image: [], identity="my-segmenter-v2")
    assert not unnamed.persistent and named.persistent and named.identity == "callable:my-segmenter-v2"
    assert CallableMasks(unnamed.fn).identity != unnamed.identity  # two unnamed wrappers never share entries


# -- fixed masks -------------------------------------------------------------------------------------------------------
def test_fixed_masks_are_served_as_copies():
    generator = FixedMasks(_halves())
    first = generator(_image())
    first[:] = False
    assert np.array_equal(generator(_image(1)), _halves())
    assert FixedMasks(list(_halves())).identity == generator.identity != FixedMasks(_halves()[:1]).identity


def test_fixed_masks_refuse_images_of_another_size_and_may_be_empty():
    with pytest.raises(MaskGeneratorError, match=r"the masks are \(9, 13\) but the image is \(4, 4\)"):
        FixedMasks(_halves())(np.zeros((4, 4, 3), np.uint8))
    assert FixedMasks([])(np.zeros((4, 5, 3), np.uint8)).shape == (0, 4, 5)


# -- registry ----------------------------------------------------------------------------------------------------------
def test_registry_builds_every_generator_by_name():
    assert set(MASK_GENERATORS) == {"sam", "sam2", "callable", "fixed"}
    fixed = create_mask_generator("fixed", masks=_halves())
    assert isinstance(fixed, MaskGenerator) and np.array_equal(fixed(_image()), _halves())
    assert isinstance(create_mask_generator("callable", fn=lambda image: [], identity="x"), CallableMasks)


def test_registry_refuses_unknown_names_and_missing_options():
    with pytest.raises(UnknownNameError, match=r"Unknown mask generator 'sam3'\. Did you mean 'sam', 'sam2'"):
        create_mask_generator("sam3")
    with pytest.raises(SettingsError, match="Mask generator 'callable' needs fn; it takes fn, identity=None"):
        create_mask_generator("callable")


# -- the cache ---------------------------------------------------------------------------------------------------------
class Counting:
    """A generator that counts its calls; masks depend on the image so mix-ups show."""

    def __init__(self, identity: str = "counting-v1", persistent: bool = True):
        self.calls = 0
        self.identity = identity
        self.persistent = persistent

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.stack([image[..., 0] > 127, image[..., 1] > 127, image[..., 2] > 200])


def test_cache_hits_by_image_content_and_misses_on_another_image():
    generator = Counting()
    cached = CachedMasks(generator)
    image = _image()
    first = cached(image)
    again = cached(image.copy())  # another array, same pixels
    other = cached(_image(1))
    assert (cached.hits, cached.misses, generator.calls) == (1, 2, 2)
    assert np.array_equal(first, again) and np.array_equal(first, generator(image))
    assert not np.array_equal(first, other)


def test_cache_misses_when_the_generator_identity_changes():
    generator = Counting()
    cached = CachedMasks(generator)
    cached(_image())
    generator.identity = "counting-v2"  # other weights or thresholds
    cached(_image())
    assert (cached.hits, cached.misses) == (0, 2)


def test_memory_entries_are_bounded_least_recently_used_first():
    generator = Counting(persistent=False)
    per_entry = len(np.packbits(np.zeros(3 * H * W, bool)))
    cached = CachedMasks(generator, memory_bytes=2 * per_entry)
    a, b, c = _image(0), _image(1), _image(2)
    cached(a), cached(b), cached(a), cached(c)  # c evicts b, the least recently used
    cached(a)
    assert (cached.hits, cached.misses) == (2, 3)
    cached(b)
    assert cached.misses == 4
    assert CachedMasks(Counting(), memory_bytes=0)._memory_used == 0


def test_disk_entries_serve_a_new_process_and_survive_damage(tmp_path):
    image = _image()
    first = CachedMasks(Counting(), cache_dir=tmp_path)
    expected = first(image)
    files = list((tmp_path / "masks").glob("*.safetensors"))
    assert len(files) == 1

    generator = Counting()
    later = CachedMasks(generator, cache_dir=tmp_path)  # an empty memory: as in another process
    assert np.array_equal(later(image), expected) and generator.calls == 0 and later.hits == 1

    files[0].write_bytes(b"not a safetensors file")
    damaged = CachedMasks(Counting(), cache_dir=tmp_path)
    assert np.array_equal(damaged(image), expected) and damaged.misses == 1
    assert CachedMasks(generator, cache_dir=tmp_path)(image) is not None and generator.calls == 0  # rewritten


def test_no_disk_entries_for_generators_without_a_lasting_identity(tmp_path):
    cached = CachedMasks(CallableMasks(lambda image: [image[..., 0] > 0]), cache_dir=tmp_path)
    cached(_image())
    assert not list(tmp_path.rglob("*.safetensors"))


def test_disk_entries_are_bounded(tmp_path):
    cached = CachedMasks(Counting(), cache_dir=tmp_path, disk_max_bytes=1)
    cached(_image(0))
    cached(_image(1))
    assert len(list((tmp_path / "masks").glob("*.safetensors"))) == 0  # each entry alone is over the cap
    roomy = CachedMasks(Counting(), cache_dir=tmp_path, disk_max_bytes=10**6)
    for seed in range(3):
        roomy(_image(seed))
    size = next((tmp_path / "masks").glob("*.safetensors")).stat().st_size
    tight = CachedMasks(Counting(), cache_dir=tmp_path, disk_max_bytes=2 * size)
    tight(_image(3))
    assert len(list((tmp_path / "masks").glob("*.safetensors"))) == 2
