"""PixelCLIP on synthetic images whose objects are the masks (no labels), in the mask datasets' batch format:
the SIGKILL/resume check's setup (``harness.py``) and the data of the method's "it learns" test.

An image is a background of one texture kind with two rectangles of two other kinds (4 kinds: colour
plus stripes); its masks are its regions, as SA-1B gives them, with no kind attached. The teacher sees
the image with a little noise, the student the same pixels with a random per-channel gain and shift on
top (the strong view). Every random number comes from the sample's seed, as the trainer requires.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from vocabseg.data.mask_train import collate_masks
from vocabseg.methods import create_method
from vocabseg.models.clip import LoadedCLIP, default_tokenizer
from vocabseg.train import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig

ASSETS = Path(__file__).parents[1] / "assets"
SMALL_CLIP = "vocabseg-test-small"  # 2 blocks, width 96, patch 8: an 8×8 grid at 64 px
open_clip.add_model_config(ASSETS / f"{SMALL_CLIP}.json")

KINDS = 4
COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.25, 0.3, 0.9], [0.85, 0.8, 0.2]])
FREQUENCIES = (0.0, 0.5, 1.0, 1.6)


def texture(kind: int, size: int) -> Tensor:
    """(3, size, size): the kind's colour with stripes of its frequency (vertical or diagonal)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    stripes = torch.sin(FREQUENCIES[kind] * (xx + yy * (kind % 2)).float())
    return COLOURS[kind][:, None, None] + 0.25 * stripes


class SyntheticMaskDataset(Dataset):
    """``dataset[(index, seed)]``: the index fixes the layout, the seed the two views' noise and jitter."""

    def __init__(self, n: int = 64, size: int = 64, mask_size: int = 32, base_seed: int = 0):
        self.n, self.size, self.mask_size, self.base_seed = n, size, mask_size, base_seed

    def __len__(self) -> int:
        return self.n

    def layout(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """The clean image (3, S, S), its kind map (S, S) (for the tests' scores only), its region masks (m, S, S)."""
        g = torch.Generator().manual_seed(self.base_seed * 1_000_003 + index)
        s = self.size
        kinds = torch.randperm(KINDS, generator=g)[:3].tolist()
        label = torch.full((s, s), kinds[0])
        for kind in kinds[1:]:
            h, w = torch.randint(s // 4, s // 2, (2,), generator=g).tolist()
            y, x = int(torch.randint(0, s - h, (), generator=g)), int(torch.randint(0, s - w, (), generator=g))
            label[y : y + h, x : x + w] = kind
        image = torch.zeros(3, s, s)
        for kind in kinds:
            image = torch.where(label == kind, texture(kind, s), image)
        masks = torch.stack([label == k for k in kinds if (label == k).any()])
        return image, label, masks

    @staticmethod
    def view(image: Tensor, g: torch.Generator, strong: bool) -> Tensor:
        x = image + 0.05 * torch.randn(image.shape, generator=g)
        if strong:
            gain = 1 + 0.6 * (torch.rand(3, 1, 1, generator=g) - 0.5)
            shift = 0.3 * (torch.rand(3, 1, 1, generator=g) - 0.5)
            x = x * gain + shift
        return (x - 0.5) / 0.25

    def __getitem__(self, item: Any) -> dict[str, Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        image, _, masks = self.layout(index)
        g = torch.Generator().manual_seed(seed)
        small = F.interpolate(masks[None].float(), size=(self.mask_size,) * 2, mode="nearest")[0].bool()
        views = {"image": self.view(image, g, True), "teacher_image": self.view(image, g, False)}
        return {**views, "masks": small, "index": torch.tensor(index)}

    collate_fn = staticmethod(collate_masks)  # the mask datasets' batching: masks padded, mask_valid


def small_pixelclip(seed: int = 0, **options: Any) -> Any:
    """PixelCLIP on the small random CLIP, prepared for training (prompt template and teacher)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(SMALL_CLIP, pretrained=None).eval()
    model = create_method("pixelclip", clip, **{"resolution": 64, "num_clusters": KINDS, **options})
    model.clip_identity = {"model": SMALL_CLIP, "pretrained": None}
    model.store_clip = True  # random CLIP: its weights travel with the checkpoint
    model.prepare_training(LoadedCLIP(clip, default_tokenizer(clip), (0.5,) * 3, (0.25,) * 3, SMALL_CLIP), None)
    return model.train()


def pixelclip_recipe(**changes: Any) -> Recipe:
    """The official recipe's shape (AdamW, prompts ×10, clipping, cosine) at rates a random CLIP learns with."""
    base = Recipe(
        name="pixelclip-test",
        model=ModelConfig(method="pixelclip", clip_model=SMALL_CLIP, pretrained=None),
        data=DataConfig(dataset="synthetic-masks", crop=64, num_workers=0),
        optim=OptimConfig(lr=1e-3, weight_decay=1e-4, lr_mult={"prompts": 10.0}),
        schedule=ScheduleConfig(name="cosine", min_lr=5e-4),
        max_iters=6,
        batch_size=4,
        clip_grad_norm=1.0,
        checkpoint_every=3,
        log_every=1,
        seed=3,
    )
    return replace(base, **changes)


def pixelclip_resume_setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, Any, Dataset]:
    """The SIGKILL/resume check's run: the momentum teacher must resume exactly with the student."""
    recipe = pixelclip_recipe(data=DataConfig(dataset="synthetic-masks", crop=64, num_workers=workers))
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    return recipe, small_pixelclip(momentum=0.9), SyntheticMaskDataset(n=24)


def pixelclip_ddp_setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, Any, Dataset]:
    """The DDP check's run. Every synthetic image is covered by its masks, so each process's loss is a mean
    over the same number of pixels per image and DDP's gradient average is the whole batch's gradient;
    the all-reduced Sinkhorn sums give both processes the one-process clusters. SGD, not the recipe's
    AdamW with clipping at 0.01: Adam divides gradients near its ε by their own size, turning the float
    rounding of a split batch into weight differences of ~5e-5 (as fgaseg_setup.ddp_setup explains)."""
    recipe = pixelclip_recipe(batch_size=batch_size or 2, max_iters=4, checkpoint_every=4)
    optim = OptimConfig(name="sgd", lr=0.05, weight_decay=1e-4, lr_mult=dict(recipe.optim.lr_mult))
    recipe = replace(recipe, optim=optim, clip_grad_norm=None)
    return recipe, small_pixelclip(momentum=0.9), SyntheticMaskDataset(n=24)
