"""The generic training engine: recipes, optimiser and schedule, EMA, checkpoints, data order, loop.

>>> from vocabseg.train import get_recipe, train
>>> result = train(get_recipe("NAME"), model, dataset, "runs/NAME", resume=True)  # doctest: +SKIP

Any model that implements :class:`~vocabseg.train.model.TrainableModel` trains here, as one process
or under ``torchrun`` (DDP); see :mod:`vocabseg.train.trainer` for what makes resume exact.
"""

from . import recipes  # noqa: E402, F401, I001  (registers the recipes; after the engine it uses)
from .checkpoint import Checkpoint, CheckpointError, find_resume_checkpoint, read_checkpoint
from .ema import EMA
from .model import TrainableModel, TrainingError
from .optim import build_optimizer, build_scheduler, lr_factor
from .recipe import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    RecipeError,
    ScheduleConfig,
    get_recipe,
    list_recipes,
    register_recipe,
)
from .sampler import ResumableDistributedSampler
from .trainer import TrainResult, train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DataConfig",
    "EMA",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RecipeError",
    "ResumableDistributedSampler",
    "ScheduleConfig",
    "TrainResult",
    "TrainableModel",
    "TrainingError",
    "build_optimizer",
    "build_scheduler",
    "find_resume_checkpoint",
    "get_recipe",
    "list_recipes",
    "lr_factor",
    "read_checkpoint",
    "register_recipe",
    "train",
]
