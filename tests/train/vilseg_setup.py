"""ViL-Seg on a tiny random CLIP and synthetic captioned shapes: the training checks' setup (``harness.py``)
and the data of the "it learns" test.

Images are coloured circles and squares on a grey background, captioned from what they show
("a red circle and a blue square"); samples come in the batch format of the caption datasets:
``image`` (3, S, S) the CLIP-normalised global view, ``local_crops`` (6, 3, s, s), ``caption``. The
layout is a function of the index, the crops' positions and a flip of the seed only, as the trainer's
exact-resume contract requires.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from vocabseg.methods import create_method
from vocabseg.models.clip import OPENAI_MEAN, OPENAI_STD, LoadedCLIP
from vocabseg.train import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}
SHAPES = ("circle", "square")
BACKGROUND = 0.5
#: tiny heads, so a step takes milliseconds
OPTIONS = dict(clusters=5, head_dim=64, head_hidden=64, head_bottleneck=16, trainable_blocks=2)


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    """``make_tiny_clip`` of tests/conftest.py (loaded from its file in a child process of the harness)."""
    conftest = sys.modules.get("conftest")
    if conftest is None or not hasattr(conftest, "make_tiny_clip"):
        spec = importlib.util.spec_from_file_location("conftest", Path(__file__).parents[1] / "conftest.py")
        conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conftest)
        sys.modules["conftest"] = conftest
    return conftest.make_tiny_clip(seed)


def draw(index: int, size: int, base_seed: int = 0) -> tuple[Tensor, Tensor, str]:
    """The image (3, S, S) in [0, 1], its label map (S, S) (0 = background, 1 + colour index) and its caption."""
    g = torch.Generator().manual_seed(base_seed * 1_000_003 + index)
    image = torch.full((3, size, size), BACKGROUND)
    label = torch.zeros(size, size, dtype=torch.long)
    names = list(COLOURS)
    colours = torch.randperm(len(names), generator=g)[:2].tolist()
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    parts = []
    for k, colour in enumerate(colours):
        shape = SHAPES[int(torch.randint(0, 2, (), generator=g))]
        r = int(torch.randint(size // 6, size // 4, (), generator=g))
        half = size // 2  # the two shapes sit in the left and right halves
        cy = int(torch.randint(r, size - r, (), generator=g))
        cx = k * half + int(torch.randint(r, half - r + 1, (), generator=g))
        inside = (
            (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if shape == "circle"
            else ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        )
        image[:, inside] = torch.tensor(COLOURS[names[colour]])[:, None]
        label[inside] = 1 + colour
        parts.append(f"a {names[colour]} {shape}")
    return image, label, " and ".join(parts)


def normalise(image: Tensor) -> Tensor:
    return (image - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


class CaptionedShapes(Dataset):
    """``dataset[(index, seed)]``: the batch format of the caption datasets, for ``n`` drawn images."""

    def __init__(self, n: int = 32, size: int = 128, crop: int = 48, crops: int = 6, base_seed: int = 0):
        self.n, self.size, self.crop, self.crops, self.base_seed = n, size, crop, crops, base_seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: Any) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        image, _, caption = draw(index, self.size, self.base_seed)
        aug = torch.Generator().manual_seed(seed)
        if torch.rand((), generator=aug) < 0.5:
            image = image.flip(-1)
        corners = torch.randint(0, self.size - self.crop + 1, (self.crops, 2), generator=aug).tolist()
        local = torch.stack([image[:, y : y + self.crop, x : x + self.crop] for y, x in corners])
        return {"image": normalise(image), "local_crops": normalise(local), "caption": caption}

    @staticmethod
    def collate_fn(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Tensors stacked, captions kept as a list of strings."""
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "local_crops": torch.stack([s["local_crops"] for s in samples]),
            "caption": [s["caption"] for s in samples],
        }


def labels_on_grid(label: Tensor, grid: int) -> Tensor:
    """The majority label of each grid cell, (grid, grid)."""
    cell = label.shape[-1] // grid
    onehot = F.one_hot(label, int(label.max()) + 1).permute(2, 0, 1).float()[None]
    return F.avg_pool2d(onehot, cell)[0].argmax(0)


@functools.cache
def tokenizer(context_length: int = 77) -> Any:
    """CLIP's BPE tokenizer (loading its vocabulary takes a second: once per process)."""
    return open_clip.SimpleTokenizer(context_length=context_length)


def build_model(seed: int = 0, **options: Any) -> torch.nn.Module:
    """The method on a tiny CLIP, prepared for training (tokenizer) as ``build_training`` would."""
    clip = tiny_clip(seed)
    torch.manual_seed(seed)
    model = create_method("vilseg", clip, **{**OPTIONS, **options})
    model.clip_identity = {"model": "vocabseg-test-tiny", "pretrained": None}
    model.store_clip = True  # random CLIP weights travel with the checkpoint, as with --pretrained none
    model.prepare_training(LoadedCLIP(clip, tokenizer(clip.context_length), OPENAI_MEAN, OPENAI_STD, "tiny"), None)
    return model.train()


def vilseg_recipe(**changes: Any) -> Recipe:
    base = Recipe(
        name="vilseg-test",
        summary="ViL-Seg on a tiny CLIP and captioned shapes",
        model=ModelConfig(method="vilseg", clip_model="vocabseg-test-tiny", pretrained=None, options=OPTIONS),
        data=DataConfig(dataset="captioned_shapes", crop=64, num_workers=0),
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=0.04, lr_mult={"clip": 0.1, "clip_no_decay": 0.1}),
        schedule=ScheduleConfig(name="cosine", warmup_iters=2),
        max_iters=9,
        batch_size=4,
        checkpoint_every=3,
        log_every=1,
        seed=3,
    )
    return replace(base, **changes)


def setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, torch.nn.Module, CaptionedShapes]:
    """The SIGKILL/resume run: random colour changes and flips (IIC), the EMA teacher and its centre all
    have to be restored exactly; gradient accumulation on top."""
    recipe = vilseg_recipe(grad_accum=2, data=DataConfig(dataset="captioned_shapes", crop=64, num_workers=workers))
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    return recipe, build_model(), CaptionedShapes(n=16, size=64, crop=32)
