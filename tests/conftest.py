"""Shared fixtures: tiny random-weight CLIP and VFM models built from real architectures.

The environment is set before anything imports huggingface_hub: HF_HUB_OFFLINE is read at import
time, and without it every failed hub lookup retries for ~46 s.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["VOCABSEG_CACHE"] = tempfile.mkdtemp(prefix="vocabseg-test-cache-")
atexit.register(shutil.rmtree, os.environ["VOCABSEG_CACHE"], ignore_errors=True)

import json  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
TINY_CLIP = "vocabseg-test-tiny"  # 3 blocks, width 64, 2 heads, patch 16, native 64 px (4x4 grid)
# 2 blocks, width 96, patch 8, 96-d embeddings: random features still separate textures (training tests)
SMALL_CLIP = "vocabseg-test-small"

open_clip.add_model_config(ASSETS / f"{TINY_CLIP}.json")
open_clip.add_model_config(ASSETS / f"{SMALL_CLIP}.json")


def write_local_clip_dir(folder: Path, config: str, seed: int = 0) -> Path:
    """A ``local-dir:`` folder (open_clip_config.json + safetensors weights) of a random test model."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(config, pretrained=None)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ASSETS / f"{config}.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def make_tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(TINY_CLIP, pretrained=None)
    return model.eval()


_TINY_CATSEG = dict(
    feature_grid=4,
    window=2,
    hidden_dim=16,
    heads=2,
    appearance_guidance_dim=8,
    text_guidance_dim=8,
    pad_len=8,
    decoder_dims=(16, 16),
    decoder_guidance_dims=(16, 8),
    decoder_guidance_proj_dims=(8, 4),
)
#: ``create_method`` options that make each trained method small enough for the tiny CLIP
TINY_TRAINED_OPTIONS: dict[str, dict] = {
    "beyond_labels": dict(width=32, depth=1, heads=2, decoder_stages=2, fourier_frequencies=8),
    "catseg": _TINY_CATSEG,
    "fgaseg": _TINY_CATSEG,  # CAT-Seg's sizes: FGAseg is CAT-Seg plus modules
    "pixelclip": dict(resolution=64, num_clusters=4),
    "vilseg": dict(trainable_blocks=2, clusters=5, head_dim=64, head_hidden=64, head_bottleneck=16),
}


def make_tiny_vfm(seed: int = 0, patch: int = 8) -> torch.nn.Module:
    """A 2-block timm DINO-architecture ViT (random weights) wrapped as a vocabseg VFM."""
    import timm

    from vocabseg.models.vfm import TimmVFM

    torch.manual_seed(seed)
    name = f"vit_small_patch{patch}_224"
    model = timm.create_model(
        name, pretrained=False, num_classes=0, depth=2, embed_dim=48, num_heads=2, dynamic_img_size=True
    )
    return TimmVFM(model.eval())


@pytest.fixture(scope="session")
def tiny_clip() -> torch.nn.Module:
    return make_tiny_clip()


@pytest.fixture(scope="session")
def tiny_vfm() -> torch.nn.Module:
    return make_tiny_vfm()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A ``local-dir:`` folder of the tiny model (the same weights as ``tiny_clip``)."""
    return write_local_clip_dir(tmp_path_factory.mktemp("tiny-clip"), TINY_CLIP)


@pytest.fixture(scope="session")
def small_clip_dir(tmp_path_factory) -> Path:
    return write_local_clip_dir(tmp_path_factory.mktemp("small-clip"), SMALL_CLIP)


@pytest.fixture()
def rgb_image() -> np.ndarray:
    """A 50x70 image with structure (left half red-ish, right half blue-ish, noise)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, size=(50, 70, 3), dtype=np.uint8)
    img[:, :35, 0] += 180
    img[:, 35:, 2] += 180
    return img


def make_tiny_sam(seed: int = 0, window_last: bool = False) -> torch.nn.Module:
    """A 2-block timm SAM ViT at 128 px (8x8 grid): a window-attention block, then a global one (as
    SAM's last); random relative positions and absolute positions (timm initialises them to 0)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "samvit_base_patch16",
        pretrained=False,
        num_classes=0,
        img_size=128,
        depth=2,
        embed_dim=32,
        num_heads=2,
        window_size=4,
        global_attn_indexes=[] if window_last else [1],
        neck_chans=16,
    ).eval()
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)
        for block in model.blocks:
            block.attn.rel_pos_h.normal_(std=0.5)
            block.attn.rel_pos_w.normal_(std=0.5)
    return model


# -- literal references shared by the method parity tests (the slow, obvious way) ------------------------------
def softmax(a: torch.Tensor) -> torch.Tensor:
    e = torch.exp(a - a.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_positional(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """CLIP's patch positions resized as the SCLIP lineage does: bicubic, scale factor (g + 0.1) / n."""
    n = int(math.sqrt(pos.shape[0] - 1))
    if (gh, gw) == (n, n):
        return pos
    grid = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic")
    assert grid.shape[-2:] == (gh, gw)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
