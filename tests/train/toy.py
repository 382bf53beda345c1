"""A toy trainable segmentation model and dataset for the trainer tests (also used by ``toy_run.py``).

The dataset is a fixed set of images (layout from the index) whose augmentation (flip, noise) comes
only from the sample seed, as the trainer's contract requires. The model has a frozen stem (like a
frozen CLIP), two named trainable groups, dropout (so resume must restore randomness) and a stateful
buffer (so checkpoints must store buffers).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vocabseg.errors import CheckpointError
from vocabseg.train import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig

COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


class ToySegDataset(Dataset):
    """Coloured rectangles on a background; each pixel's class is its (noisy) colour."""

    def __init__(self, n: int = 24, size: int = 16, base_seed: int = 0, noise: float = 0.8):
        self.n, self.size, self.base_seed, self.noise = n, size, base_seed, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: Any) -> dict[str, Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        layout = torch.Generator().manual_seed(self.base_seed * 1_000_003 + index)
        s = self.size
        label = torch.full((s, s), int(torch.randint(0, 3, (), generator=layout)), dtype=torch.long)
        for _ in range(2):
            y, x = torch.randint(0, s - 4, (2,), generator=layout).tolist()
            h, w = torch.randint(3, s // 2, (2,), generator=layout).tolist()
            label[y : y + h, x : x + w] = int(torch.randint(0, 3, (), generator=layout))
        aug = torch.Generator().manual_seed(seed)
        image = COLOURS[label].permute(2, 0, 1) + self.noise * torch.randn(3, s, s, generator=aug)
        if torch.rand((), generator=aug) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image, "label": label}


class ToySegModel(nn.Module):
    """frozen 1x1 stem -> 3x3 conv body -> dropout -> 1x1 head, trained with cross-entropy."""

    def __init__(self, seed: int = 0, width: int = 8, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = nn.Conv2d(3, width, 3, padding=1)
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(width, 3, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        self.stem.requires_grad_(False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.options = {"width": width, "dropout": dropout}

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.drop(F.relu(self.body(self.stem(image)))))

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self(batch["image"])
        self.seen += batch["image"].shape[0]
        loss = F.cross_entropy(logits, batch["label"])
        return {"loss": loss, "acc": (logits.argmax(1) == batch["label"]).float().mean()}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"body": list(self.body.parameters()), "head": list(self.head.parameters())}

    def checkpoint_config(self) -> dict[str, Any]:
        return {"method": "toy", "options": dict(self.options)}

    def checkpoint_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("stem.")}

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        expected = self.checkpoint_state()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise CheckpointError(f"toy state mismatch: {sorted(set(state) ^ set(expected))}")
        self.load_state_dict(state, strict=False)


@torch.no_grad()
def pixel_accuracy(model: nn.Module, dataset: Dataset) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        pred = model(sample["image"][None]).argmax(1)[0]
        correct += int((pred == sample["label"]).sum())
        total += sample["label"].numel()
    model.train(was_training)
    return correct / total


def toy_recipe(**changes: Any) -> Recipe:
    base = Recipe(
        name="toy",
        summary="toy segmentation for tests",
        model=ModelConfig(method="toy", pretrained=None),
        data=DataConfig(dataset="toy", crop=16, num_workers=0),
        optim=OptimConfig(lr=0.05, weight_decay=1e-4, lr_mult={"body": 0.5}),
        schedule=ScheduleConfig(name="cosine", warmup_iters=2, min_lr=0.005),
        max_iters=12,
        batch_size=4,
        checkpoint_every=3,
        keep_last=2,
        log_every=1,
        seed=7,
    )
    return replace(base, **changes)


def toy_resume_setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, ToySegModel, ToySegDataset]:
    """The SIGKILL/resume check's run (see ``harness.py``): accumulation, EMA, clipping and dropout."""
    recipe = toy_recipe(
        grad_accum=2,
        ema_decay=0.9,
        clip_grad_norm=1.0,
        data=DataConfig(dataset="toy", crop=16, num_workers=workers),
    )
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    return recipe, ToySegModel(seed=0), ToySegDataset(n=24)


def toy_ddp_setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, ToySegModel, ToySegDataset]:
    """The DDP check's run: no dropout (its draws differ per rank) and no clipping."""
    recipe = toy_recipe(batch_size=batch_size or 2, grad_accum=2, max_iters=6, checkpoint_every=6, clip_grad_norm=None)
    return recipe, ToySegModel(seed=0, dropout=0.0), ToySegDataset(n=24)
