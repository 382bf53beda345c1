"""FGAseg on CAT-Seg's test setup (``catseg_setup.py``: the small random CLIP, the synthetic shapes, the
tiny head sizes and the official optimiser): the training checks' setup (``harness.py``) and the model of
the "it learns" test. FGAseg is CAT-Seg plus its additions, so only the method differs.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vocabseg.methods import create_method
from vocabseg.models.clip import OPENAI_MEAN, OPENAI_STD, LoadedCLIP, default_tokenizer
from vocabseg.train import DataConfig, OptimConfig, Recipe


def _catseg_setup() -> ModuleType:
    """``catseg_setup.py`` next to this file, however this file was loaded (package import in pytest, by
    path in the harness's child processes)."""
    for name in ("train.catseg_setup", "catseg_setup"):
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location("catseg_setup", Path(__file__).with_name("catseg_setup.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["catseg_setup"] = module
    spec.loader.exec_module(module)
    return module


catseg = _catseg_setup()
Shapes = catseg.Shapes


def build_model(seed: int = 0, **options: Any) -> torch.nn.Module:
    """FGAseg on the small CLIP, prepared for training (tokenized class prompts) as ``build_training`` does."""
    clip = catseg.small_clip(seed)
    torch.manual_seed(seed)
    model = create_method("fgaseg", clip, **{**catseg.OPTIONS, **options})
    model.clip_identity = {"model": catseg.CLIP_NAME, "pretrained": None}
    model.store_clip = True  # random CLIP weights travel with the checkpoint, as with --pretrained none
    model.prepare_training(LoadedCLIP(clip, default_tokenizer(clip), OPENAI_MEAN, OPENAI_STD, "small"), Shapes(n=1))
    return model.train()


def fgaseg_recipe(**changes: Any) -> Recipe:
    """CAT-Seg's test recipe with the method changed."""
    base = catseg.catseg_recipe(name="fgaseg-test", summary="FGAseg on a tiny CLIP and synthetic shapes")
    return replace(base, model=replace(base.model, method="fgaseg"), **changes)


def setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, torch.nn.Module, Any]:
    """The SIGKILL/resume run: the fast decoder (auxiliary heads and losses) and the T2P loss on top of
    CAT-Seg's gradient accumulation, clipping and Q/V training in both towers."""
    recipe = fgaseg_recipe(grad_accum=2, data=DataConfig(dataset="shapes", crop=64, num_workers=workers))
    if batch_size is not None:
        recipe = replace(recipe, batch_size=batch_size)
    return recipe, build_model(fast_decoder=True), Shapes(n=16)


def ddp_setup(batch_size: int | None = None, workers: int = 0) -> tuple[Recipe, torch.nn.Module, Any]:
    """The DDP run: as :func:`setup`, with SGD (momentum 0.9) and no clipping instead of AdamW and clipping
    at 0.01. With those, the T2P projector's gradients (λ = 0.02) end up near Adam's ε, and Adam turns the
    float rounding of a split batch into weight differences of up to 1e-4 within 9 steps; an SGD step is
    linear in the gradient, so the two runs stay within rounding (~1e-7) of each other."""
    recipe, model, dataset = setup(batch_size, workers)
    optim = OptimConfig(name="sgd", lr=0.01, weight_decay=1e-4, lr_mult={"clip": 0.01})
    return replace(recipe, optim=optim, clip_grad_norm=None), model, dataset
