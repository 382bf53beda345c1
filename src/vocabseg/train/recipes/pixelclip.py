"""PixelCLIP (seed paper 002): CLIP's image encoder fine-tuned on unlabeled masks, as the official configs
(``configs/pixelclip_vit_base.yaml``, ``pixelclip_convnext_base.yaml``) train it.

AdamW 2e-4 with the CLIP parameters at ×0.01 and the learnable class prompts at ×10, weight decay
1e-4, cosine decay to 1e-4 (detectron2's ``BASE_LR_END``: every group ends at half its rate) with no
warm-up, gradient clipping at a total norm of 0.01, 10k iterations of batch 48 (the official total:
4 GPUs × 12; under ``torchrun`` with N processes pass ``--batch-size 48/N``), full precision.
Crops of 640 from images whose short side is resized to 1024 (``scale`` 1.6 × 640). Masks: SA-1B
(``sa1b``) or k-means of DINO features (``dino_masks``). The method's options default to the official
ones for each backbone (320² and eps 100 with attention + position fine-tuning for ViT-B/16; 640² and
eps 1 with the full image tower for ConvNeXt-B), so the recipes set none.
"""

from __future__ import annotations

from ..recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, register_recipe

#: (recipe name part, open_clip model, pretrained tag, description)
BACKBONES = {
    "vitb": ("ViT-B-16-quickgelu", "openai", "CLIP ViT-B/16"),  # OpenAI's tower uses QuickGELU
    "convnext": ("convnext_base_w_320", "laion_aesthetic_s13b_b82k", "OpenCLIP ConvNeXt-B (320, LAION-Aesthetic)"),
}
#: (recipe name part, training dataset, description)
MASKS = {
    "sa1b": ("sa1b", "SA-1B masks"),
    "dino": ("dino_masks", "k-means masks of DINO ViT-S/16 features"),
}


def _recipe(backbone: str, masks: str) -> Recipe:
    clip_model, pretrained, clip_text = BACKBONES[backbone]
    dataset, masks_text = MASKS[masks]
    return Recipe(
        name=f"pixelclip_{backbone}_{masks}",
        summary=f"PixelCLIP: {clip_text} fine-tuned on {masks_text} (online clustering, 64 learnable class prompts)",
        reference="Shin et al., NeurIPS 2024 (arXiv 2409.19846); official configs/pixelclip_*_base.yaml",
        model=ModelConfig(method="pixelclip", clip_model=clip_model, pretrained=pretrained),
        data=DataConfig(dataset=dataset, crop=640, scale=(1.6, 1.6), cat_max_ratio=1.0, num_workers=8),
        optim=OptimConfig(name="adamw", lr=2e-4, weight_decay=1e-4, lr_mult={"clip": 0.01, "prompts": 10.0}),
        schedule=ScheduleConfig(name="cosine", warmup_iters=0, min_lr=1e-4),
        max_iters=10_000,
        batch_size=48,
        clip_grad_norm=0.01,
        checkpoint_every=1000,
        log_every=20,
    )


PIXELCLIP_RECIPES = {r.name: register_recipe(r) for r in (_recipe(b, m) for b in BACKBONES for m in MASKS)}
