"""``catseg``: CAT-Seg (Cho et al., CVPR 2024, arXiv 2303.11797), cost aggregation on fine-tuned CLIP.

Every window is resized to CLIP's working resolution (``feature_grid`` patches a side: 384 px for
ViT-B/16, 336 px for ViT-L/14, a 24×24 grid). CLIP's dense features (the value path with the CLS
residual in the last block, :class:`~vocabseg.methods.value_path.ValuePathCLIP`) and its middle-layer
outputs (blocks 3/7 of 12, 7/15 of 24) go with the class text through the
:class:`~vocabseg.heads.catseg.CATSegHead`, which returns one logit map per class at 4× the grid;
probabilities are their sigmoid. Text: one template, "A photo of a {} in the scene" (``catseg1``).

Training (official code): CLIP's attention is fine-tuned ("attention" mode: the query and value
projection weights of every block of *both* towers; keys, biases, MLPs, norms and the position
embeddings stay frozen) at 1/100 of the head's learning rate (the ``clip`` parameter group), so the
class prompts go through the text tower with gradients at every step. The loss is BCE-with-logits on
one-hot targets at the label's resolution, and the official code treats ignored (255) pixels as
negatives for every class, not as left out (``ignore_as_negative``).

open_clip fuses q/k/v into one ``in_proj_weight``. To train Q and V but not K, the fused weight is
re-expressed with ``torch.nn.utils.parametrize`` as the concatenation of three tensors ``original0``
(Q), ``original1`` (K, frozen) and ``original2`` (V): every consumer of ``attn.in_proj_weight``
(``nn.MultiheadAttention``, the dense tower) sees the same fused matrix, and the state dict holds the
three parts under ``...attn.parametrizations.in_proj_weight.original{0,1,2}`` (the official checkpoints'
``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``).

Seam for methods built on CAT-Seg (FGAseg): :meth:`CATSeg.image_features` (dense features and guidance),
:meth:`CATSeg.text_features` (shared or per-image unit text), :meth:`CATSeg.head` (the
:class:`CATSegHead`, whose stages are documented there) and :meth:`CATSeg.class_logits` (the three
together, at the head's resolution). A subclass may replace ``self.head`` by a subclass of
``CATSegHead`` and override :meth:`CATSeg.loss` / :meth:`CATSeg.training_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._names import lookup
from ..heads.catseg import CATSegHead
from ..heads.losses import LossFn, binary_ce_loss
from ..inference.config import InferenceConfig
from ..inference.published import CATSEG_CONVENTION, CATSEG_EVAL, CATSEG_PAPER_SETTINGS
from ..text.encoder import check_prompt_lengths
from ..text.templates import resolve_templates
from ..text.tower import encode_text_fast
from .registry import PaperSettings, get_method_spec, register_method
from .trained import TrainedCLIPMethod
from .value_path import ValuePathCLIP

__all__ = ["CATSeg", "FINETUNE_MODES", "QKVSplit", "default_guidance_layers", "split_qkv"]

#: the label value of pixels without a label in the training data (``SegTrainDataset``'s ignore index)
IGNORE_INDEX = 255


# -- Q/V-only fine-tuning --------------------------------------------------------------------------------------
class QKVSplit(nn.Module):
    """Parametrization of a fused (3d, d) ``in_proj_weight`` as three (d, d) tensors (q, k, v).

    ``right_inverse`` splits the existing weight, so registering it changes no number; ``forward``
    concatenates the parts, so every reader of ``in_proj_weight`` sees the usual fused matrix.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([q, k, v], dim=0)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = weight.chunk(3, dim=0)
        return q.clone(), k.clone(), v.clone()


def _is_split(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "in_proj_weight") and any(
        isinstance(p, QKVSplit) for p in module.parametrizations["in_proj_weight"]
    )


