"""Prompt-ensembled text embeddings, cached on disk.

For every *name* (not class) all templates are encoded, each embedding is L2-normalised, the mean is
taken and L2-normalised again (the SCLIP-lineage text side); trained heads that aggregate per
template (CAT-Seg's cost volume) ask for the (K, P, D) per-template embeddings instead. Results are
cached in a safetensors file keyed by a fingerprint of the text tower's weights and by the
templates, so a second run with the same vocabulary encodes nothing, and different weights never
share entries. The fingerprint is re-checked on every call (cheaply, see
:mod:`vocabseg.models.fingerprint`), so weights changed by training or a checkpoint load are never
served stale embeddings. :meth:`TextEncoder.encode_with_grad` is the uncached path with gradients.

The disk cache is bounded (``$VOCABSEG_CACHE_MAX_MB``, 1 GiB by default): files are read-touched,
and the least recently used ones are deleted when a write takes the folder over the cap. Models
loaded with random weights (:func:`~vocabseg.models.clip.has_random_weights`) are cached in memory
only: such weights are mostly drawn anew by each run, so their files would pile up unread.

A prompt the tokenizer would cut at its context length (77 tokens for CLIP) is refused, naming the
class name: the truncated prompt would silently stand for another text.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from ..errors import SettingsError, VocabularyError
from ..io.files import atomic_write, evict_least_recently_used
from ..models.clip import has_random_weights
from ..models.fingerprint import weights_fingerprint
from .tower import encode_text_fast, pooled_positions

#: Encodings of more prompts than this show a progress bar on stderr (ADE-150 x 80 templates: 12,000).
PROGRESS_PROMPTS = 2_000
#: Default cap on the disk cache's total size, in MiB; ``$VOCABSEG_CACHE_MAX_MB`` overrides it.
DEFAULT_CACHE_MAX_MB = 1024
CACHE_MAX_ENV = "VOCABSEG_CACHE_MAX_MB"


def default_cache_dir() -> Path:
    """``$VOCABSEG_CACHE``, else ``$XDG_CACHE_HOME/vocabseg``, else ``~/.cache/vocabseg``."""
    if os.environ.get("VOCABSEG_CACHE"):
        return Path(os.environ["VOCABSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vocabseg"


def default_cache_max_bytes() -> int:
    """``$VOCABSEG_CACHE_MAX_MB`` (MiB; 0 keeps nothing on disk) in bytes, else 1 GiB."""
    raw = os.environ.get(CACHE_MAX_ENV, "").strip()
    if not raw:
        return DEFAULT_CACHE_MAX_MB * 2**20
    try:
        mib = float(raw)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib >= 0):
        raise SettingsError(f"{CACHE_MAX_ENV}={raw!r}: expected the text cache's size cap in MiB, a number >= 0.")
    return int(mib * 2**20)


def _abbreviated(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def check_prompt_lengths(tokenizer: Any, names: Sequence[str], templates: Sequence[str], tokens: torch.Tensor) -> None:
    """Refuse names whose prompt the tokenizer cut to its context length (``tokens``: the tokenized
    name-major prompts). A prompt is cut if tokenizing it with a longer context changes its first
    tokens (the end-of-text token moves out); only prompts that fill the context are re-tokenized."""
    context = tokens.shape[-1]
    full = torch.nonzero(tokens[:, -1] != 0).flatten().tolist()  # padding is token 0; a cut row has none
    if not full:
        return
    prompts = [templates[i % len(templates)].format(names[i // len(templates)]) for i in full]
    try:
        longer = tokenizer(prompts, context_length=2 * context)[:, :context]
    except TypeError:  # a custom tokenizer without open_clip's context_length: nothing to compare
        return
    cut = [i for i, same in zip(full, (longer == tokens[full]).all(dim=1).tolist()) if not same]
    if not cut:
        return
    too_long = list(dict.fromkeys(names[i // len(templates)] for i in cut))
    example = templates[cut[0] % len(templates)]
    raise VocabularyError(
        f"Class name {_abbreviated(too_long[0])!r} is too long: its prompt ({example!r}) takes more than "
        f"the text encoder's {context} tokens and would be cut off. Shorten it"
        + (f" (and {len(too_long) - 1} other name(s))" if len(too_long) > 1 else "")
        + " or use shorter templates (e.g. templates='name', --templates name)."
    )


def _digest(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def text_tower_fingerprint(clip: nn.Module) -> str:
    """A hash of every non-visual parameter and buffer (exact bytes, so dtype counts too) and of the
    kinds of modules that use them: the same weights under GELU and QuickGELU (open_clip's ``ViT-B-16``
    vs ``ViT-B-16-quickgelu``) give different embeddings."""
    kinds = sorted({type(m).__name__ for name, m in clip.named_modules() if not name.startswith("visual")})
    weights = weights_fingerprint(clip, keep=lambda name: not name.startswith("visual."), tag="text")
    return _digest(weights, *kinds)


class TextEncoder:
    """Encodes names with prompt ensembling; ``cache_dir=None`` disables the disk cache.

    ``last_encoded`` is the number of names the last :meth:`encode` call had to run through the
    text tower (0 when everything came from the cache). At most ``memory_entries`` embeddings are
    kept in memory (least recently used first out), and at most ``cache_max_bytes`` on disk (default:
    :func:`default_cache_max_bytes`; least recently used files first out), so a long-running server
    stays bounded.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        templates: Sequence[str],
        cache_dir: str | os.PathLike | None = None,
        prompts_per_batch: int = 256,
        memory_entries: int = 20_000,
        cache_max_bytes: int | None = None,
    ):
        self.clip = clip
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.prompts_per_batch = prompts_per_batch
        self.last_encoded = 0
        self.memory_entries = memory_entries
        self.cache_max_bytes = default_cache_max_bytes() if cache_max_bytes is None else cache_max_bytes
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_owner = ""  # the weights+templates key the in-memory entries belong to

    @property
    def key(self) -> str:
        """Identifies the current text-tower weights and templates (recomputed only after a change)."""
        return _digest(text_tower_fingerprint(self.clip), *self.templates)

    @property
    def cache_file(self) -> Path | None:
        return self._cache_path(self.key)

    def _cache_path(self, key: str) -> Path | None:
        """The file of ``key``; None without a disk cache, with a zero cap, or for random weights."""
        if self.cache_dir is None or self.cache_max_bytes <= 0 or has_random_weights(self.clip):
            return None
        return self.cache_dir / "text" / f"{key}.safetensors"

    def _check_memory(self) -> str:
        """The current key (weights are checked once per call); in-memory entries of other weights are dropped."""
        key = self.key
        if key != self._memory_owner:
            self._memory.clear()
            self._memory_owner = key
        return key

    @staticmethod
    def _read_disk(path: Path | None) -> dict[str, torch.Tensor]:
        if path is None or not path.is_file():
            return {}
        try:
            entries = load_file(path)
        except (SafetensorError, OSError):  # a corrupt cache is rebuilt, never trusted
            return {}
        with contextlib.suppress(OSError):  # a read-only cache still serves
            os.utime(path)  # recently used: evicted last
        return entries

    def _write_disk(self, path: Path | None, entries: dict[str, torch.Tensor]) -> None:
        if path is None:
            return
        blob = save({k: v.contiguous() for k, v in {**self._read_disk(path), **entries}.items()})
        if len(blob) > self.cache_max_bytes:  # this file alone outgrew the cap: start it again
            blob = save({k: v.contiguous() for k, v in entries.items()})
        if len(blob) > self.cache_max_bytes:
            return
        atomic_write(path, lambda f: f.write(blob))  # readers never see half a file
        self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used cache files until the folder is within ``cache_max_bytes``."""
        evict_least_recently_used(keep.parent, "*.safetensors", self.cache_max_bytes, keep)

    @torch.no_grad()
    def encode(self, names: Sequence[str], per_template: bool = False) -> torch.Tensor:
        """(len(names), D) float32 unit vectors, on the model's device; with ``per_template`` the
        (len(names), P, D) unit embeddings of each template instead of their normalised mean."""
        path = self._cache_path(self._check_memory())
        keys = [_digest("per_template", n) if per_template else _digest(n) for n in names]
        missing = [k for k in dict.fromkeys(keys) if k not in self._memory]
        if missing:
            self._memory.update({k: v for k, v in self._read_disk(path).items() if k in set(missing)})
        todo = [(n, k) for n, k in dict.fromkeys(zip(names, keys)) if k not in self._memory]
        self.last_encoded = len(todo)
        if todo:
            fresh = dict(zip([k for _, k in todo], self._encode_uncached([n for n, _ in todo], per_template)))
            self._memory.update(fresh)
            self._write_disk(path, fresh)
        device = next(self.clip.parameters()).device
        out = torch.stack([self._memory[k] for k in keys]).to(device)
        for k in keys:  # most recently used last; evict from the front
            self._memory.move_to_end(k)
        while len(self._memory) > max(self.memory_entries, len(set(keys))):
            self._memory.popitem(last=False)
        return out

    def encode_with_grad(self, names: Sequence[str], per_template: bool = False) -> torch.Tensor:
        """As :meth:`encode`, with gradients to the text tower and no cache (fine-tuned text towers)."""
        return self._embed(names, per_template)

    def _encode_uncached(self, names: Sequence[str], per_template: bool = False) -> torch.Tensor:
        return self._embed(names, per_template).cpu()

    def _embed(self, names: Sequence[str], per_template: bool) -> torch.Tensor:
        """Every name x template prompt through the text tower at its real length (exact, see
        :func:`~vocabseg.text.tower.encode_text_fast`). Prompts are sorted by that length before
        batching, so short prompts are not padded to a long neighbour's, and put back in order."""
        prompts = [t.format(n) for n in names for t in self.templates]
        device = next(self.clip.parameters()).device
        tokens = self.tokenizer(prompts)
        check_prompt_lengths(self.tokenizer, names, self.templates, tokens)
        positions = pooled_positions(self.clip, tokens)
        order = torch.arange(len(prompts)) if positions is None else torch.argsort(positions, stable=True)
        chunks = []
        with tqdm(
            total=len(prompts), unit="prompt", desc="text", file=sys.stderr, disable=len(prompts) <= PROGRESS_PROMPTS
        ) as bar:
            for start in range(0, len(prompts), self.prompts_per_batch):
                batch = tokens[order[start : start + self.prompts_per_batch]].to(device)
                chunks.append(F.normalize(encode_text_fast(self.clip, batch).float(), dim=-1))
                bar.update(len(batch))
        per_prompt = torch.cat(chunks)[torch.argsort(order).to(device)]  # back to name-major order
        per_prompt = per_prompt.reshape(len(names), len(self.templates), -1)
        return per_prompt if per_template else F.normalize(per_prompt.mean(dim=1), dim=-1)
