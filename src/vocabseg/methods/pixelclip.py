"""``pixelclip``: PixelCLIP (Shin et al., NeurIPS 2024, arXiv 2409.19846): CLIP's image encoder fine-tuned
with unlabeled masks (SA-1B, or k-means of DINO features); at inference, plain dense CLIP.

Inference (the released evaluation): the image's short side is resized to 640 as detectron2 does
(PIL), then the whole image, one window, is squashed to the training resolution (320² for a
ViT: 20×20 tokens with bicubically resized positions; 640² for OpenCLIP ConvNeXt), dense features
come from the value-path last block (:class:`~vocabseg.methods.value_path.ValuePathCLIP`) or the
ConvNeXt trunk + head norm + projection, are resized bilinearly to 64×64, and their cosine with the
prompt-ensembled class text (PixelCLIP's 8 "imagenet_select" templates) is upsampled to the window.
No temperature (``logit_scale`` 1: the official output is the cosine), no head, no prompts.

Training (official ``pixelclip.py``; the pieces live in :mod:`vocabseg.heads.pixelclip`): a
momentum teacher (EMA 0.999 of the image tower, updated after every optimiser step) pools its
dense features of the weakly augmented view over every mask; learnable class prompts give k = 64
cluster embeddings; Sinkhorn-Knopp assigns each mask a cluster; the masks of a cluster merge into
its target; the student's cosine map with each cluster (strongly augmented view) goes through a
small conv head, and BCE on the mask-covered pixels trains the student's attention and position
parameters (ViT; every image-tower parameter for ConvNeXt), the prompts and the head.

Differences from the official code: the teacher averages only the parameters that train (the frozen
ones are equal, and averaging equal numbers only adds rounding); prompts are float32 (the release's are
float16); LayerNorm/GroupNorm parameters get the recipe's weight decay like the rest (detectron2 gives
them none: a 2e-8 relative decay per step at the official rates). At inference the cosine is
upsampled to the resized image and then by the pipeline to the input (the official code goes from
64×64 to the input in one step), and a class with synonyms ("a, b") is scored by its best synonym
(the official code averages the synonyms' embeddings per template).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, MethodOptionError
from ..heads.pixelclip import (
    ClassPrompts,
    ConvHead,
    covered_bce,
    hard_assignment,
    mask_pool,
    merge_targets,
    placeholder_template,
    sinkhorn,
)
from ..inference.config import InferenceConfig
from ..text.templates import SCENE_TEMPLATE
from .base import dense_cosine_logits
from .official import (
    OPENAI_CLIPS,
    ConvertedWeights,
    KeyRules,
    check_against_method,
    identify_openai_clip,
    register_converter,
)
from .registry import register_method
from .trained import TrainedCLIPMethod
from .value_path import ValuePathCLIP

if TYPE_CHECKING:
    from ..train.ema import EMA

__all__ = ["PixelCLIP", "ConvNeXtDense", "Backbone", "BACKBONES", "FINETUNE", "backbone_kind", "convert_pixelclip"]

#: which image-tower parameters train, by name relative to ``clip.visual`` (official ``CLIP_FINETUNE``)
FINETUNE: dict[str, Callable[[str], bool]] = {
    "attention": lambda name: "attn" in name or "position" in name,  # every attention parameter + positions
    "full": lambda name: True,
}


class ConvNeXtDense(nn.Module):
    """Dense features of an OpenCLIP timm-ConvNeXt tower as the official code computes them: the trunk's
    features, the trunk head's norm (its global pooling skipped), then the tower's projection at every
    position: (B, 3, H, W) -> (B, E, H/32, W/32)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        x = trunk.forward_features(images.to(next(trunk.parameters()).dtype))
        x = trunk.head.norm(x)
        x = self.visual.head(x.permute(0, 2, 3, 1))
        return x.permute(0, 3, 1, 2)