def split_qkv(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """The (q, k, v) weight parameters of an attention module with a fused ``in_proj_weight``,
    splitting it first (once: a module already split is reused)."""
    if not _is_split(module):
        weight = getattr(module, "in_proj_weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or weight.shape[0] != 3 * weight.shape[1]:
            raise TypeError(f"{type(module).__name__} has no fused (3d, d) in_proj_weight to split")
        parametrize.register_parametrization(module, "in_proj_weight", QKVSplit(), unsafe=True)
    original = module.parametrizations["in_proj_weight"]
    return original.original0, original.original1, original.original2


def _attention_modules(clip: nn.Module) -> list[nn.Module]:
    """Every attention module of both towers with a fused q/k/v projection."""
    return [m for m in clip.modules() if _is_split(m) or isinstance(getattr(m, "in_proj_weight", None), nn.Parameter)]


def _finetune_attention(clip: nn.Module, positions: bool = False) -> None:
    """Official ``CLIP_FINETUNE: attention``: q_proj and v_proj weights of every block trainable."""
    attention = _attention_modules(clip)
    if not attention:
        raise TypeError(f"{type(clip).__name__} has no attention with a fused in_proj_weight to fine-tune")
    for module in attention:
        q, _, v = split_qkv(module)
        q.requires_grad_(True)
        v.requires_grad_(True)
    if positions:
        for owner in (clip, clip.visual):
            owner.positional_embedding.requires_grad_(True)


def _finetune_none(clip: nn.Module) -> None:
    """CLIP frozen (the paper's frozen-CLIP ablation)."""


#: how much of CLIP trains: ``attention`` (official default: Q and V projection weights of both towers),
#: ``attention+position`` (also both towers' position embeddings, which the official configuration names
#: but its name filter never reaches), ``none`` (frozen CLIP)
FINETUNE_MODES: dict[str, Callable[[nn.Module], None]] = {
    "attention": _finetune_attention,
    "attention+position": lambda clip: _finetune_attention(clip, positions=True),
    "none": _finetune_none,
}


def default_guidance_layers(depth: int, stages: int = 2) -> tuple[int, ...]:
    """CLIP blocks whose outputs guide the decoder stages: (3, 7) of 12 blocks, (7, 15) of 24 (official
    ``layer_indexes``), i.e. block ``(i + 1) · depth / (stages + 1) − 1`` for stage i, kept within the
    blocks :meth:`~vocabseg.models.vit.CLIPVisionTower.forward_intermediates` can return."""
    return tuple(min(max((i + 1) * depth // (stages + 1) - 1, 0), depth - 2) for i in range(stages))


# -- the method ------------------------------------------------------------------------------------------------
@register_method(
    "catseg",
    defaults=InferenceConfig(**CATSEG_EVAL),
    paper=PaperSettings(
        "cvlab-kaist/CAT-Seg eval.sh: TEST.SLIDING_WINDOW True, ResizeShortestEdge(640, 2560), SemSegEvaluator",
        CATSEG_PAPER_SETTINGS,
        convention=CATSEG_CONVENTION,
    ),
    summary="Cost aggregation (spatial Swin + class linear attention) on Q/V-fine-tuned CLIP; sigmoid logits.",
    reference="Cho et al., CAT-Seg, CVPR 2024 (arXiv 2303.11797)",
    trainable=True,
    weights="the official CAT-Seg release (model_base.pth: ViT-B/16, model_large.pth: ViT-L/14@336): pass the .pth "
    "as weights or convert it once with `vocabseg convert-weights FILE OUT_DIR --method catseg`; or train it",
    text_input="per_template",
    templates="catseg1",
)
class CATSeg(TrainedCLIPMethod):
    """Args:
    feature_grid: patches a side CLIP works at (24: windows are resized to 384 px for patch 16,
        336 px for patch 14).
    guidance_layers: CLIP blocks (0-based) guiding the decoder stages, one per stage; default from the
        tower's depth (:func:`default_guidance_layers`).
    finetune: which CLIP weights train (:data:`FINETUNE_MODES`).
    prompt_channels: templates per class in the cost volume (1, the ``catseg1`` template).
    hidden_dim, heads, appearance_guidance_dim, text_guidance_dim, num_layers, window, pooling, pad_len,
    decoder_dims, decoder_guidance_dims, decoder_guidance_proj_dims: head sizes (:class:`CATSegHead`;
        the defaults are the official ViT-B and ViT-L configurations).
    ignore_as_negative: train pixels labelled 255 as negatives for every class, as the official loss
        does (``False``: leave them out of the loss, e.g. for PASCAL-5i's held-out classes).
    """

    def __init__(
        self,
        clip: nn.Module,
        feature_grid: int = 24,
        guidance_layers: Sequence[int] | None = None,
        finetune: str = "attention",
        prompt_channels: int = 1,
        hidden_dim: int = 128,
        heads: int = 4,
        appearance_guidance_dim: int = 128,
        text_guidance_dim: int = 128,
        num_layers: int = 2,
        window: int = 12,
        pooling: Sequence[int] = (2, 2),
        pad_len: int = 256,
        decoder_dims: Sequence[int] = (64, 32),
        decoder_guidance_dims: Sequence[int] = (256, 128),
        decoder_guidance_proj_dims: Sequence[int] = (32, 16),
        ignore_as_negative: bool = True,
    ):
        super().__init__(clip)
        set_trainable = lookup(FINETUNE_MODES, finetune, "finetune mode")
        if feature_grid <= 0:
            raise ValueError(f"feature_grid must be positive, got {feature_grid}")
        self.dense = ValuePathCLIP(clip)
        tower = self.dense.tower
        stages = len(tuple(decoder_dims))
        layers = default_guidance_layers(tower.depth, stages) if guidance_layers is None else tuple(guidance_layers)
        if len(layers) != stages:
            raise ValueError(f"guidance_layers {list(layers)} must name one CLIP block per decoder stage ({stages})")
        self.guidance_layers = tuple(int(i) for i in layers)
        patch = tower.patch_size
        self.image_size = (feature_grid * patch[0], feature_grid * patch[1])
        clip_dim = int(getattr(clip.visual, "output_dim", 0) or clip.text_projection.shape[-1])
        self.head = CATSegHead(
            clip_dim,
            int(clip.visual.positional_embedding.shape[-1]),
            prompt_channels=prompt_channels,
            hidden_dim=hidden_dim,
            heads=heads,
            appearance_guidance_dim=appearance_guidance_dim,
            text_guidance_dim=text_guidance_dim,
            num_layers=num_layers,
            window=window,
            pooling=pooling,
            pad_len=pad_len,
            decoder_dims=decoder_dims,
            decoder_guidance_dims=decoder_guidance_dims,
            decoder_guidance_proj_dims=decoder_guidance_proj_dims,
        )
        self.ignore_as_negative = bool(ignore_as_negative)
        set_trainable(clip)
        self.register_buffer("class_tokens", torch.zeros(0, 0, 0, dtype=torch.long), persistent=False)

    def shared_clip_prefixes(self) -> tuple[str, ...]:
        return ("dense.",)

    def train(self, mode: bool = True) -> CATSeg:
        super().train(mode)
        self.clip.eval()  # CLIP has no dropout nor batch statistics: its mode never matters, keep it fixed
        self.dense.eval()
        return self

    # -- the seam -----------------------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CLIP-normalised images (B, 3, H, W), resized to CLIP's working size -> dense features
        (B, C, h, w) in CLIP's joint space (not normalised) and one middle-layer token map
        (B, width, h, w) per decoder stage (CLS dropped, before any norm; official forward hooks)."""
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        tower = self.dense.tower
        x, grid, middle = tower.forward_intermediates(images, self.guidance_layers, self.dense.position_resize)
        tokens, (h, w) = self.dense.dense_tokens(x, grid, images)
        feats = tower.head(tokens)
        dense = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[-1], h, w)
        guidance = [t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w) for t in middle]
        return dense, guidance

    @staticmethod
    def text_features(text: torch.Tensor) -> torch.Tensor:
        """Unit text as the head takes it: (K, D) -> (K, 1, D); (K, P, D) shared and (B, K, P, D) per
        image pass through (normalised)."""
        if text.dim() == 2:
            text = text.unsqueeze(1)
        if text.dim() not in (3, 4):
            raise ValueError(f"text must be (K, D), (K, P, D) or (B, K, P, D), got {tuple(text.shape)}")
        return F.normalize(text, dim=-1)

    def class_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, 4h, 4w) at the head's resolution (96×96 on the 24×24 grid)."""
        dense, guidance = self.image_features(images)
        return self.head(dense, self.text_features(text).to(dense.dtype), guidance)

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """Per-name logits (B, K, h, w): the head's logits bilinearly upsampled to the window (the
        sigmoid comes after, as in the official sliding-window inference). Windows are resized to
        CLIP's working size, so ``pad_multiple`` has nothing to do."""
        out = self.class_logits(windows, text).float()
        return F.interpolate(out, size=windows.shape[-2:], mode="bilinear", align_corners=False)

    # -- training -----------------------------------------------------------------------------------------------
    def prepare_training(self, clip: Any, dataset: Any) -> None:
        """Keep the tokenized prompts of the dataset's classes (first name of each, the method's
        templates): the text tower is fine-tuned, so :meth:`training_step` encodes them every step."""
        templates = resolve_templates(get_method_spec(self.method_name).templates)
        names = [c.names[0] for c in dataset.vocabulary.classes]
        tokens = clip.tokenizer([t.format(n) for n in names for t in templates])
        check_prompt_lengths(clip.tokenizer, names, templates, tokens)
        self.class_tokens = tokens.view(len(names), len(templates), -1).to(self.class_tokens.device)

    def encode_class_text(self) -> torch.Tensor:
        """(K, P, D) unit text of the training classes, through the text tower with gradients."""
        if self.class_tokens.numel() == 0:
            raise RuntimeError("prepare_training(clip, dataset) must give the training classes first.")
        k, p, length = self.class_tokens.shape
        text = encode_text_fast(self.clip, self.class_tokens.reshape(k * p, length)).float()
        return F.normalize(text, dim=-1).view(k, p, -1)

    def loss(self, logits: torch.Tensor, label: torch.Tensor, fn: LossFn = binary_ce_loss) -> torch.Tensor:
        """BCE-with-logits on one-hot targets (B, K, H, W) vs (B, H, W): classes 0..K-1; K (a background
        outside the classes) is a negative for every class; 255 too with ``ignore_as_negative``
        (official), else left out. ``fn``: another loss with these label rules (FGAseg's T2P MSE)."""
        k = logits.shape[1]
        if self.ignore_as_negative:
            label = torch.where(label == IGNORE_INDEX, torch.full_like(label, k), label)
            return fn(logits, label, ignore_index=-1, background_index=k)
        return fn(logits, label, ignore_index=IGNORE_INDEX, background_index=k)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, label = batch["image"], batch["label"]
        logits = self.class_logits(images, self.encode_class_text())
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        return {"loss": self.loss(logits, label)}
