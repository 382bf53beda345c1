"""CAT-Seg on a tiny random CLIP and learnable synthetic shapes: the training checks' setup (``harness.py``)
and the data of the "it learns" test.

Scenes are :func:`~vocabseg.data.synthetic.shapes_image` images (1-3 shapes, each VOC class a colour and a
stripe / checker texture, on a grey background texture): class 0 is the background, classes 1..4 four
VOC classes, 255 the one-pixel band along every outline (which CAT-Seg's loss trains as negatives). The
scenes are a function of the dataset's seed and index; augmentation (a horizontal flip) comes from the
sample seed only, as the trainer's exact-resume contract requires.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vocabseg.data.synthetic import shapes_image
from vocabseg.methods import create_method
from vocabseg.models.clip import OPENAI_MEAN, OPENAI_STD, LoadedCLIP, default_tokenizer
from vocabseg.text.vocabulary import Vocabulary
from vocabseg.train import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig

ASSETS = Path(__file__).parents[1] / "assets"
CLIP_NAME = "vocabseg-test-small"  # 2 blocks, width 96, patch 8: an 8×8 grid at 64 px
open_clip.add_model_config(ASSETS / f"{CLIP_NAME}.json")

#: class 0 and VOC classes 1..4, in label order
CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat")
#: tiny head sizes (a step takes tens of milliseconds); window 4 on the 8×8 grid, so the second Swin block
#: is shifted, and pad_len 8 > 5 classes, so the class attention sees padding tokens
OPTIONS: dict[str, Any] = dict(
    feature_grid=8,
    window=4,
    hidden_dim=16,
    heads=2,
    appearance_guidance_dim=8,
    text_guidance_dim=8,
    pad_len=8,
    decoder_dims=(16, 16),
    decoder_guidance_dims=(16, 8),
    decoder_guidance_proj_dims=(8, 4),
)


class Shapes(Dataset):
    """``dataset[(index, seed)]``: ``image`` (3, S, S) CLIP-normalised, ``label`` (S, S) in 0..4 or 255."""

    vocabulary = Vocabulary.from_list(CLASSES)

    def __init__(self, n: int = 16, size: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
        self.images, self.labels = [], []
        for _ in range(n):
            classes = rng.choice(np.arange(1, len(CLASSES)), size=int(rng.integers(1, 4)), replace=False)
            image, label = shapes_image([int(c) for c in classes], (size, size), rng, min_pixels=16)
            self.images.append((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std)
            self.labels.append(torch.from_numpy(label))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: Any) -> dict[str, Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        image, label = self.images[index], self.labels[index]
        if torch.rand((), generator=torch.Generator().manual_seed(seed)) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image, "label": label}


def small_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(CLIP_NAME, pretrained=None).eval()


def build_model(seed: int = 0, **options: Any) -> torch.nn.Module:
    """CAT-Seg on the small CLIP, prepared for training (tokenized class prompts) as ``build_training`` does."""
    clip = small_clip(seed)
    torch.manual_seed(seed)
    model = create_method("catseg", clip, **{**OPTIONS, **options})
    model.clip_identity = {"model": CLIP_NAME, "pretrained": None}
    model.store_clip = True  # random CLIP weights travel with the checkpoint, as with --pretrained none
    model.prepare_training(LoadedCLIP(clip, default_tokenizer(clip), OPENAI_MEAN, OPENAI_STD, "small"), Shapes(n=1))
    return model.train()


def catseg_recipe(**changes: Any) -> Recipe:
    """The official optimiser (AdamW, weight decay 1e-4, CLIP at lr × 0.01, full-model clipping at 0.01)
    with a higher learning rate for a short run."""
    base = Recipe(
        name="catseg-test",
        summary="CAT-Seg on a tiny CLIP and synthetic shapes",
        model=ModelConfig(method="catseg", clip_model=CLIP_NAME, pretrained=None, options=OPTIONS),
        data=DataConfig(dataset="shapes", crop=64, num_workers=0),
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4, lr_mult={"clip": 0.01}),
        schedule=ScheduleConfig(name="cosine", warmup_iters=2),
        max_iters=9,
        batch_size=4,
        clip_grad_norm=0.01,
        checkpoint_every=3,
        log_every=1,
        seed=3,
    )
    return replace(base, **changes)


def setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, torch.nn.Module, Shapes]:
    """The SIGKILL/resume and DDP runs: gradient accumulation, clipping and CLIP's Q/V training in both towers."""
    recipe = catseg_recipe(grad_accum=2, data=DataConfig(dataset="shapes", crop=64, num_workers=workers))
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    return recipe, build_model(), Shapes(n=16)


def seen_miou(model: torch.nn.Module, dataset) -> float:
    """mIoU over the 5 classes (argmax of the logits), on ``dataset``'s unflipped images."""
    model.eval()
    cm = torch.zeros(5, 5, dtype=torch.long)
    with torch.no_grad():
        text = model.encode_class_text()
        for i in range(len(dataset)):
            sample = dataset[(i, 1)]
            pred = model.logits(sample["image"][None], text)[0].argmax(0)
            gt = sample["label"]
            valid = gt != 255
            cm += torch.bincount(gt[valid] * 5 + pred[valid], minlength=25).view(5, 5)
    model.train()
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag()).clamp(min=1)
    return float(iou.mean())


class TrainingClasses:
    """A training dataset as ``prepare_training`` sees it (its vocabulary)."""

    def __init__(self, classes: list[str]):
        self.vocabulary = Vocabulary.from_list(classes)


def prepared(model: torch.nn.Module, classes=("cat; kitty", "dog", "sofa")) -> torch.nn.Module:
    """``model`` after ``prepare_training`` on a dataset of ``classes`` (tokenized prompts kept)."""
    clip = model.clip
    loaded = LoadedCLIP(clip, default_tokenizer(clip), OPENAI_MEAN, OPENAI_STD, "tiny")
    model.prepare_training(loaded, TrainingClasses(list(classes)))
    return model
