"""Checkpoints that survive a kill at any moment: safetensors + JSON in a directory published by rename.

A checkpoint directory holds

- ``model.safetensors``: ``model.checkpoint_state()``;
- ``config.json``: ``model.checkpoint_config()`` plus ``format_version``, ``step`` and ``recipe`` (name);
- ``trainer_state.safetensors``: optimiser tensors under stable keys (``optimizer.state.<param>.<key>``),
  RNG states (``rng.torch``, ``rng.cuda.<i>``) and the EMA shadow (``ema.<name>``);
- ``trainer_state.json``: step, data position, scheduler, optimiser hyper-parameters, loss scaler,
  Python/NumPy RNG states, world size, effective batch, recipe, best validation score;
- ``manifest.json``: size and sha256 of every other file, written last.

There is no pickle anywhere (nothing is loaded with ``torch.load``). Files are written into a hidden
temporary directory next to the target, fsynced, and the directory is renamed into place, so a
checkpoint is either complete or absent; the manifest additionally catches a copy that was torn or
corrupted later. Replacing an existing directory (``checkpoint-last``, ``checkpoint-best``) renames
the old one aside first, then the new one in.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.optim import Optimizer

from ..errors import CheckpointError
from ..methods.weights import CONFIG_FILE, FORMAT_VERSION, MANIFEST_FILE, MODEL_FILE, file_digest, verify_manifest

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "CONFIG_FILE",
    "TRAINER_TENSORS_FILE",
    "TRAINER_STATE_FILE",
    "MANIFEST_FILE",
    "LAST",
    "BEST",
    "checkpoint_name",
    "write_checkpoint",
    "copy_checkpoint",
    "read_checkpoint",
    "verify_checkpoint",
    "numbered_checkpoints",
    "find_resume_checkpoint",
    "load_resume_checkpoint",
    "prune_checkpoints",
    "remove_stale",
    "optimizer_to_flat",
    "optimizer_from_flat",
    "capture_rng",
    "restore_rng",
]

TRAINER_TENSORS_FILE = "trainer_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
LAST = "checkpoint-last"
BEST = "checkpoint-best"
_NUMBERED = re.compile(r"^checkpoint-(\d{8,})$")
_STALE_PREFIXES = (".tmp-checkpoint", ".old-checkpoint")
_RESERVED_CONFIG_KEYS = ("format_version", "step", "recipe")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


# -- writing ------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it, briefly)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: Any, *, indent: int | None = 1) -> None:
    path.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n")
    _fsync_file(path)


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # a CPU copy per tensor: safetensors refuses tensors that share storage or are not contiguous
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # as readable as any other file the user writes
    _fsync_file(path)


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    _write_json(folder / MANIFEST_FILE, {"format_version": FORMAT_VERSION, "files": files})


def _publish(fill: Callable[[Path], None], target: Path) -> Path:
    """Build a directory with ``fill(tmp)`` next to ``target`` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_checkpoint(
    target: str | os.PathLike,
    *,
    model_state: dict[str, Tensor],
    config: dict[str, Any],
    step: int,
    recipe: str,
    trainer_tensors: dict[str, Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint directory at ``target`` atomically (replacing one that is there)."""
    clash = [k for k in _RESERVED_CONFIG_KEYS if k in config]
    if clash:
        raise ValueError(f"checkpoint_config() must not use the keys {clash}: the trainer writes them")
    full_config = {**config, "format_version": FORMAT_VERSION, "step": step, "recipe": recipe}

    def fill(tmp: Path) -> None:
        _write_tensors(tmp / MODEL_FILE, model_state)
        _write_json(tmp / CONFIG_FILE, full_config)
        if trainer_tensors is not None:
            _write_tensors(tmp / TRAINER_TENSORS_FILE, trainer_tensors)
        if trainer_state is not None:
            state = {**trainer_state, "format_version": FORMAT_VERSION, "step": step}
            _write_json(tmp / TRAINER_STATE_FILE, state, indent=None)
        _write_manifest(tmp)  # last: its presence means every file above is complete

    return _publish(fill, Path(target))


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Publish a copy of ``source`` at ``target`` atomically; files are hard links where possible."""
    source = Path(source)

    def fill(tmp: Path) -> None:
        for p in sorted(source.iterdir()):
            if not p.is_file():
                continue
            try:
                os.link(p, tmp / p.name)
            except OSError:
                shutil.copy2(p, tmp / p.name)
                _fsync_file(tmp / p.name)

    return _publish(fill, Path(target))


# -- reading ------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked against its manifest."""

    path: Path
    config: dict[str, Any]
    model_state: dict[str, Tensor]
    trainer_state: dict[str, Any] | None
    trainer_tensors: dict[str, Tensor] | None

    @property
    def step(self) -> int:
        return int(self.config.get("step", 0))

    @property
    def resumable(self) -> bool:
        return self.trainer_state is not None and self.trainer_tensors is not None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a complete, intact checkpoint; return its manifest or raise CheckpointError."""
    return verify_manifest(path)


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {folder}: {name} is not readable JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"Checkpoint {folder}: {name} does not hold a JSON object.")
    return data


def _read_tensors(folder: Path, name: str) -> dict[str, Tensor]:
    try:
        # copies, not views of a memory map: a file changed later must not change (or crash) a loaded state
        return {k: v.clone() for k, v in load_file(str(folder / name), device="cpu").items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint {folder}: {name} is not a readable safetensors file ({exc}).") from exc


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory (after checking its manifest unless ``verify=False``)."""
    folder = Path(path)
    listed = (verify_checkpoint(folder) if verify else _read_json(folder, MANIFEST_FILE)).get("files", {})
    has_trainer = TRAINER_STATE_FILE in listed and TRAINER_TENSORS_FILE in listed
    return Checkpoint(
        path=folder,
        config=_read_json(folder, CONFIG_FILE),
        model_state=_read_tensors(folder, MODEL_FILE),
        trainer_state=_read_json(folder, TRAINER_STATE_FILE) if has_trainer else None,
        trainer_tensors=_read_tensors(folder, TRAINER_TENSORS_FILE) if has_trainer else None,
    )


# -- the layout of a run folder -----------------------------------------------------------------------


def numbered_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``checkpoint-<step>`` directories in ``out``, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NUMBERED.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _candidates(out: Path) -> list[Path]:
    ranked = [(step, 1, p) for step, p in numbered_checkpoints(out)]
    last = out / LAST
    if last.is_dir():
        try:
            step = int(json.loads((last / CONFIG_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = -1  # unreadable: tried last, and reported as invalid then
        ranked.append((step, 0, last))
    return [p for _, _, p in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)]


def _newest_valid(out: Path, load: bool) -> tuple[Path, Checkpoint | None] | None:
    problems = []
    for path in _candidates(out):
        try:
            if not load:
                verify_checkpoint(path)
                return path, None
            ckpt = read_checkpoint(path)
            if not ckpt.resumable:
                raise CheckpointError(f"Checkpoint {path} holds no trainer state, so training cannot resume from it.")
            return path, ckpt
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"Skipping a damaged checkpoint: {exc}", stacklevel=3)
    if problems:
        raise CheckpointError(
            f"No valid checkpoint in {out}; all {len(problems)} are damaged:\n  " + "\n  ".join(problems)
        )
    return None


def find_resume_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest valid checkpoint in run folder ``out``, skipping damaged ones with a warning.

    ``None`` when there is no checkpoint at all; CheckpointError when there are some but none is
    valid (silently starting over would throw the run away).
    """
    found = _newest_valid(Path(out), load=False)
    return None if found is None else found[0]


def load_resume_checkpoint(out: str | os.PathLike) -> Checkpoint | None:
    """Like :func:`find_resume_checkpoint`, but read the checkpoint (and require trainer state)."""
    found = _newest_valid(Path(out), load=True)
    return None if found is None else found[1]


def _remove_dir(path: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves a hidden leftover, not a half checkpoint."""
    aside = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:12]}"
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def prune_checkpoints(out: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` numbered checkpoints; return what was deleted."""
    numbered = numbered_checkpoints(out)
    doomed = [p for _, p in numbered[: max(0, len(numbered) - keep_last)]]
    for p in doomed:
        _remove_dir(p)
    return doomed


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes (hidden ``.tmp-checkpoint*``/``.old-checkpoint*`` dirs)."""
    out = Path(out)
    if not out.is_dir():
        return []
    stale = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(_STALE_PREFIXES)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


# -- optimiser and RNG state without pickle -------------------------------------------------------------


def optimizer_to_flat(optimizer: Optimizer, prefix: str = "optimizer.") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser's state into tensors (stable keys) and a JSON-serialisable rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}state.{pid}.{key}"] = value
            else:
                values.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": sd["param_groups"], "values": values, "class": type(optimizer).__name__}
    return tensors, json.loads(json.dumps(meta))  # fails here, not at write time, on a non-JSON value


def optimizer_from_flat(
    optimizer: Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any], prefix: str = "optimizer."
) -> None:
    """Load what :func:`optimizer_to_flat` produced into ``optimizer`` (which must have the same groups)."""
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(
            f"The checkpoint's optimiser is {meta.get('class')}, this run's is {type(optimizer).__name__}."
        )
    saved_groups, own_groups = meta["param_groups"], optimizer.param_groups
    layout = [(g.get("name"), len(g["params"])) for g in saved_groups]
    own_layout = [(g.get("name"), len(g["params"])) for g in own_groups]
    if layout != own_layout:
        raise CheckpointError(
            f"The checkpoint's optimiser has parameter groups {layout} (name, size); this model has {own_layout}."
        )
    groups = []
    for saved, own in zip(saved_groups, own_groups):
        group = dict(saved)
        for key, value in own.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        groups.append(group)
    state: dict[int, dict[str, Any]] = {}
    for pid, values in meta["values"].items():
        state.setdefault(int(pid), {}).update(values)
    head = f"{prefix}state."
    for key, tensor in tensors.items():
        if key.startswith(head):
            pid, _, name = key[len(head) :].partition(".")
            state.setdefault(int(pid), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's torch (CPU, CUDA), Python and NumPy RNG states as tensors + JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
    }
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when this process has as many devices)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
