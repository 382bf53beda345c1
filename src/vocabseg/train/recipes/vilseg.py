"""ViL-Seg (seed paper 001) trained on image-caption pairs: our CLIP-initialised version and the paper's own.

The paper trains both ViT-B/16 encoders from random weights on CC12M: Adam, learning rate 5e-4, weight
decay 0.04, 4000 warm-up iterations, batch 768 (48 V100s); it gives no schedule after the warm-up nor a
length (cosine and the lengths below are our choices). ``vilseg_scratch_vitb_cc12m`` is that recipe.

The default, ``vilseg_clip_vitb_cc3m``, starts from OpenAI CLIP ViT-B/16 (the method's docstring gives
the reasons): the text tower frozen, the last 4 image blocks trained at 5e-5 and the heads at 5e-4 with
AdamW, weight decay 0.04 on weights only (biases, norm gains and the logit scale without, as CLIP and
DINO train), cosine after the paper's 4000 warm-up steps, at the paper's batch of 768 (96 × 8 GPUs;
``--batch-size`` and the number of processes change it). ``vilseg_clip_vitb_coco_captions`` is the
same model on COCO Captions, short enough for a trial on one GPU.

Both caption datasets give the batch DINO's multi-crop makes: one 224-px global view (``data.scale``: its
crop covers 40-100 % of the image, DINO's global-crop scale) and 6 local crops of 96 px.
"""

from __future__ import annotations

from ..recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, register_recipe

#: weights without decay (see ``ViLSeg.param_groups``); CLIP's groups at a tenth of the heads' rate
_CLIP_LR = {"clip": 0.1, "clip_no_decay": 0.1}
_NO_DECAY = {"clip_no_decay": 0.0, "head_no_decay": 0.0}
_REFERENCE = "Liu et al., ViL-Seg, ECCV 2022 (arXiv 2207.08455), Sec. 4.1; DINO (Caron et al., 2021) for L_vision"

VILSEG_CLIP_VITB_CC3M = register_recipe(
    Recipe(
        name="vilseg_clip_vitb_cc3m",
        summary="ViL-Seg on CLIP ViT-B/16 (text frozen, blocks 9-12 + heads trained) from CC3M-style caption shards",
        reference=_REFERENCE + "; CLIP initialisation and learning rates are our choices",
        model=ModelConfig(method="vilseg", clip_model="ViT-B-16", pretrained="openai"),
        data=DataConfig(dataset="caption_shards", crop=224, scale=(0.4, 1.0), num_workers=8),
        optim=OptimConfig(name="adamw", lr=5e-4, weight_decay=0.04, lr_mult=_CLIP_LR, wd_mult=_NO_DECAY),
        schedule=ScheduleConfig(name="cosine", warmup_iters=4000),
        max_iters=40_000,  # ~10 epochs of CC3M's ~3.3M pairs at batch 768
        batch_size=96,
        amp="bf16",
        checkpoint_every=2000,
    )
)

VILSEG_SCRATCH_VITB_CC12M = register_recipe(
    Recipe(
        name="vilseg_scratch_vitb_cc12m",
        summary="ViL-Seg as the paper trains it: both ViT-B/16 encoders from random weights on CC12M, Adam 5e-4",
        reference=_REFERENCE + "; cosine decay and length are our choices",
        model=ModelConfig(
            method="vilseg",
            clip_model="ViT-B-16",
            pretrained=None,
            options={"trainable_blocks": "all", "train_text": True, "head": "linear"},
        ),
        data=DataConfig(dataset="caption_shards", crop=224, scale=(0.4, 1.0), num_workers=8),
        optim=OptimConfig(name="adam", lr=5e-4, weight_decay=0.04),
        schedule=ScheduleConfig(name="cosine", warmup_iters=4000),
        max_iters=160_000,  # ~10 epochs of CC12M at batch 768
        batch_size=96,
        amp="bf16",
        checkpoint_every=5000,
    )
)

VILSEG_CLIP_VITB_COCO_CAPTIONS = register_recipe(
    Recipe(
        name="vilseg_clip_vitb_coco_captions",
        summary="ViL-Seg on CLIP ViT-B/16 from COCO Captions (train2017): a short run for trials",
        reference=_REFERENCE + "; CLIP initialisation, learning rates and length are our choices",
        model=ModelConfig(method="vilseg", clip_model="ViT-B-16", pretrained="openai"),
        data=DataConfig(dataset="coco_captions", crop=224, scale=(0.4, 1.0), num_workers=4),
        optim=OptimConfig(name="adamw", lr=5e-4, weight_decay=0.04, lr_mult=_CLIP_LR, wd_mult=_NO_DECAY),
        schedule=ScheduleConfig(name="cosine", warmup_iters=500),
        max_iters=5000,  # ~1.4 epochs of COCO's 118k training images at batch 32
        batch_size=32,
        checkpoint_every=1000,
    )
)