def _value_path(visual: nn.Module) -> nn.Module:
    """CAT-Seg's / PixelCLIP's dense ViT features (:class:`ValuePathCLIP`) on a bare image tower."""
    return ValuePathCLIP(types.SimpleNamespace(visual=visual))


def _is_timm_convnext(visual: nn.Module) -> bool:
    trunk = getattr(visual, "trunk", None)
    return trunk is not None and hasattr(trunk, "forward_features") and hasattr(getattr(trunk, "head", None), "norm")


@dataclass(frozen=True)
class Backbone:
    """How PixelCLIP runs one kind of CLIP image tower (official ``CLIP_RESOLUTION``, ``EPS``, ``CLIP_FINETUNE``)."""

    dense: Callable[[nn.Module], nn.Module]  # image tower -> module mapping images to (B, E, h, w)
    resolution: int  # images are squashed to this square size, in training and inference
    eps: float  # the clustering logits' scale
    finetune: str  # the default FINETUNE rule
    matches: Callable[[nn.Module], bool]


#: tried in order; the ViT entry is the fallback (its dense path refuses towers it cannot run)
BACKBONES: dict[str, Backbone] = {
    "convnext": Backbone(ConvNeXtDense, 640, 1.0, "full", _is_timm_convnext),
    "vit": Backbone(_value_path, 320, 100.0, "attention", lambda visual: True),
}


def backbone_kind(visual: nn.Module) -> str:
    return next(name for name, b in BACKBONES.items() if b.matches(visual))


def _module_path(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is target)


