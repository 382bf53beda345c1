"""The contract between the trainer and a trained method, so one engine trains every method.

A method implements five methods (see :class:`TrainableModel`); the trainer never looks inside the
model otherwise. This keeps method code free of optimiser, checkpoint and distributed plumbing, and
keeps the trainer free of method-specific ``if`` chains.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ..errors import VocabsegError

__all__ = ["TrainableModel", "TrainingError", "check_trainable", "REQUIRED_METHODS"]

REQUIRED_METHODS = (
    "training_step",
    "param_groups",
    "checkpoint_config",
    "checkpoint_state",
    "load_checkpoint_state",
)


class TrainingError(VocabsegError, RuntimeError):
    """A training run that cannot start or go on: bad model contract, output folder conflict, NaN loss."""


@runtime_checkable
class TrainableModel(Protocol):
    """What :func:`vocabseg.train.train` needs from a model (which must also be an ``nn.Module``).

    - ``training_step(batch)``: the loss of one (micro-)batch as ``{"loss": 0-d tensor, ...}``; other
      0-d entries are logged. Use mean reductions, so that gradient accumulation and DDP's gradient
      average give the gradient of the whole effective batch.
    - ``param_groups()``: named groups of the trainable parameters, e.g. ``{"head": [...], "clip": [...]}``;
      a recipe scales each group's learning rate and weight decay by name.
    - ``checkpoint_config()``: JSON-serialisable facts needed to rebuild the model (``config.json``).
    - ``checkpoint_state()``: the tensors a checkpoint stores (trainable parameters and stateful buffers).
    - ``load_checkpoint_state(state)``: the inverse, strict about missing, unexpected or mis-shaped tensors.

    Optional: ``after_step(step)``, called (under ``no_grad``) once after every optimiser step, with
    the number of steps done, on every rank, before the trainer's EMA update: the place for state
    that follows the weights, such as a momentum teacher. Keep such state in ``checkpoint_state`` so
    a resumed run continues exactly.
    """

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...

    def checkpoint_config(self) -> dict[str, Any]: ...

    def checkpoint_state(self) -> dict[str, Tensor]: ...

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None: ...


def check_trainable(model: object) -> None:
    """Fail early, naming what is missing, instead of deep inside the first training step."""
    if not isinstance(model, nn.Module):
        raise TrainingError(f"The model to train must be a torch.nn.Module, got {type(model).__name__}.")
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(model, name, None))]
    if missing:
        raise TrainingError(
            f"{type(model).__name__} cannot be trained: it lacks {', '.join(missing)} "
            "(see vocabseg.train.model.TrainableModel)."
        )
