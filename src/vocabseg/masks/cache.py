"""Masks cached per image, so evaluating several methods runs the (slow) mask generator once.

Entries are keyed by the image's content (:func:`~vocabseg.masks.base.image_digest`: shape, dtype,
pixels) and the generator's ``identity`` (weights and options), so another picture, other weights
or other thresholds are a miss, never stale masks. Masks are kept bit-packed (8 pixels a byte): in
memory in a least-recently-used table bounded in bytes, and optionally on disk as one safetensors
file per image, written atomically and bounded like the text cache (least recently used files go
first). Generators whose identity means nothing in another process (``persistent`` False: random
weights, unnamed callables) are cached in memory only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from ..io.files import atomic_write, evict_least_recently_used
from .base import MaskGenerator, as_masks, check_image, image_digest

__all__ = ["CachedMasks"]

#: Default bound of the in-memory entries, in bytes of packed masks (~2 MB per 512 x 683 image
#: with 50 masks).
DEFAULT_MEMORY_BYTES = 256 * 2**20

_Packed = tuple[tuple[int, int, int], np.ndarray]  # (M, H, W), bits


def _pack(masks: np.ndarray) -> _Packed:
    return (masks.shape[0], masks.shape[1], masks.shape[2]), np.packbits(masks.reshape(-1))


def _unpack(entry: _Packed) -> np.ndarray:
    shape, bits = entry
    count = shape[0] * shape[1] * shape[2]
    return np.unpackbits(bits, count=count).reshape(shape).astype(bool)


class CachedMasks:
    """A :class:`~vocabseg.masks.base.MaskGenerator` that remembers the masks of each image.

    Args:
        generator: the generator whose masks are cached.
        memory_bytes: bound of the in-memory entries (packed bytes); 0 keeps nothing in memory.
        cache_dir: folder for the disk entries (a ``masks`` sub-folder is used); None: memory only.
        disk_max_bytes: bound of the disk entries' total size (default: the text cache's cap,
            ``$VOCABSEG_CACHE_MAX_MB``).

    ``hits`` and ``misses`` count the calls served from a cache and those that ran the generator.
    """

    def __init__(
        self,
        generator: MaskGenerator,
        *,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        cache_dir: str | os.PathLike | None = None,
        disk_max_bytes: int | None = None,
    ):
        from ..text.encoder import default_cache_max_bytes

        self.generator = generator
        self.memory_bytes = memory_bytes
        self.folder = Path(cache_dir) / "masks" if cache_dir is not None else None
        self.disk_max_bytes = default_cache_max_bytes() if disk_max_bytes is None else disk_max_bytes
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, _Packed] = OrderedDict()
        self._memory_used = 0

    @property
    def identity(self) -> str:
        return self.generator.identity

    @property
    def persistent(self) -> bool:
        return self.generator.persistent

    def key(self, image: np.ndarray) -> str:
        """The entry of ``image`` under the generator's current identity."""
        return hashlib.sha1(f"{self.generator.identity}\n{image_digest(image)}".encode()).hexdigest()

    def _disk_path(self, key: str) -> Path | None:
        if self.folder is None or self.disk_max_bytes <= 0 or not self.generator.persistent:
            return None
        return self.folder / f"{key}.safetensors"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        key = self.key(image)
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
        else:
            entry = self._read(self._disk_path(key), (h, w))
            if entry is not None:
                self._remember(key, entry)
        if entry is not None:
            self.hits += 1
            return _unpack(entry)
        self.misses += 1
        masks = as_masks(self.generator(image), (h, w), f"mask generator {self.generator.identity}")
        entry = _pack(masks)
        self._remember(key, entry)
        self._write(self._disk_path(key), entry)
        return masks

    def clear(self) -> None:
        """Forget the in-memory entries (the disk entries stay)."""
        self._memory.clear()
        self._memory_used = 0

    def _remember(self, key: str, entry: _Packed) -> None:
        size = entry[1].nbytes
        if size > self.memory_bytes:
            return
        self._memory[key] = entry
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_used -= dropped[1].nbytes

    @staticmethod
    def _read(path: Path | None, size: tuple[int, int]) -> _Packed | None:
        """A disk entry, or None when absent, unreadable or not for an image of ``size``."""
        if path is None or not path.is_file():
            return None
        try:
            tensors = load(path.read_bytes())
            m, h, w = (int(v) for v in tensors["shape"])
            bits = tensors["bits"]
        except (SafetensorError, OSError, KeyError, ValueError):  # a damaged entry is rebuilt, never trusted
            return None
        if (h, w) != size or bits.dtype != np.uint8 or bits.size != (m * h * w + 7) // 8:
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves
            os.utime(path)  # recently used: evicted last
        return (m, h, w), bits

    def _write(self, path: Path | None, entry: _Packed) -> None:
        if path is None:
            return
        shape, bits = entry
        blob = save({"shape": np.asarray(shape, dtype=np.int64), "bits": bits})
        if len(blob) > self.disk_max_bytes:
            return
        atomic_write(path, lambda f: f.write(blob))  # readers never see half a file
        evict_least_recently_used(path.parent, "*.safetensors", self.disk_max_bytes, path)
