"""Training recipes as data: frozen dataclasses, a registry, dotted overrides and a JSON round trip.

A recipe says everything that decides a run's result (model, data, optimiser, schedule, batch,
precision, seed), so the resolved recipe written to ``OUT/recipe.json`` is enough to reproduce or
resume a run. Every field is checked against its annotated type when a recipe is built (directly,
from JSON or through ``with_overrides``), so a typo or a wrong type fails at the command line, with
the field's name, instead of hours into a run.

>>> r = get_recipe("my-recipe").with_overrides(["optim.lr=1e-4", "data.options.fold=2"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from .._names import lookup
from ..errors import VocabsegError
from .optim import AMP_DTYPES, OPTIMIZERS, SCHEDULES

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "Recipe",
    "RecipeError",
    "RESUMABLE_CHANGES",
    "register_recipe",
    "get_recipe",
    "list_recipes",
    "recipe_differences",
]

#: recipe fields a resumed run may change: they do not alter the training already done
RESUMABLE_CHANGES = frozenset(
    {"max_iters", "log_every", "checkpoint_every", "keep_last", "val_every", "summary", "reference", "data.num_workers"}
)


class RecipeError(VocabsegError, ValueError):
    """A recipe field with an unknown name, a wrong type or an out-of-range value."""


# -- type checking against the annotations --------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any JSON value"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp`` (JSON lists to tuples, ints to floats), or a RecipeError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if tp is Any:
        try:  # normalised through JSON, so to_dict/from_dict round-trips exactly
            return json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: {value!r} is not JSON-serialisable.") from None
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where)
            except RecipeError:
                continue
        raise bad
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return tp.from_dict(value, where=where)
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r}).")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeError(f"{where}: keys must be strings, got {k!r}.")
            out[k] = _coerce(v, value_type, f"{where}.{k}")
        return out
    raise TypeError(f"recipe field {where} has an unsupported annotation {tp!r}")  # a bug in this module


def _plain(value: Any) -> Any:
    """A JSON-ready copy: dataclasses to dicts, tuples to lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0]
    return tp


def _unknown_key(key: str, valid: Iterable[str], where: str) -> RecipeError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return RecipeError(f"Unknown recipe key {where!r}.{hint} Valid keys here: {', '.join(valid)}.")


