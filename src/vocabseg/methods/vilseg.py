"""``vilseg``: ViL-Seg (Liu et al., ECCV 2022, arXiv 2207.08455), segmentation learned from image-caption pairs.

An image encoder trained with a local-to-global distillation (L_vision, Eq. 2), CLIP's image-caption
InfoNCE (L_cross, Eqs. 3-4) and an online clustering head trained with IIC (L_cluster, Eqs. 5-8); the
losses and heads are in :mod:`vocabseg.heads.vilseg`. Inference (Sec. 3.3): argmax over the C clusters
gives C region masks, the dense embeddings are average-pooled in each region, and each region takes
the class whose "a photo of a {}" embedding is nearest (cosine).

The paper trains both ViT-B/16 encoders from scratch on CC12M with 48 GPUs. The default here starts
from CLIP instead (no official code exists; these are our choices): the text tower stays frozen, the
last 4 image blocks train, and the dense embeddings e_pxl are CLIP's tokens with a last block that
skips the q-k attention and adds the CLS token's residual to every token (:class:`ValuePathCLIP`: the
dense path CAT-Seg and PixelCLIP fine-tune CLIP through, so gradients reach the same weights inference
uses), after ``ln_post`` and the projection (512-d, CLIP's joint space). The paper's from-scratch
variant is ``trainable_blocks="all", train_text=True`` on a randomly initialised CLIP.

Following Eq. 1 (L_cluster(Φ_c)), the clustering loss trains only the clustering head: it sees the
dense embeddings detached (``cluster_grad=True`` lets IIC train the encoder too).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import MethodOptionError
from ..heads.vilseg import (
    LOGIT_SCALE_INIT,
    ClusterHead,
    build_projection_head,
    contrastive_loss,
    dino_loss,
    iic_loss,
    photometric_flip,
    unflip,
    update_center,
)
from ..inference.config import InferenceConfig
from ..inference.sliding import centered_padding, rescaled_size, resize_image
from ..masks.base import as_masks, check_image
from ..models.fingerprint import weights_fingerprint
from ..models.vit import CLIPVisionTower
from ..text.tower import encode_text_fast
from .registry import register_method
from .trained import TrainedCLIPMethod
from .value_path import ValuePathCLIP

__all__ = ["ViLSeg", "ViLSegMasks", "paint_regions", "MASK_MODES"]

#: inference masks: ``hard`` = one-hot argmax over clusters (the paper), ``soft`` = the cluster probabilities
MASK_MODES = ("hard", "soft")
#: where the momentum teacher's tensors live in the state dict (needed to resume training, not to segment)
TEACHER = "teacher."
#: text-tower parameters of an open_clip CLIP that are not part of the text encoder itself
_NOT_TEXT = ("visual.", "logit_scale", "logit_bias")


def paint_regions(feats: torch.Tensor, masks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Region classification (Sec. 3.3): pool the unit dense features in each mask, take the cosine of
    each region with each class, and paint every pixel with its region's cosines, so the argmax over
    classes at a pixel is its region's class. A cluster with no pixel paints nothing.

    Args:
        feats: (B, D, h, w) unit dense features.
        masks: (B, C, h, w) one-hot cluster masks (or soft cluster probabilities).
        text: (K, D) unit class embeddings.

    Returns: (B, K, h, w) painted cosines ``Σ_c M_c · cos(r_c, t_k)``, r_c = Σ M_c e / Σ M_c.
    """
    area = masks.sum(dim=(2, 3))  # (B, C)
    region = torch.einsum("bchw,bdhw->bcd", masks, feats) / area.clamp(min=1e-6)[..., None]
    scores = torch.einsum("bcd,kd->bck", F.normalize(region, dim=-1), text.to(region.dtype))
    return torch.einsum("bchw,bck->bkhw", masks, scores)


class _GlobalView(nn.Module):
    """CLIP's global image embedding e_v at any input size (positions resized bicubically to the grid).
    A module so the teacher can run it with its own weights (``torch.func.functional_call``)."""

    def __init__(self, tower: CLIPVisionTower):
        super().__init__()
        self.tower = tower

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self.tower.tokens_before_last_block(images, ValuePathCLIP.position_resize)
        return self.tower.global_embedding(x)


