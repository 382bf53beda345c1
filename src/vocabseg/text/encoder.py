"""Prompt-ensembled text embeddings, cached on disk.

For every *name* (not class) all templates are encoded, each embedding is L2-normalised, the mean is
taken and L2-normalised again (the SCLIP-lineage text side). Results are cached in a safetensors
file keyed by a fingerprint of the text tower's weights and by the templates, so a second run with
the same vocabulary encodes nothing, and different weights never share entries.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..io.files import atomic_write


def default_cache_dir() -> Path:
    """``$VOCABSEG_CACHE``, else ``$XDG_CACHE_HOME/vocabseg``, else ``~/.cache/vocabseg``."""
    if os.environ.get("VOCABSEG_CACHE"):
        return Path(os.environ["VOCABSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vocabseg"


def _digest(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def text_tower_fingerprint(clip: nn.Module) -> str:
    """A hash of every non-visual parameter and buffer (exact bytes, so dtype counts too)."""
    h = hashlib.blake2b(digest_size=16)
    tensors = list(clip.named_parameters()) + list(clip.named_buffers())
    for name, tensor in sorted(tensors, key=lambda kv: kv[0]):
        if name.startswith("visual."):
            continue
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TextEncoder:
    """Encodes names with prompt ensembling; ``cache_dir=None`` disables the disk cache.

    ``last_encoded`` is the number of names the last :meth:`encode` call had to run through the
    text tower (0 when everything came from the cache). At most ``memory_entries`` embeddings are
    kept in memory (least recently used first out), so a long-running server stays bounded.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        templates: Sequence[str],
        cache_dir: str | os.PathLike | None = None,
        prompts_per_batch: int = 256,
        memory_entries: int = 20_000,
    ):
        self.clip = clip
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.prompts_per_batch = prompts_per_batch
        self.last_encoded = 0
        self.memory_entries = memory_entries
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_file: Path | None = None

    @property
    def cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        if self._cache_file is None:  # hashing the weights costs ~0.3 s for ViT-B: do it once
            key = _digest(text_tower_fingerprint(self.clip), *self.templates)
            self._cache_file = self.cache_dir / "text" / f"{key}.safetensors"
        return self._cache_file

    def _read_disk(self) -> dict[str, torch.Tensor]:
        path = self.cache_file
        if path is None or not path.is_file():
            return {}
        try:
            return load_file(path)
        except (SafetensorError, OSError):  # a corrupt cache is rebuilt, never trusted
            return {}

    def _write_disk(self, entries: dict[str, torch.Tensor]) -> None:
        path = self.cache_file
        if path is None:
            return
        merged = {k: v.contiguous() for k, v in {**self._read_disk(), **entries}.items()}
        atomic_write(path, lambda f: f.write(save(merged)))  # readers never see half a file

    @torch.no_grad()
    def encode(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), D) float32 unit vectors, on the model's device."""
        keys = [_digest(n) for n in names]
        missing = [k for k in dict.fromkeys(keys) if k not in self._memory]
        if missing:
            self._memory.update({k: v for k, v in self._read_disk().items() if k in set(missing)})
        todo = [n for n, k in dict.fromkeys(zip(names, keys)) if k not in self._memory]
        self.last_encoded = len(todo)
        if todo:
            fresh = dict(zip([_digest(n) for n in todo], self._encode_uncached(todo)))
            self._memory.update(fresh)
            self._write_disk(fresh)
        device = next(self.clip.parameters()).device
        out = torch.stack([self._memory[k] for k in keys]).to(device)
        for k in keys:  # most recently used last; evict from the front
            self._memory.move_to_end(k)
        while len(self._memory) > max(self.memory_entries, len(set(keys))):
            self._memory.popitem(last=False)
        return out

    def _encode_uncached(self, names: Sequence[str]) -> torch.Tensor:
        prompts = [t.format(n) for n in names for t in self.templates]
        device = next(self.clip.parameters()).device
        chunks = []
        for start in range(0, len(prompts), self.prompts_per_batch):
            tokens = self.tokenizer(prompts[start : start + self.prompts_per_batch]).to(device)
            chunks.append(F.normalize(self.clip.encode_text(tokens).float(), dim=-1))
        per_prompt = torch.cat(chunks).reshape(len(names), len(self.templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1).cpu()