@register_method(
    "pixelclip",
    # detectron2's test resize (PIL, short side 640, long side at most 2560), then one squashed window
    defaults=InferenceConfig(short_side=640, max_long_side=2560, resize_filter="pil", crop=0, logit_scale=1.0),
    summary="CLIP image encoder fine-tuned on unlabeled masks (online clustering, learnable class prompts); "
    "plain dense CLIP at inference.",
    reference="Shin et al., PixelCLIP, NeurIPS 2024 (arXiv 2409.19846)",
    trainable=True,
    weights="the released checkpoints (Hugging Face hsshin98/PixelCLIP): --weights pixelclip_vit_base.pth, or once "
    "`vocabseg convert-weights pixelclip_vit_base.pth OUT --method pixelclip`; or train them with `vocabseg train "
    "--recipe pixelclip_vitb_sa1b` (_dino, pixelclip_convnext_*)",
    templates="pixelclip8",
)
class PixelCLIP(TrainedCLIPMethod):
    """Args:
    num_clusters, prompt_length: k learnable class names of L token embeddings (official 64 × 4).
    resolution: the square size images are squashed to (``None``: 320 for a ViT, 640 for ConvNeXt).
    feature_size: dense features are resized to this square grid before the cosine (inference, 64).
    eps: the clustering logits' scale (``None``: 100 for a ViT, 1 for ConvNeXt).
    momentum: the teacher's EMA decay; sinkhorn_iterations: Sinkhorn-Knopp rounds.
    finetune: which image-tower parameters train (:data:`FINETUNE`; ``None``: ``attention`` for a
        ViT, ``full`` for ConvNeXt).
    prompt_seed: seeds the random vocabulary words the prompts start from.
    """

    def __init__(
        self,
        clip: nn.Module,
        num_clusters: int = 64,
        prompt_length: int = 4,
        resolution: int | None = None,
        feature_size: int = 64,
        eps: float | None = None,
        momentum: float = 0.999,
        sinkhorn_iterations: int = 3,
        finetune: str | None = None,
        prompt_seed: int = 0,
    ):
        super().__init__(clip)
        self.backbone = BACKBONES[backbone_kind(clip.visual)]
        finetune = finetune or self.backbone.finetune
        if finetune not in FINETUNE:
            raise MethodOptionError(f"finetune must be one of {sorted(FINETUNE)}, got {finetune!r}.")
        for name, value, ok in (
            ("resolution", resolution, resolution is None or resolution > 0),
            ("feature_size", feature_size, feature_size > 0),
            ("eps", eps, eps is None or eps > 0),
            ("momentum", momentum, 0 <= momentum < 1),
            ("sinkhorn_iterations", sinkhorn_iterations, sinkhorn_iterations >= 1),
        ):
            if not ok:
                raise MethodOptionError(f"pixelclip: {name}={value!r} is out of range.")
        self.resolution = int(resolution or self.backbone.resolution)
        self.feature_size = int(feature_size)
        self.eps = float(eps or self.backbone.eps)
        self.momentum = float(momentum)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        rule = FINETUNE[finetune]
        for name, p in clip.visual.named_parameters():
            p.requires_grad_(rule(name))
        self.dense = self.backbone.dense(clip.visual)  # the student: CLIP's own tower (shared, not copied)
        self.prompts = ClassPrompts(clip.token_embedding, num_clusters, prompt_length, seed=prompt_seed)
        self.head = ConvHead()
        # training only: the prompt template's ids and placeholder positions (prepare_training), the teacher
        self.register_buffer("prompt_tokens", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_positions", torch.zeros(0, dtype=torch.long), persistent=False)
        self.teacher: nn.Module | None = None
        self._teacher_ema: EMA | None = None
        self._teacher_prefix = ""

    def shared_clip_prefixes(self) -> tuple[str, ...]:
        return ("dense.",)

    # -- inference ------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor, return_global: bool = False) -> torch.Tensor:
        """Dense features (B, E, feature_size, feature_size) of images squashed to ``resolution``²."""
        if return_global:
            raise MethodOptionError("pixelclip has no global-embedding path (CLIP-Surgery does not apply).")
        size = (self.resolution, self.resolution)
        dense = self.dense(F.interpolate(images, size=size, mode="bilinear", align_corners=False))
        grid = (self.feature_size, self.feature_size)
        return F.interpolate(dense.float(), size=grid, mode="bilinear", align_corners=False)

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """cos(features, text) at the windows' resolution: the released evaluation."""
        return dense_cosine_logits(self.features, windows, text, pad_multiple=pad_multiple, surgery=surgery)

    # -- training ---------------------------------------------------------------------------------------
    def prepare_training(self, clip: Any, dataset: Any) -> None:
        """No class labels: keep the prompt template's token ids (with ``clip.tokenizer``), and start the
        momentum teacher as a copy of the image tower (once: a second call keeps the running teacher)."""
        tokens, positions = placeholder_template(clip.tokenizer, SCENE_TEMPLATE, self.prompts.embeddings.shape[1])
        device = self.prompts.embeddings.device
        self.prompt_tokens, self.prompt_positions = tokens.to(device), positions.to(device)
        if self.teacher is None:
            self.start_teacher()

    def start_teacher(self) -> None:
        """The momentum teacher: an EMA copy of the image tower, run by the same dense path. It trails only
        the parameters that train. It follows the model's train/eval mode, as in the official code (for
        ConvNeXt its drop-path is active in training)."""
        from ..train.ema import EMA  # (lazily: the training package imports the method registry)

        ema = EMA(self.clip.visual, self.momentum)
        self._teacher_ema = ema
        self.teacher = self.backbone.dense(ema.shadow)
        self.teacher.requires_grad_(False)
        self.teacher.train(self.training)
        self._teacher_prefix = f"teacher.{_module_path(self.teacher, ema.shadow)}."

    def after_step(self, step: int) -> None:
        """teacher ← momentum · teacher + (1 − momentum) · student, after every optimiser step."""
        if self._teacher_ema is not None:
            self._teacher_ema.update(step)

    def cluster_embeddings(self) -> torch.Tensor:
        """The k cluster embeddings (k, D), unnormalised, with gradients to the prompts."""
        if self.prompt_tokens.numel() == 0:
            raise RuntimeError("pixelclip: call prepare_training(clip, dataset) before training (prompt template).")
        return self.prompts(self.clip, self.prompt_tokens, self.prompt_positions)

    @torch.no_grad()
    def cluster_targets(
        self, teacher_features: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Online clustering: merged targets (B, k, R, R) and every usable mask's cluster (N,).

        ``teacher_features`` (B, E, R, R) at the masks' resolution, ``clusters`` (k, E).
        """
        pooled, owners, kept = mask_pool(teacher_features.float(), masks, valid)
        logits = self.eps * (F.normalize(pooled, dim=-1) @ F.normalize(clusters.float(), dim=-1).T)
        assigned = hard_assignment(sinkhorn(logits, self.sinkhorn_iterations))
        return merge_targets(kept, owners, assigned, masks.shape[0], clusters.shape[0]), assigned

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BCE of the head's per-cluster mask logits against the merged cluster targets.

        ``batch``: ``image`` (B, 3, S, S) the strongly augmented view, ``teacher_image`` the weak view of
        the same crop, ``masks`` (B, M, R, R) bool, ``mask_valid`` (B, M) bool.
        """
        if self.teacher is None:
            raise RuntimeError("pixelclip: call prepare_training(clip, dataset) before training (teacher).")
        masks, valid = batch["masks"], batch["mask_valid"]
        size, mask_size = (self.resolution, self.resolution), masks.shape[-2:]
        with torch.no_grad():
            weak = F.interpolate(batch["teacher_image"], size=size, mode="bilinear", align_corners=False)
            teacher = F.interpolate(self.teacher(weak).float(), size=mask_size, mode="bilinear", align_corners=False)
        clusters = self.cluster_embeddings()
        targets, assigned = self.cluster_targets(teacher, masks, valid, clusters.detach())
        loss = covered_bce(self.mask_logits(batch["image"], clusters, mask_size), targets)
        used = assigned.unique().numel() if assigned.numel() else 0
        return {"loss": loss, "clusters_used": torch.tensor(float(used), device=loss.device)}

    def mask_logits(self, images: torch.Tensor, clusters: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The student's per-cluster mask logits (B, k, *size): its dense features of ``images`` squashed
        to ``resolution``², their cosine with each cluster embedding (k, E) as one map per cluster,
        decoded by the conv head, then resized bilinearly to ``size``."""
        square = (self.resolution, self.resolution)
        student = self.dense(F.interpolate(images, size=square, mode="bilinear", align_corners=False))
        b, k, (h, w) = student.shape[0], clusters.shape[0], student.shape[-2:]
        cost = torch.einsum("kc,bchw->bkhw", F.normalize(clusters, dim=-1), F.normalize(student, dim=1))
        logits = self.head(cost.reshape(b * k, 1, h, w))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).reshape(b, k, *size)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``clip``: the fine-tuned image-tower parameters; ``prompts``: the class-name embeddings;
        ``head``: the conv head (the official learning rates are ×0.01, ×10 and ×1)."""
        groups: dict[str, list[nn.Parameter]] = {"clip": [], "prompts": [], "head": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                prefix = name.split(".", 1)[0]
                groups[prefix if prefix in groups else "head"].append(p)
        return {k: v for k, v in groups.items() if v}

    # -- checkpoints --------------------------------------------------------------------------------------
    def _stored_names(self) -> list[str]:
        """The base's names, with only the teacher tensors that differ from the student's frozen ones (the
        averaged parameters): resume is exact, and the teacher is stored only while it exists (training)."""
        names = super()._stored_names()
        if self._teacher_ema is None:
            return [n for n in names if not n.startswith("teacher.")]
        kept = {self._teacher_prefix + n for n in self._teacher_ema.state_dict()}
        return [n for n in names if not n.startswith("teacher.") or n in kept]

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Strict loading; a checkpoint written in training also holds the teacher, which inference does
        not build, so its tensors are skipped then (and required when resuming, teacher built)."""
        if self.teacher is None:
            state = {k: v for k, v in state.items() if not k.startswith("teacher.")}
        super().load_checkpoint_state(state)
        if self._teacher_ema is not None:  # the frozen part of the teacher is the student's
            shadow = dict(self._teacher_ema.shadow.named_parameters())
            with torch.no_grad():
                for name, p in self.clip.visual.named_parameters():
                    if not p.requires_grad:
                        shadow[name].copy_(p)


# -- the released checkpoints ---------------------------------------------------------------------------------
_PREDICTOR = "sem_seg_head.predictor."
_CLIP = _PREDICTOR + "clip_model."
#: the official names (``pixelclip.py``, ``pixelclip_predictor.py``) -> ours
PIXELCLIP_KEYS = KeyRules([
    (_CLIP + "{*}", "clip.{*}"),
    (_PREDICTOR + "prompt_tokens", "prompts.embeddings"),
    ("head.{*}", "head.{*}"),
])  # fmt: skip
#: released tensors used only in training: the momentum teacher (CLIP without its text transformer) and the
#: DINO ViT-S/16 that makes masks online in the DINO variant; checked by name, not kept
PIXELCLIP_TRAINING_ONLY = ("teacher_encoder.", "dino.")
#: the OpenCLIP tower of the ConvNeXt release (``CLIP_PRETRAINED: convnext_base``)
CONVNEXT_CLIP = "convnext_base_w_320"


@register_converter(
    "pixelclip",
    "PixelCLIP's release (Hugging Face hsshin98/PixelCLIP): pixelclip_vit_base.pth, pixelclip_vit_base_dino.pth "
    "(CLIP ViT-B/16), pixelclip_convnext_base*.pth (OpenCLIP ConvNeXt-B 320)",
)
def convert_pixelclip(state: dict[str, torch.Tensor], base_model: str | None = None) -> ConvertedWeights:
    """A PixelCLIP detectron2 state dict -> ``pixelclip``'s: every CLIP tensor (fine-tuned image tower and the
    frozen text tower), the class prompts (released in float16; float32 here) and the conv head; the number
    and length of the prompts read off their shape. The base CLIP is the OpenAI tower the shapes identify,
    or the ConvNeXt when the image tower is a timm trunk (``base_model`` overrides)."""
    what = "This PixelCLIP checkpoint"
    prompts = state.get(_PREDICTOR + "prompt_tokens")
    if prompts is None or prompts.dim() != 3 or _CLIP + "token_embedding.weight" not in state:
        heads = sorted({k.split(".")[0] for k in state})
        raise CheckpointError(
            f"This is not a PixelCLIP checkpoint: it has no {_PREDICTOR}prompt_tokens (k, L, width) or "
            f"{_CLIP}token_embedding.weight (its keys begin with {', '.join(heads[:6])})."
        )
    found = identify_openai_clip(state, _CLIP)
    convnext = any(k.startswith(_CLIP + "visual.trunk.") for k in state)
    model = base_model or (CONVNEXT_CLIP if convnext else found[1].model if found else None)
    if model is None:
        raise CheckpointError(
            f"{what} has a CLIP image tower none of {', '.join(OPENAI_CLIPS)} nor {CONVNEXT_CLIP}; pass its "
            "open_clip architecture (base_model=..., --model)."
        )
    ours: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        if key.startswith(PIXELCLIP_TRAINING_ONLY):
            continue
        name = PIXELCLIP_KEYS.to_ours(key)
        if name is None:
            unmapped.append(key)
        else:
            ours[name] = tensor.float() if name == "prompts.embeddings" else tensor
    options = {"num_clusters": int(prompts.shape[0]), "prompt_length": int(prompts.shape[1])}
    notes = {"format": "PixelCLIP (detectron2)", "clip": model}
    if found is not None and base_model is None and not convnext:
        notes["clip_pretrained"] = f"{found[1].model}/{found[1].pretrained}"
    converted = ConvertedWeights("pixelclip", options, {"model": model, "pretrained": None}, ours, True, notes)
    return check_against_method(converted, PIXELCLIP_KEYS, unmapped, what)
