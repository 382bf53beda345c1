"""Caption shards and a toy caption model for the streaming-trainer checks (``harness.py`` setups).

Shards are written as img2dataset writes them (webdataset's ``TarWriter``: ``{key}.jpg``, ``{key}.txt``,
``{key}.json``). Shard ``s`` holds flat-colour images of colour ``s`` captioned ``"shard s sample i"``,
so the toy model can learn the shard from the image, and count from the captions which shards it
trained on (``shard_hits``, kept in its checkpoints). The setups read the shard folder from the
environment variable ``CAPTION_SHARDS_DIR`` (the test writes it before starting the runs).
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch import Tensor, nn

from vocabseg.data.captions import CaptionShards, MultiCrop
from vocabseg.errors import CheckpointError
from vocabseg.train import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig

NUM_SHARDS, PER_SHARD = 6, 4


def colour(shard: int) -> tuple[int, int, int]:
    g = np.random.default_rng(1000 + shard)
    return tuple(int(v) for v in g.integers(0, 256, 3))


def jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (24, 30), noise: int = 0, seed: int = 0) -> bytes:
    pixels = np.empty((*size, 3), dtype=np.int64)
    pixels[:] = rgb
    if noise:
        pixels += np.random.default_rng(seed).integers(-noise, noise + 1, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(folder: Path, num_shards: int = NUM_SHARDS, per_shard: int = PER_SHARD) -> list[str]:
    """``folder/00000.tar`` ...: sample ``i`` of shard ``s`` has key ``{s:04d}{i:05d}`` and caption
    ``"shard s sample i"``. Returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                sink.write(
                    {
                        "__key__": f"{s:04d}{i:05d}",
                        "jpg": jpeg(colour(s), noise=8, seed=s * 100 + i),
                        "txt": f"shard {s} sample {i}",
                        "json": {"key": f"{s:04d}{i:05d}", "status": "success"},
                    }
                )
        paths.append(str(path))
    return paths


class SlowShards(CaptionShards):
    """Shards read with a delay per sample, so a run lasts long enough to be killed between checkpoints."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def _decode(self, *args: Any) -> Any:
        time.sleep(self.delay)
        return super()._decode(*args)


class ToyCaptionModel(nn.Module):
    """Pooled global and local views -> dropout -> a classifier of the caption's shard number."""

    def __init__(self, num_shards: int = NUM_SHARDS, seed: int = 0, dropout: float = 0.2):
        super().__init__()
        self.global_proj = nn.Linear(3, 16)
        self.local_proj = nn.Linear(3, 16)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, num_shards)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        self.register_buffer("shard_hits", torch.zeros(num_shards, dtype=torch.long))

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images, crops, captions = batch["image"], batch["local_crops"], batch["caption"]
        assert images.dim() == 4 and crops.dim() == 5 and len(captions) == images.shape[0]
        feats = torch.tanh(self.global_proj(images.mean((2, 3))) + self.local_proj(crops.mean((3, 4)).mean(1)))
        logits = self.head(self.drop(feats))
        target = torch.tensor([int(c.split()[1]) for c in captions], device=logits.device)
        self.shard_hits += torch.bincount(target, minlength=self.shard_hits.numel())
        loss = F.cross_entropy(logits, target)
        return {"loss": loss, "acc": (logits.argmax(1) == target).float().mean()}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "body": [*self.global_proj.parameters(), *self.local_proj.parameters()],
            "head": [*self.head.parameters()],
        }

    def checkpoint_config(self) -> dict[str, Any]:
        return {"method": "toy_caption"}

    def checkpoint_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        expected = self.checkpoint_state()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise CheckpointError(f"toy caption state mismatch: {sorted(set(state) ^ set(expected))}")
        self.load_state_dict(state)


def caption_recipe(**changes: Any) -> Recipe:
    base = Recipe(
        name="toy_captions",
        model=ModelConfig(method="toy_caption", pretrained=None),
        data=DataConfig(dataset="caption_shards", crop=16, scale=(0.4, 1.0), num_workers=0),
        optim=OptimConfig(lr=0.05, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_iters=2, min_lr=0.005),
        max_iters=16,
        batch_size=2,
        checkpoint_every=4,
        keep_last=10,
        log_every=1,
        seed=3,
    )
    return replace(base, **changes)


def shards(shuffle_buffer: int, delay: float = 0.0) -> SlowShards:
    folder = Path(os.environ["CAPTION_SHARDS_DIR"])
    paths = sorted(str(p) for p in folder.glob("*.tar"))
    crop = MultiCrop(global_size=16, local_size=8, num_local=2)
    return SlowShards(paths, crop, shuffle_buffer=shuffle_buffer, delay=delay)


def exact_setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, ToyCaptionModel, CaptionShards]:
    """No shuffle buffer and checkpoints at shard boundaries (a shard is 2 batches, checkpoints every 4
    steps): the shard-boundary resume is then exact, which ``check_sigkill_resume`` verifies. 16 steps
    cross into the second epoch (6 shards x 4 samples = 12 steps)."""
    recipe = caption_recipe(data=DataConfig(dataset="caption_shards", crop=16, scale=(0.4, 1.0), num_workers=workers))
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    data = shards(shuffle_buffer=1, delay=float(os.environ.get("CAPTION_DELAY", "0")))
    return recipe, ToyCaptionModel(data.num_shards), data


def buffered_setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, ToyCaptionModel, CaptionShards]:
    """A shuffle buffer of 6 samples: resume skips what the opened shards had left (not exact)."""
    recipe = caption_recipe(
        data=DataConfig(dataset="caption_shards", crop=16, scale=(0.4, 1.0), num_workers=workers),
        max_iters=int(os.environ.get("CAPTION_ITERS", "10")),
    )
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    data = shards(shuffle_buffer=6, delay=float(os.environ.get("CAPTION_DELAY", "0")))
    return recipe, ToyCaptionModel(data.num_shards), data
