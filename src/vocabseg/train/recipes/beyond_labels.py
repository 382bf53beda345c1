"""Beyond-Labels on PASCAL-5i (seed paper 000), leave-one-fold-out: ``--fold F`` holds out fold F.

The paper states only AdamW, a cosine schedule, its 12 templates and τ = 0.08; the rest follows its
reference Fusioner (Ma et al., BMVC 2022), as the method's docstring explains: AdamW 1e-3, weight decay
0.01, cosine to 2e-6 after a linear warm-up, batch 32, 224-px crops covering about half to all of the
short side. Fusioner trains 510 epochs (~170k steps at batch 32); the paper gives no length, so the
recipe caps it at 20k steps, with checkpoints every 1000 and zero-shot validation on the held-out
fold every 2000.
"""

from __future__ import annotations

from ..recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, register_recipe

BEYOND_LABELS_PASCAL5I = register_recipe(
    Recipe(
        name="beyond_labels_pascal5i",
        summary="Beyond-Labels head on frozen CLIP ViT-B/16, PASCAL-5i leave-one-fold-out (--fold 0..3)",
        reference="Rahman et al., arXiv 2501.16769; optimiser and schedule after Fusioner (BMVC 2022)",
        model=ModelConfig(method="beyond_labels", clip_model="ViT-B-16", pretrained="openai"),
        data=DataConfig(
            dataset="pascal5i",
            crop=224,
            scale=(1.0, 1.5),
            cat_max_ratio=1.0,
            options={"fold": 0, "unseen": "ignore"},
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01),
        schedule=ScheduleConfig(name="cosine", warmup_iters=1000, min_lr=2e-6),
        max_iters=20_000,
        batch_size=32,
        checkpoint_every=1000,
        val_every=2000,
    )
)
