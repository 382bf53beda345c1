"""CAT-Seg and FGAseg on COCO-Stuff-171, as the official configs train them.

CAT-Seg (``configs/config.yaml`` + ``vitb_384.yaml`` / ``vitl_336.yaml``): AdamW 2e-4, weight decay 1e-4,
the CLIP parameters that train (the Q/V projections of both towers, as the official code's
``"transformer" in name`` filter leaves them; ``model.options.finetune="attention+position"`` adds the
position embeddings, as the paper describes) at ×0.01
(``CLIP_MULTIPLIER``), cosine to 0 over 80k iterations without warm-up (``WarmupCosineLR``,
``WARMUP_ITERS: 0``), gradient clipping at a total norm of 0.01 over the whole model (``CLIP_TYPE:
full_model``), full precision, batch 4 in all (``IMS_PER_BATCH``; the paper: 4 GPUs × 1). Data
(``MaskFormerSemanticDatasetMapper``): short side resized to 384 (``MIN_SIZE_TRAIN: (384,)``), a random
384 crop with no single-class limit (``SINGLE_CATEGORY_MAX_AREA: 1.0``), SSD colour augmentation (the
photometric distortion), horizontal flip. Validation on COCO-Stuff val every 5000 iterations
(``EVAL_PERIOD``).

FGAseg (``LiBingyu01/FGA-seg`` ``configs/vit{b_384,l_336}_no_fast_cat.yaml``, the headline "NoFast+Cat"
models) keeps CAT-Seg's recipe; its batch is 8 in all: the paper trains on 8 GPUs × 1 and every
config says 8 except the ViT-B headline file, which says 2 (``batch_size=2`` reproduces that file).

``batch_size`` is per process: under ``torchrun`` with N processes pass ``--batch-size`` total / N.
The base CLIPs are OpenAI's with QuickGELU, as the official ``clip.load`` builds them (open_clip's
plain ``ViT-B-16`` uses GELU). The methods' options default to the official ones for each backbone, so
the recipes set none.
"""

from __future__ import annotations

from ..recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, register_recipe

#: (recipe name part, open_clip model, pretrained tag, description)
BACKBONES = {
    "vitb": ("ViT-B-16-quickgelu", "openai", "CLIP ViT-B/16 at 384"),
    "vitl": ("ViT-L-14-336-quickgelu", "openai", "CLIP ViT-L/14@336"),
}
#: method -> (batch in all, reference)
METHODS = {
    "catseg": (4, "Cho et al., CAT-Seg, CVPR 2024; official configs/config.yaml + vitb_384.yaml / vitl_336.yaml"),
    "fgaseg": (8, "Li et al., FGAseg (arXiv 2501.00877); official configs/vit*_no_fast_cat.yaml (CAT-Seg's recipe)"),
}


def _recipe(method: str, backbone: str) -> Recipe:
    clip_model, pretrained, clip_text = BACKBONES[backbone]
    batch, reference = METHODS[method]
    return Recipe(
        name=f"{method}_{backbone}_coco_stuff",
        summary=f"{method}: {clip_text} (Q/V fine-tuned) and its head, trained on COCO-Stuff-171",
        reference=reference,
        model=ModelConfig(method=method, clip_model=clip_model, pretrained=pretrained),
        data=DataConfig(dataset="coco_stuff", crop=384, scale=(1.0, 1.0), cat_max_ratio=1.0, num_workers=8),
        optim=OptimConfig(name="adamw", lr=2e-4, weight_decay=1e-4, lr_mult={"clip": 0.01}),
        schedule=ScheduleConfig(name="cosine", warmup_iters=0, min_lr=0.0),
        max_iters=80_000,
        batch_size=batch,
        clip_grad_norm=0.01,
        checkpoint_every=1000,
        val_every=5000,
        log_every=20,
    )


CATSEG_RECIPES = {r.name: register_recipe(r) for r in (_recipe(m, b) for m in METHODS for b in BACKBONES)}
