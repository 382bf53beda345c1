"""One hasher for model weights, shared by the text-embedding cache and the evaluation records.

Caches keyed by weights must never serve results of *other* weights: fine-tuning, loading a
checkpoint or ``load_state_dict`` change tensors in place. Hashing ViT-B/16 costs about a second, so
the digest is memoised per module together with a cheap *version key* (every tensor's storage
pointer and autograd version counter, which PyTorch bumps on each in-place write, including
``copy_`` under ``no_grad`` and optimiser steps). Any change of the key recomputes the digest.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["weights_fingerprint", "hash_tensors"]

NameFilter = Callable[[str], bool]

_MEMO: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple, str]]] = weakref.WeakKeyDictionary()


def _named_tensors(module: nn.Module, keep: NameFilter | None) -> list[tuple[str, torch.Tensor]]:
    state = module.state_dict(keep_vars=True)
    return [(n, t) for n, t in sorted(state.items()) if isinstance(t, torch.Tensor) and (keep is None or keep(n))]


def _version_key(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple:
    key = []
    for name, t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference-mode tensors have no version counter: never memoise them
            version = object()
        key.append((name, t.data_ptr(), version, t.dtype, tuple(t.shape), t.device.type))
    return tuple(key)


def hash_tensors(tensors: Iterable[tuple[str, torch.Tensor]], digest_size: int = 16) -> str:
    """blake2b of names, dtypes, shapes and exact bytes (so a dtype change is a different hash)."""
    h = hashlib.blake2b(digest_size=digest_size)
    for name, tensor in tensors:
        t = tensor.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(module: nn.Module, keep: NameFilter | None = None, tag: str = "all") -> str:
    """A digest of ``module``'s parameters and buffers (those whose name ``keep`` accepts).

    ``tag`` names the filter for memoisation (two filters on one module must use two tags). The
    result is recomputed whenever any tensor was replaced or modified in place since the last call.
    """
    tensors = _named_tensors(module, keep)
    key = _version_key(tensors)
    memo = _MEMO.setdefault(module, {})
    cached = memo.get(tag)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hash_tensors(tensors)
    memo[tag] = (key, digest)
    return digest