def _buffer_tree(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module holding a copy of each tensor as a buffer at its dotted name (``a.b.c`` -> module a.b,
    buffer c), so the teacher's state-dict names mirror the student's."""
    root = nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.register_buffer(leaf, tensor.detach().clone())
    return root


@register_method(
    "vilseg",
    defaults=InferenceConfig(short_side=224, crop=0, logit_scale=100.0),
    summary="Image encoder trained on captions (DINO-style L_vision + InfoNCE) + IIC clustering head; "
    "clusters pooled and classified by cosine with 'a photo of a {}'.",
    reference="Liu et al., Open-world Semantic Segmentation via Contrasting and Clustering Vision-Language "
    "Embedding (ViL-Seg), ECCV 2022 (arXiv 2207.08455)",
    trainable=True,
    weights="no released weights: train them with `vocabseg train --recipe vilseg_clip_vitb_cc3m`",
    templates="photo",
)
class ViLSeg(TrainedCLIPMethod):
    """Args:
    clusters: C, the clustering head's clusters (the paper: 25 in Sec. 4.1, 20 after its ablation).
    overcluster: also train IIC's auxiliary over-clustering head of 3C clusters (unused at inference).
    head: the projection Φ_a of L_vision: ``dino`` (DINO's MLP head) or ``linear`` (the paper's).
    head_dim, head_hidden, head_bottleneck: its output size (2048 in the paper), and the DINO head's
        hidden and bottleneck widths.
    trainable_blocks: how many of the last image blocks train (4: blocks 9-12 of ViT-B/16), or ``"all"``:
        the whole image tower (patch and position embeddings included; the paper's from-scratch training).
    train_text: train the text tower too (the paper; with CLIP's weights it stays frozen).
    masks: ``hard`` (argmax masks, the paper) or ``soft`` (cluster probabilities) at inference.
    vision_weight, cross_weight, cluster_weight: the weights of L_vision, L_cross and L_cluster (1:1:1).
    student_temp, teacher_temp, center_momentum: DINO's τ_s, τ_t and centre momentum.
    teacher_momentum: the EMA momentum of the teacher (DINO's base value; kept constant here).
    cluster_grad: let L_cluster train the encoder too (the paper trains only Φ_c with it).
    iic_window: IIC's displacement window: pixels are also paired with neighbours up to this many grid
        cells away (0: each pixel with itself, the paper's Eq. 7).
    """

    def __init__(
        self,
        clip: nn.Module,
        clusters: int = 25,
        overcluster: bool = False,
        head: str = "dino",
        head_dim: int = 2048,
        head_hidden: int = 2048,
        head_bottleneck: int = 256,
        trainable_blocks: int | str = 4,
        train_text: bool = False,
        masks: str = "hard",
        vision_weight: float = 1.0,
        cross_weight: float = 1.0,
        cluster_weight: float = 1.0,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        teacher_momentum: float = 0.996,
        cluster_grad: bool = False,
        iic_window: int = 0,
    ):
        super().__init__(clip)
        if masks not in MASK_MODES:
            raise MethodOptionError(f"masks={masks!r} is not one of {MASK_MODES}.")
        if clusters < 2:
            raise MethodOptionError(f"clusters={clusters}: the clustering head needs at least 2 clusters.")
        if not 0 <= teacher_momentum <= 1 or not 0 <= center_momentum <= 1:
            raise MethodOptionError(
                f"teacher_momentum={teacher_momentum} and center_momentum={center_momentum} must lie in [0, 1]."
            )
        self.dense = ValuePathCLIP(clip)
        self.global_view = _GlobalView(self.dense.tower)
        self.masks = masks
        self.train_text = train_text
        self.loss_weights = (vision_weight, cross_weight, cluster_weight)
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum, self.teacher_momentum = center_momentum, teacher_momentum
        self.cluster_grad, self.iic_window = cluster_grad, iic_window
        dim = int(getattr(clip.visual, "output_dim", 0) or clip.text_projection.shape[-1])
        self.cluster_head = ClusterHead(dim, clusters, overcluster)
        self.projection = build_projection_head(head, dim, head_dim, head_hidden, head_bottleneck)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        tower = self._trainable_tower(trainable_blocks)
        for p in tower.values():
            p.requires_grad_(True)
        if train_text:
            for name, p in clip.named_parameters():
                if not name.startswith(_NOT_TEXT):
                    p.requires_grad_(True)
        self.teacher = nn.Module()
        self.teacher.tower = _buffer_tree(tower)  # EMA copies of the trainable image-tower tensors
        self.teacher.head = copy.deepcopy(self.projection).requires_grad_(False)
        self.teacher.register_buffer("center", torch.zeros(1, head_dim))
        self.tokenizer: Any = None

    def _trainable_tower(self, trainable_blocks: int | str) -> dict[str, nn.Parameter]:
        """The image-tower parameters that train, by their names under ``clip.visual``."""
        visual = self.clip.visual
        params = dict(visual.named_parameters())
        if trainable_blocks == "all":
            return params
        depth = len(visual.transformer.resblocks)
        if isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int):
            raise MethodOptionError(f"trainable_blocks={trainable_blocks!r}: give a number of blocks or 'all'.")
        if not 1 <= trainable_blocks <= depth:
            raise MethodOptionError(
                f"trainable_blocks={trainable_blocks}: this image tower has {depth} blocks; give 1..{depth} or 'all'."
            )
        first = depth - trainable_blocks
        prefixes = tuple(f"transformer.resblocks.{i}." for i in range(first, depth))
        return {n: p for n, p in params.items() if n.startswith(prefixes)}

    def shared_clip_prefixes(self) -> tuple[str, ...]:
        return ("dense.", "global_view.")

    def train(self, mode: bool = True) -> ViLSeg:
        super().train(mode)
        self.clip.eval()  # no dropout or batch statistics in CLIP, trained or not
        self.teacher.eval()
        return self

    # -- inference ----------------------------------------------------------------------------------
    def cluster_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """The clustering head's (B, C, h, w) softmax on the grid of CLIP-normalised ``images``."""
        return self.cluster_head(self.dense(images))

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """Each cluster's pooled embedding classified by cosine and painted over its pixels
        (:func:`paint_regions`), bilinearly upsampled to the window."""
        h, w = windows.shape[-2:]
        left, right, top, bottom = centered_padding(h, w, pad_multiple)
        padded = F.pad(windows, (left, right, top, bottom)) if (left or right or top or bottom) else windows
        dense = self.dense(padded)
        probs = self.cluster_head(dense)  # in the method's dtype; the softmax in float32
        feats = F.normalize(dense.float(), dim=1)
        if self.masks == "hard":
            probs = F.one_hot(probs.argmax(1), probs.shape[1]).permute(0, 3, 1, 2).to(feats.dtype)
        painted = paint_regions(feats, probs, text.float())
        painted = F.interpolate(painted, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return painted[:, :, top : top + h, left : left + w]

    # -- training -----------------------------------------------------------------------------------
    def prepare_training(self, clip: Any, dataset: Any) -> None:
        """No class labels: keep the tokenizer, to embed each batch's captions."""
        self.tokenizer = clip.tokenizer

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``clip`` / ``head`` as every trained method, each split off into ``*_no_decay`` for biases,
        norm gains and the logit scale (tensors of < 2 dims), which CLIP and DINO train without
        weight decay (a recipe sets ``wd_mult`` 0 for them)."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                group = "clip" if name.startswith("clip.") else "head"
                groups.setdefault(group + ("_no_decay" if p.ndim < 2 else ""), []).append(p)
        return groups

    def _teacher_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """e_v of the teacher: the image tower with the teacher's copies of the trainable tensors."""
        state = {f"tower.visual.{n}": t for n, t in self.teacher.tower.named_buffers()}
        return functional_call(self.global_view, state, (images,))

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``batch``: ``image`` (B, 3, H, W) the CLIP-normalised global view, ``local_crops`` (B, V, 3, h, w)
        the local views, ``caption`` the B captions."""
        if self.tokenizer is None:
            raise RuntimeError("prepare_training(clip, dataset) must give the tokenizer first (to embed captions).")
        images, crops, captions = batch["image"], batch["local_crops"], list(batch["caption"])
        if crops.dim() != 5 or crops.shape[0] != images.shape[0] or len(captions) != images.shape[0]:
            raise ValueError(
                f"expected image (B, 3, H, W), local_crops (B, V, 3, h, w) and B captions; got {tuple(images.shape)}, "
                f"{tuple(crops.shape)} and {len(captions)} captions"
            )
        dense, image_emb = self.dense(images, return_global=True)

        tokens = self.tokenizer(captions).to(images.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text):
            text_emb = encode_text_fast(self.clip, tokens)
        cross = contrastive_loss(image_emb, text_emb, self.logit_scale)

        b, v = crops.shape[:2]
        student = self.projection(self.global_view(crops.flatten(0, 1))).view(b, v, -1)
        with torch.no_grad():
            teacher = self.teacher.head(self._teacher_embedding(images))
        vision = dino_loss(student, teacher, self.teacher.center, self.student_temp, self.teacher_temp)
        update_center(self.teacher.center, teacher, self.center_momentum)

        feats = dense if self.cluster_grad else dense.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cluster_grad):
            transformed, flipped = photometric_flip(images)
            feats2 = self.dense(transformed)
        pairs = zip(self.cluster_head.all_heads(feats), self.cluster_head.all_heads(feats2))
        cluster = sum(iic_loss(p1, unflip(p2, flipped), window=self.iic_window) for p1, p2 in pairs)

        wv, wc, wk = self.loss_weights  # a zero weight still computes its term: DDP needs every parameter used
        loss = wv * vision + wc * cross + wk * cluster
        return {
            "loss": loss,
            "vision": vision.detach(),
            "cross": cross.detach(),
            "cluster": cluster.detach(),
            "logit_scale": self.logit_scale.detach().exp(),
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The teacher follows the student: ``t ← m·t + (1 − m)·s`` for the trained image-tower tensors and
        the projection head (DINO's momentum teacher)."""
        m = self.teacher_momentum
        student = dict(self.clip.visual.named_parameters())
        for name, shadow in self.teacher.tower.named_buffers():
            shadow.mul_(m).add_(student[name].detach().to(shadow.dtype), alpha=1 - m)
        for shadow, param in zip(self.teacher.head.parameters(), self.projection.parameters()):
            shadow.mul_(m).add_(param.detach().to(shadow.dtype), alpha=1 - m)

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """The teacher as DINO starts it: a copy of the student, with a zero centre."""
        student = dict(self.clip.visual.named_parameters())
        for name, shadow in self.teacher.tower.named_buffers():
            shadow.copy_(student[name])
        self.teacher.head.load_state_dict(self.projection.state_dict())
        self.teacher.center.zero_()

    # -- checkpoints --------------------------------------------------------------------------------
    def inference_state(self) -> dict[str, torch.Tensor]:
        """:meth:`checkpoint_state` without the teacher: all that segmenting needs."""
        return {n: t for n, t in self.checkpoint_state().items() if not n.startswith(TEACHER)}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Strict loading (see :class:`TrainedCLIPMethod`); a state without any teacher tensor (weights
        kept for inference only, :meth:`inference_state`) is accepted, and the teacher restarts as a
        copy of the student. A partial teacher is an error."""
        if any(n.startswith(TEACHER) for n in state):
            super().load_checkpoint_state(state)
            return
        own = self.state_dict()
        teacher = {n: own[n] for n in self._stored_names() if n.startswith(TEACHER)}
        super().load_checkpoint_state({**state, **teacher})
        self.reset_teacher()


class ViLSegMasks:
    """ViL-Seg's clusters as class-agnostic region masks: a :class:`~vocabseg.masks.base.MaskGenerator`
    for methods that reason over regions (``corrclip``'s ``masks=``), or for looking at the clusters.

    The image is resized so its short side is ``short_side`` (the long side capped at ``max_long_side``),
    the clustering head's probabilities are upsampled bilinearly back to the image, and each cluster that
    wins some pixel is one mask (the masks partition the image).
    """

    persistent = True  # the identity is a digest of the weights

    def __init__(
        self,
        method: ViLSeg,
        mean: Sequence[float],
        std: Sequence[float],
        short_side: int = 224,
        max_long_side: int = 2048,
    ):
        if not isinstance(method, ViLSeg):
            raise MethodOptionError(f"ViLSegMasks needs a vilseg method, got {type(method).__name__}.")
        self.method, self.short_side, self.max_long_side = method, short_side, max_long_side
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_segmenter(cls, segmenter: Any, **options: Any) -> ViLSegMasks:
        """The clusters of a ``Segmenter(method="vilseg", weights=...)``."""
        return cls(segmenter.method, segmenter.clip.mean, segmenter.clip.std, **options)

    @property
    def identity(self) -> str:
        return f"vilseg:{weights_fingerprint(self.method)}:{self.short_side}:{self.max_long_side}"

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        param = next(self.method.parameters())
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        x = resize_image((x - self.mean) / self.std, rescaled_size(h, w, self.short_side, self.max_long_side))
        probs = self.method.cluster_probabilities(x[None].to(param.device, param.dtype))
        labels = F.interpolate(probs.float(), size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0]
        labels = labels.cpu().numpy()
        return as_masks([labels == c for c in np.unique(labels)], (h, w), "vilseg clusters")
