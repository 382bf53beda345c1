"""One hasher for model weights, shared by the text-embedding cache and the evaluation records.

Caches keyed by weights must never serve results of *other* weights: fine-tuning, loading a
checkpoint or ``load_state_dict`` change tensors in place. Hashing ViT-B/16 costs about a second, so
the digest is memoised per module together with a cheap *version key*: every tensor's storage
pointer and autograd version counter, which PyTorch bumps on each in-place write (including
``copy_`` under ``no_grad`` and optimiser steps), and an exact integer sum of its bit patterns,
which catches writes through ``.data`` (``p.data.add_(...)``, ``p.data.copy_(...)``): those bypass
the version counter. The sums cost one read of the weights and one device sync (on a CPU about a
fifth of the hash: ~60 ms for ViT-B/16's text tower). Any change of the key recomputes the digest.
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


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_sums(tensors: list[tuple[str, torch.Tensor]]) -> list:
    """Per tensor, the int64 sum of its elements' bit patterns (exact: any single changed element
    changes it), or a fresh ``object()`` (never equal: no memo) where that cannot be computed."""
    sums: list = [None] * len(tensors)
    per_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, (_, t) in enumerate(tensors):
        bits = _BITS.get(t.element_size())
        try:
            total = t.detach().view(bits).sum(dtype=torch.int64) if bits is not None else None
        except (RuntimeError, TypeError):  # complex128, quantised or otherwise exotic tensors
            total = None
        if total is None:
            sums[i] = object()
        else:
            per_device.setdefault(total.device, []).append((i, total))
    for totals in per_device.values():  # one device sync per device, not one per tensor
        for (i, _), value in zip(totals, torch.stack([s for _, s in totals]).tolist()):
            sums[i] = value
    return sums


def _version_key(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    key = []
    for (name, t), bit_sum in zip(tensors, _bit_sums(tensors)):
        try:
            version = t._version
        except RuntimeError:  # inference-mode tensors have no version counter: never memoise them
            version = object()
        key.append((name, t.data_ptr(), version, bit_sum, t.dtype, tuple(t.shape), t.device.type))
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