class _Config:
    """Type coercion at construction, ``from_dict``/``to_dict`` for every recipe dataclass."""

    _path: ClassVar[str] = ""  # where the dataclass sits in a recipe, for messages

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], self._where(f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _where(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _validate(self) -> None:
        pass

    def _check(self, ok: bool, name: str, requirement: str) -> None:
        if not ok:
            raise RecipeError(f"{self._where(name)} {requirement}, got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); :meth:`from_dict` inverts it."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None) -> Any:
        """Build from a dict as :meth:`to_dict` writes it; unknown or missing keys are errors."""
        where = cls._path if where is None else where
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where or 'recipe'}: expected an object, got {data!r}.")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                raise _unknown_key(key, names, f"{where}.{key}" if where else key)
        required = [
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise RecipeError(f"{where or 'recipe'}: missing required key(s) {', '.join(missing)}.")
        return cls(**dict(data))


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Config):
    """Which trained method, on which CLIP, with which method options."""

    _path: ClassVar[str] = "model"
    method: str
    clip_model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    options: dict[str, Any] = field(default_factory=dict)

    def _validate(self) -> None:
        self._check(bool(self.method), "method", "must name a method")


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Config):
    """Training set and augmentation; ``options`` carries dataset options such as ``fold``."""

    _path: ClassVar[str] = "data"
    dataset: str
    crop: int
    scale: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    num_workers: int = 2
    options: dict[str, Any] = field(default_factory=dict)

    def _validate(self) -> None:
        self._check(bool(self.dataset), "dataset", "must name a dataset")
        self._check(self.crop > 0, "crop", "must be > 0")
        self._check(0 < self.scale[0] <= self.scale[1], "scale", "must be (low, high) with 0 < low <= high")
        self._check(0 < self.cat_max_ratio <= 1, "cat_max_ratio", "must be in (0, 1]")
        self._check(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Config):
    """Optimiser by name; ``lr_mult``/``wd_mult`` scale the rate and decay of named parameter groups.

    ``momentum`` is used by ``sgd`` only.
    """

    _path: ClassVar[str] = "optim"
    name: str = "adamw"
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    lr_mult: dict[str, float] = field(default_factory=dict)
    wd_mult: dict[str, float] = field(default_factory=dict)

    def _validate(self) -> None:
        self._check(self.name in OPTIMIZERS, "name", f"must be one of {', '.join(OPTIMIZERS)}")
        self._check(self.lr > 0, "lr", "must be > 0")
        self._check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        self._check(self.eps > 0, "eps", "must be > 0")
        self._check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        self._check(all(m >= 0 for m in self.lr_mult.values()), "lr_mult", "must hold values >= 0")
        self._check(all(m >= 0 for m in self.wd_mult.values()), "wd_mult", "must hold values >= 0")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig(_Config):
    """Per-iteration learning-rate schedule: linear warm-up, then cosine, poly or constant."""

    _path: ClassVar[str] = "schedule"
    name: str = "cosine"
    warmup_iters: int = 0
    warmup_start_factor: float = 1e-3
    min_lr: float = 0.0
    power: float = 0.9

    def _validate(self) -> None:
        self._check(self.name in SCHEDULES, "name", f"must be one of {', '.join(SCHEDULES)}")
        self._check(self.warmup_iters >= 0, "warmup_iters", "must be >= 0")
        self._check(0 < self.warmup_start_factor <= 1, "warmup_start_factor", "must be in (0, 1]")
        self._check(self.min_lr >= 0, "min_lr", "must be >= 0")
        self._check(self.power > 0, "power", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class Recipe(_Config):
    """Everything that decides a training run's result. ``batch_size`` is per process.

    The effective batch is ``batch_size × world size × grad_accum``; one iteration is one optimiser
    step. ``reference`` says where the settings come from (paper, official config).
    """

    name: str
    summary: str = ""
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_iters: int
    batch_size: int
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    amp: str = "none"
    ema_decay: float | None = None
    checkpoint_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    val_every: int | None = None
    seed: int = 0
    reference: str = ""

    def _validate(self) -> None:
        self._check(bool(self.name), "name", "must not be empty")
        self._check(self.max_iters > 0, "max_iters", "must be > 0")
        self._check(self.batch_size > 0, "batch_size", "must be > 0")
        self._check(self.grad_accum > 0, "grad_accum", "must be > 0")
        self._check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm", "must be > 0 or null")
        self._check(self.amp in AMP_DTYPES, "amp", f"must be one of {', '.join(AMP_DTYPES)}")
        self._check(self.ema_decay is None or 0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) or null")
        self._check(self.checkpoint_every > 0, "checkpoint_every", "must be > 0")
        self._check(self.keep_last > 0, "keep_last", "must be > 0")
        self._check(self.log_every > 0, "log_every", "must be > 0")
        self._check(self.val_every is None or self.val_every > 0, "val_every", "must be > 0 or null")
        self._check(self.seed >= 0, "seed", "must be >= 0")
        if self.schedule.min_lr > self.optim.lr:
            raise RecipeError(f"schedule.min_lr ({self.schedule.min_lr}) is above optim.lr ({self.optim.lr}).")

    @property
    def flat(self) -> dict[str, Any]:
        """``{"optim.lr": 1e-4, ...}``: every leaf by dotted path (dict entries included)."""
        return _flatten(self.to_dict())

    def with_overrides(self, overrides: Iterable[str]) -> Recipe:
        """A copy with ``"dotted.key=value"`` overrides applied; values are parsed as JSON when they can be.

        ``"optim.lr=1e-4"``, ``"data.options.fold=2"``, ``"optim.lr_mult.clip=0.01"``,
        ``"model.pretrained=null"``. Unknown keys and values of the wrong type are errors naming the key.
        """
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise RecipeError(f"Override {item!r} is not of the form key=value (e.g. optim.lr=1e-4).")
            _set_path(data, key, raw.strip())
        return Recipe.from_dict(data)


def _set_path(data: dict[str, Any], key: str, raw: str) -> None:
    parts = key.split(".")
    node: dict[str, Any] = data
    tp: Any = Recipe
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                level = ".".join(parts[:i]) or "the top level"
                raise RecipeError(
                    _unknown_key(part, names, here).args[0].replace("Valid keys here", f"Valid keys at {level}")
                )
            field_type = _hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            field_type = typing.get_args(tp)[1]
        elif tp is Any and isinstance(node, dict):
            field_type = Any
        else:
            raise RecipeError(f"Override {key!r}: {'.'.join(parts[:i])} is a single value, not a group of keys.")
        if i == len(parts) - 1:
            node[part] = _parse_value(raw, field_type, here)
            return
        child = node.get(part)
        inner = _strip_optional(field_type)
        if child is None and (typing.get_origin(inner) is dict or inner is Any):
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"Override {key!r}: {here} is a single value, not a group of keys.")
        node, tp = child, inner


def _parse_value(raw: str, tp: Any, where: str) -> Any:
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    try:
        value = _coerce(parsed, tp, where)
    except RecipeError:
        if isinstance(parsed, str):
            raise
        try:
            value = _coerce(raw, tp, where)  # e.g. name=123 for a string field
        except RecipeError:
            raise _coerce_error(parsed, tp, where) from None
    return _plain(value)


def _coerce_error(value: Any, tp: Any, where: str) -> RecipeError:
    try:
        _coerce(value, tp, where)
    except RecipeError as exc:
        return exc
    raise AssertionError("unreachable")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted path; an empty dict has no leaves (so ``{}`` and a missing dict compare equal)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def recipe_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every leaf that differs between two recipe dicts."""
    a, b = _flatten(dict(old)), _flatten(dict(new))
    missing = object()
    diff = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            diff[k] = (None if va is missing else va, None if vb is missing else vb)
    return diff


# -- registry -----------------------------------------------------------------------------------------

_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Add a recipe under its name (``replace=True`` to overwrite one)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe takes a Recipe, got {type(recipe).__name__}")
    if recipe.name in _RECIPES and not replace:
        raise RecipeError(f"A recipe named {recipe.name!r} is already registered.")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; an unknown name raises UnknownNameError with suggestions."""
    return lookup(_RECIPES, name, "recipe")


def list_recipes() -> list[str]:
    """Names of the registered recipes, sorted."""
    return sorted(_RECIPES)
