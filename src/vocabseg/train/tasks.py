"""From a recipe to the three things the trainer needs: the model, the training data and validation.

Each training data source is registered by name (``DataConfig.dataset``) with the benchmark its
validation runs on, so a new method or dataset is one entry here, never an ``if`` in the trainer.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .._names import lookup
from ..data import captions, mask_train, semantic_train
from ..data.dataset import SegDataset
from ..data.train import SegTrainDataset, TrainTransforms
from ..errors import MethodOptionError
from ..methods import create_method, get_method_spec
from ..methods.trained import TrainedCLIPMethod
from ..models.clip import LoadedCLIP, load_clip
from .recipe import DataConfig, Recipe

__all__ = ["TRAIN_DATA", "TrainingSetup", "build_training", "build_model"]


def _pascal5i_train(config: DataConfig, data_root: str | os.PathLike, transforms: TrainTransforms) -> SegTrainDataset:
    from ..data.pascal5i import build_pascal5i_train

    options = dict(config.options)
    return build_pascal5i_train(
        data_root,
        int(options.get("fold", 0)),
        transforms,
        pairs_file=options.get("pairs_file"),
        unseen=options.get("unseen", "ignore"),
    )


def _pascal5i_val(config: DataConfig, data_root: str | os.PathLike) -> SegDataset:
    from ..data import build_dataset

    return build_dataset(f"pascal5i-{int(config.options.get('fold', 0))}", data_root)


class TrainData(NamedTuple):
    train: Callable[[DataConfig, str | os.PathLike, TrainTransforms], SegTrainDataset]
    validation: Callable[[DataConfig, str | os.PathLike], SegDataset] | None
    options: tuple[str, ...]  # the DataConfig.options keys it reads
    description: str


TRAIN_DATA: dict[str, TrainData] = {
    "pascal5i": TrainData(
        _pascal5i_train,
        _pascal5i_val,
        ("fold", "pairs_file", "unseen"),
        "PASCAL-5i leave-one-fold-out: train on the 15 seen classes, validate zero-shot on the fold's 5",
    ),
    "sa1b": TrainData(
        mask_train.sa1b_train,
        mask_train.mask_validation,
        mask_train.option_names(mask_train.build_sa1b_train),
        "SA-1B images with their class-free masks (PixelCLIP); validation optional (options val_dataset, val_root)",
    ),
    "dino_masks": TrainData(
        mask_train.dino_masks_train,
        mask_train.mask_validation,
        mask_train.option_names(mask_train.build_dino_masks_train),
        "any image folder with DINO k-means masks (PixelCLIP's label-free variant); validation optional as sa1b",
    ),
    "caption_csv": TrainData(
        captions.caption_list_train,
        None,
        captions.CAPTION_LIST_OPTIONS,
        "image-caption pairs listed in a 'path<TAB>caption' file (ViL-Seg); multi-crop views, no validation",
    ),
    "coco_captions": TrainData(
        captions.coco_captions_train,
        None,
        captions.COCO_CAPTIONS_OPTIONS,
        "COCO Captions train2017 (ViL-Seg small runs); multi-crop views, one caption per image drawn per sample",
    ),
    "caption_shards": TrainData(
        captions.caption_shards_train,
        None,
        captions.CAPTION_SHARDS_OPTIONS,
        "img2dataset WebDataset shards (CC3M/CC12M, ViL-Seg), streamed; resume is exact to the shard",
    ),
    "coco_stuff": TrainData(
        functools.partial(semantic_train.train_split, "coco_stuff"),
        functools.partial(semantic_train.val_split, "coco_stuff"),
        semantic_train.OPTIONS,
        "COCO-Stuff-171 train2017, all 171 classes (CAT-Seg, FGAseg); validation on COCO-Stuff val2017",
    ),
}


@dataclass
class TrainingSetup:
    model: TrainedCLIPMethod
    clip: LoadedCLIP
    dataset: SegTrainDataset
    validate: Callable[[nn.Module], dict[str, float]] | None


def build_model(recipe: Recipe, device: str | torch.device = "cpu") -> tuple[TrainedCLIPMethod, LoadedCLIP]:
    """The recipe's method on its base CLIP (``ModelConfig``), on ``device``, in training mode."""
    spec = get_method_spec(recipe.model.method)
    if not spec.trainable:
        raise MethodOptionError(f"Method {spec.name!r} is training-free: there is nothing to train.")
    clip = load_clip(recipe.model.clip_model, recipe.model.pretrained, device="cpu")  # warns if random
    with torch.random.fork_rng(devices=[]):  # the head's initialisation follows the recipe's seed
        torch.manual_seed(recipe.seed)
        model = create_method(spec.name, clip.model, **dict(recipe.model.options))
    model.clip_identity = {"model": recipe.model.clip_model, "pretrained": recipe.model.pretrained}
    # CLIP weights that cannot be rebuilt from a name and tag (random ones) travel with the checkpoint;
    # ``--pretrained none`` with a local-dir model stores the folder's weights the same way
    model.store_clip = recipe.model.pretrained is None
    return model.to(device).train(), clip


def build_training(
    recipe: Recipe,
    data_root: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    val_limit: int | None = None,
) -> TrainingSetup:
    """Model, training data (with the recipe's augmentation) and a validation function."""
    data = lookup(TRAIN_DATA, recipe.data.dataset, "training dataset")
    unknown = sorted(set(recipe.data.options) - set(data.options))
    if unknown:
        raise MethodOptionError(
            f"data.options {unknown} do not apply to {recipe.data.dataset!r}; it reads {list(data.options)}."
        )
    model, clip = build_model(recipe, device)
    transforms = TrainTransforms(
        crop=recipe.data.crop,
        scale=tuple(recipe.data.scale) if recipe.data.scale else None,
        cat_max_ratio=recipe.data.cat_max_ratio,
        flip=recipe.data.flip,
        photometric=recipe.data.photometric,
        mean=clip.mean,
        std=clip.std,
    )
    dataset = data.train(recipe.data, data_root, transforms)
    model.prepare_training(clip, dataset)
    validate = None
    if data.validation is not None and recipe.val_every:
        val_set = data.validation(recipe.data, data_root)
        validate = _validator(model, clip, val_set, device, val_limit)
    return TrainingSetup(model, clip, dataset, validate)


def _validator(
    model: TrainedCLIPMethod, clip: LoadedCLIP, dataset: SegDataset, device: str | torch.device, limit: int | None
) -> Callable[[nn.Module], dict[str, float]]:
    """Validation through the evaluation harness (paper protocol), on the in-memory model."""

    def validate(_: nn.Module) -> dict[str, float]:
        from ..eval import evaluate
        from ..segmenter import Segmenter

        was_training = model.training
        try:
            seg = Segmenter(
                method=model, model=clip.model, tokenizer=clip.tokenizer, device=device, text_cache_dir=None
            )
            result = evaluate(seg, dataset, protocol="paper", limit=limit, progress=False, shard=False)
        finally:
            model.train(was_training)
        return {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}

    return validate
