"""``corrclip``: CorrCLIP (Zhang et al., ICCV 2025), reconstructed patch correlations.

CorrCLIP replaces the attention of CLIP's last block by correlations taken from a vision foundation
model (VFM, DINO) and bounded by class-agnostic region masks (SAM 2), and adds two branches. Per
window, with the VFM grid (h', w') and M = h'·w' (the paper's component names):

1. Value reconstruction: E = the VFM's last-block query + key, q(z) + k(z) with z the
   block's LN1 input, per patch token, each L2-normalised; S = EEᵀ (M, M).
2. Mask merging: the region masks, painted into one label map (ascending area, so larger
   masks overwrite smaller ones; 0 = in no mask) and resized (nearest) to the VFM grid, are grouped by
   DBSCAN (min_samples 1, eps ``merge_eps`` 0.2) on the distance max(C) − C, C the cosine of the
   regions' mean E. With min_samples 1 DBSCAN's clusters are the connected components of the graph
   "distance ≤ eps" (every point is a core point), found here by label propagation.
3. Scope reconstruction: pixels i, j may correlate when they lie in the same merged region,
   or when either lies in no mask and S_ij > mean(S) (the image's mean over all M² entries);
   Attn = softmax(τ·S) over the allowed pairs (τ = ``tau``, 4), shared by the heads.
4. Main branch: O(Attn·V), V the last block's values of LN1(X_L) (X_L its input), patch tokens
   bilinearly resized to the VFM grid; no residual, no FFN.
5. Spatial branch: the same with X_L replaced by the mean of the outputs of ``num_spatial``
   blocks: 0-based blocks L−2−n .. L−3 (ViT-B/16: n = 5, blocks 5..9; the official table gives 12 for
   24 blocks, 28 for 32, L − 4 otherwise; clamped here to 1..L−2 so that 3-block towers work).
6. Semantic branch: one extra token per merged region (unsegmented pixels and window padding
   count as regions), initialised with the embedded CLS token, runs through every block attending only
   to the CLS token and its region's patches (the merged labels resized nearest to CLIP's grid; other
   tokens never attend to it, so CLIP's own tokens are unchanged). Its last-block output (residual and
   FFN included) is painted onto its region on the VFM grid.
7. F = (LN_post(main) + α·LN_post(spatial) + β·LN_post(semantic))·P, α = ``alpha`` 1, β = ``beta``
   0.5; the logits are cos(F, t), bilinearly upsampled to the padded window and cropped back.
8. Map correction: after the windows are averaged, every region of the (unmerged) label map
   takes its modal name: the argmax name most frequent among its pixels (ties: the lowest name index).
   The seam returns logits, so each pixel of the region gets the mean logits of the region's pixels
   whose argmax is that name; every such pixel has it as its maximum and a mean keeps the inequality,
   so the region's argmax is exactly the official modal assignment.

Masks are made on the whole (resized) image, so ``crop`` 0 is registered and the sliding windows
(``slide_crop`` / ``slide_stride``, each zero-padded centred to ``pad_multiple``) are cut inside
:meth:`CorrCLIP.logits`, as CLIPer does. Batches are per image (the official code runs one image).

The paper's backbone is MetaCLIP ViT-B/16 (open_clip ``ViT-B-16-quickgelu`` / ``metaclip_fullcc``),
masks from SAM 2 (hiera-large, 8 × 8 points, IoU and stability thresholds 0.4); its average over
eight benchmarks is 51.0 mIoU. Our defaults keep the library's CLIP (``--model`` picks MetaCLIP) and
SAM 2.1 hiera-large through transformers. Protocol: short side 336 (ADE, Cityscapes 448), windows 336 /
112 padded to multiples of 56 (Cityscapes 224: the method option ``slide_crop``), logit scale 40, probability
thresholds VOC21 0.2, Context-60 0.15, COCO-Object 0.25.

Deviations from the official code:

* Labels: the official code treats the smallest label of a window as "unsegmented" even when every
  pixel is covered by a mask (and then merges only when three labels are present); here only label 0
  is unsegmented and merging runs whenever two regions or more are present.
* A row whose every pair is masked (possible only when all of S equals its mean) keeps its diagonal
  instead of becoming NaN.
* Map correction is applied to the names' logits at the resized image (before the pipeline's upsampling,
  probability threshold and synonym merging), where the official code takes the mode of the final class
  map (after thresholding) at the original size; the masks are made on the resized image.
* float32 attention (the official code runs CLIP, DINO and SAM 2 in float16); position embeddings are
  resized as the library's other methods do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodOptionError
from ..inference.config import InferenceConfig
from ..inference.sliding import centered_padding, window_boxes
from ..masks import SAM_FAMILIES, CachedMasks, CallableMasks, MaskGenerator, create_mask_generator
from ..models.clip import clip_normalization
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD, last_block_qkv, load_vfm
from ..models.vit import CLIPVisionTower
from ..text.encoder import default_cache_dir
from .base import SegmentationMethod
from .registry import PaperSettings, register_method

#: the official SAM 2 automatic-mask settings (``SAM2AutomaticMaskGenerator`` in corrclip_segmentor.py)
SAM_MASK_OPTIONS = {"points_per_side": 8, "pred_iou_thresh": 0.4, "stability_score_thresh": 0.4}
#: spatial-branch blocks per CLIP depth (official); other depths use depth - 4
NUM_SPATIAL = {12: 5, 24: 12, 32: 28}


# -- region masks ---------------------------------------------------------------------------------------------
def label_map(masks: np.ndarray) -> torch.Tensor:
    """(M, H, W) bool masks -> (H, W) int64 labels: masks painted by ascending area (larger ones win
    overlaps), mask of rank r labelled r + 1, 0 where no mask is."""
    areas = masks.sum((1, 2))
    labels = np.zeros(masks.shape[1:], dtype=np.int64)
    for rank, index in enumerate(np.argsort(areas, kind="stable")):
        labels[masks[index]] = rank + 1
    return torch.from_numpy(labels)


def connected_components(adjacency: torch.Tensor) -> torch.Tensor:
    """Component index (R,) of each node of a symmetric boolean graph (R, R) with self-loops, numbered by
    their first node: DBSCAN's clusters with ``min_samples=1`` (every node is a core point)."""
    r = adjacency.shape[0]
    root = torch.arange(r, device=adjacency.device)
    while True:  # each node takes the smallest root among its neighbours until nothing changes
        smallest = torch.where(adjacency, root[None, :], r).amin(1)
        if torch.equal(smallest, root):
            break
        root = smallest
    return torch.unique(root, return_inverse=True)[1]


def merge_regions(labels: torch.Tensor, feats: torch.Tensor, eps: float) -> torch.Tensor:
    """Merged labels (M,) on the VFM grid: regions (labels ≥ 1) whose mean unit features (M, C) are within
    ``eps`` of each other (distance max(C) − C, C their cosine), chained, get one label 1..; 0 stays 0."""
    ids, inverse = torch.unique(labels, return_inverse=True)
    segmented = ids > 0
    if int(segmented.sum()) < 2:
        return labels
    sums = feats.new_zeros((len(ids), feats.shape[1])).index_add_(0, inverse, feats)
    means = F.normalize(sums[segmented], dim=1)
    cos = means @ means.T
    cluster = connected_components((cos.max() - cos) <= eps)
    new_ids = torch.zeros_like(ids)
    new_ids[segmented] = cluster + 1
    return new_ids[inverse]


def scope_attention(sim: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(τ·S) over the pairs of one window (M, M) that share a merged region, or that involve an
    unsegmented pixel (label 0) and have S above its mean; an empty row keeps its diagonal."""
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] > 0)
    unsegmented = (labels[:, None] == 0) | (labels[None, :] == 0)
    allowed = same | (unsegmented & (sim > sim.mean()))
    allowed |= torch.eye(len(labels), dtype=torch.bool, device=sim.device) & ~allowed.any(1, keepdim=True)
    return (tau * sim).masked_fill(~allowed, float("-inf")).softmax(-1)


def apply_map_correction(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K, H, W) logits with every region (labels (H, W) ≥ 1) set to the mean logits of its pixels whose
    argmax is the region's most frequent argmax name (ties: the lowest index); so its argmax is that name."""
    k = logits.shape[0]
    flat = logits.flatten(1).T  # (N, K)
    regions = labels.flatten().to(logits.device)
    ids, inverse = torch.unique(regions, return_inverse=True)
    pred = flat.argmax(1)
    votes = flat.new_zeros((len(ids), k)).index_put_((inverse, pred), torch.ones_like(pred, dtype=flat.dtype), True)
    mode = votes.argmax(1)
    voter = pred == mode[inverse]
    means = flat.new_zeros((len(ids), k)).index_add_(0, inverse[voter], flat[voter])
    means /= votes.gather(1, mode[:, None])
    out = torch.where((regions > 0)[:, None], means[inverse], flat)
    return out.T.reshape(logits.shape)


# -- the VFM's last-block query + key ----------------------------------------------------------------------
def _timm_vit(vfm: Any) -> nn.Module | None:
    model = getattr(vfm, "model", vfm)
    blocks = getattr(model, "blocks", None)
    ok = (
        isinstance(model, nn.Module)
        and blocks is not None
        and isinstance(getattr(getattr(blocks[-1], "attn", None), "qkv", None), nn.Linear)
        and hasattr(getattr(model, "patch_embed", None), "dynamic_feat_size")
        and getattr(vfm, "fixed_size", None) is None
    )
    return model if ok else None


def last_block_query_key(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """q + k of the last attention block of a timm ViT per patch token, as (B, C, h, w): the DINO
    features CorrCLIP correlates."""
    q, k, _ = last_block_qkv(model, images)
    return (q + k).float()


# -- CLIP pieces -------------------------------------------------------------------------------------------
def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    t, d = x.shape
    return x.view(t, heads, d // heads).transpose(0, 1)


def region_token_block(block: nn.Module, tokens: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor):
    """One CLIP residual block for extra query tokens (R, D) that attend to the block's input tokens
    ``context`` (T, D) where ``allowed`` (R, T) is True, never to each other (the official attention mask,
    under which CLIP's own tokens do not attend to them either)."""
    attn = block.attn
    d = tokens.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    bias = (lambda i: None) if b is None else (lambda i: b[i * d : (i + 1) * d])
    q = F.linear(block.ln_1(tokens), w[:d], bias(0))
    kv_in = block.ln_1(context)
    k, v = F.linear(kv_in, w[d : 2 * d], bias(1)), F.linear(kv_in, w[2 * d :], bias(2))
    h = attn.num_heads
    out = F.scaled_dot_product_attention(_split_heads(q, h), _split_heads(k, h), _split_heads(v, h), allowed)
    out = F.linear(out.transpose(0, 1).reshape(-1, d), attn.out_proj.weight, attn.out_proj.bias)
    y = tokens + block.ls_1(out)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MasksLike = str | MaskGenerator | Callable[[np.ndarray], Any]


@register_method(
    "corrclip",
    defaults=InferenceConfig(crop=0, pad_multiple=56),
    summary="VFM (DINO q+k) correlations bounded by merged SAM 2 regions, CLIP values; spatial (mid-layer) "
    "and semantic (region-token) branches; regions vote for their modal name.",
    reference="Zhang et al., CorrCLIP: Reconstructing Patch Correlations in CLIP for Open-Vocabulary "
    "Semantic Segmentation, ICCV 2025",
    paper=PaperSettings(
        "zdk258/CorrCLIP CorrCLIPv1/configs/cfg_*.py, ADE from CorrCLIPv2/configs/cfg_ade*.py",
        {
            "voc21": {"prob_threshold": 0.2},
            "context60": {"prob_threshold": 0.15},
            "coco_object": {"prob_threshold": 0.25},
            "cityscapes": {"short_side": 448},
            "ade150": {"short_side": 448},
            "ade847": {"short_side": 448},
        },
        options={"cityscapes": {"slide_crop": 224}},
    ),  # fmt: skip
)
class CorrCLIP(SegmentationMethod):
    """Args:
    vfm: a VFM name (``dino_vitb8``...) or a timm ViT (or :class:`~vocabseg.models.vfm.TimmVFM`) whose
        last block has a fused ``qkv``; its query + key give the correlations.
    vfm_pretrained: for a VFM name: ``"default"`` (hub weights), a local file, or ``None`` (random).
    masks: a mask-generator name (``sam2``, ``sam``, see ``vocabseg.masks``), a generator object, or a
        function ``image (H, W, 3) uint8 -> masks``. Masks are cached per image in memory.
    mask_options: keywords for a named generator (default for SAM families: the official 8 × 8 points,
        IoU and stability thresholds 0.4; pass e.g. ``{"device": "cuda", "model": "/path"}``).
    alpha, beta: weights of the spatial and semantic branches (0 skips a branch).
    tau: temperature of the reconstructed attention.
    merge_eps: DBSCAN radius of the mask merging (cosine distance; 0 merges only identical regions).
    num_spatial: blocks averaged by the spatial branch (None: the official value for the depth).
    slide_crop, slide_stride: the windows cut inside each image, in pixels (0: one window).
    map_correction: regions vote for their modal name (step 8).
    """

    def __init__(
        self,
        clip: nn.Module,
        vfm: str | nn.Module = "dino_vitb8",
        vfm_pretrained: str | None = "default",
        masks: MasksLike = "sam2",
        mask_options: dict[str, Any] | None = None,
        alpha: float = 1.0,
        beta: float = 0.5,
        tau: float = 4.0,
        merge_eps: float = 0.2,
        num_spatial: int | None = None,
        slide_crop: int = 336,
        slide_stride: int = 112,
        map_correction: bool = True,
    ):
        super().__init__()
        self.tower = CLIPVisionTower(clip.visual)
        blocks = self.tower.visual.transformer.resblocks
        depth = self.tower.depth
        if depth < 3 or any(not hasattr(b.attn, "in_proj_weight") for b in blocks):
            raise TypeError("corrclip needs a CLIP of 3 blocks or more, each with a fused in_proj_weight.")
        for name, value in (("alpha", alpha), ("beta", beta), ("merge_eps", merge_eps)):
            if not _is_number(value) or value < 0:
                raise MethodOptionError(f"corrclip: {name} must be a number >= 0, got {value!r}.")
        if not _is_number(tau) or tau <= 0:
            raise MethodOptionError(f"corrclip: tau must be a number > 0, got {tau!r}.")
        if num_spatial is None:
            num_spatial = min(max(NUM_SPATIAL.get(depth, depth - 4), 1), depth - 2)
        elif not _is_int(num_spatial) or not 1 <= num_spatial <= depth - 2:
            raise MethodOptionError(
                f"corrclip: num_spatial must be an integer from 1 to {depth - 2} (this CLIP has {depth} blocks) "
                f"or None, got {num_spatial!r}."
            )
        patch = self.tower.patch_size[0]
        if not _is_int(slide_crop) or slide_crop < 0 or 0 < slide_crop < patch:
            raise MethodOptionError(
                f"corrclip: slide_crop must be 0 (one window) or an integer >= the patch size ({patch}), "
                f"got {slide_crop!r}."
            )
        if not _is_int(slide_stride) or slide_stride < 1 or (slide_crop and slide_stride > slide_crop):
            raise MethodOptionError(
                f"corrclip: slide_stride must be an integer from 1 to slide_crop, got {slide_stride!r}."
            )
        if isinstance(vfm, str):
            vfm = load_vfm(vfm, vfm_pretrained, device=next(clip.parameters()).device)
        if _timm_vit(vfm) is None:
            raise MethodOptionError(
                f"corrclip: vfm must be a VFM name or a timm ViT (or TimmVFM) of any input size whose last block "
                f"has a fused qkv (its query + key are CorrCLIP's features); got {type(vfm).__name__}."
            )
        self.vfm = vfm
        # masks are kept per image content, on disk too (next to the text cache) for generators whose
        # identity is stable, so evaluating several variants or rerunning reuses them
        self.masks = CachedMasks(self._mask_generator(masks, mask_options), cache_dir=default_cache_dir())
        self.alpha, self.beta, self.tau, self.merge_eps = float(alpha), float(beta), float(tau), float(merge_eps)
        self.spatial_blocks = list(range(depth - 2 - num_spatial, depth - 2))
        self.slide_crop, self.slide_stride = slide_crop, slide_stride
        self.map_correction = bool(map_correction)
        mean, std = clip_normalization(clip)
        self.register_buffer("_clip_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_clip_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _mask_generator(masks: MasksLike, options: dict[str, Any] | None) -> MaskGenerator:
        if isinstance(masks, str):
            defaults = SAM_MASK_OPTIONS if masks in SAM_FAMILIES else {}
            return create_mask_generator(masks, **{**defaults, **(options or {})})
        if options:
            raise MethodOptionError("corrclip: mask_options apply to a named mask generator (masks='sam2'...).")
        if isinstance(masks, MaskGenerator):
            return masks
        if callable(masks):
            return CallableMasks(masks)
        raise MethodOptionError(
            f"corrclip: masks must be a mask-generator name, a generator or a function image -> masks; "
            f"got {type(masks).__name__}."
        )

    # -- steps 1-7: dense features of windows -------------------------------------------------------------------
    def features(self, windows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Dense features (B, E, h', w') on the VFM grid for CLIP-normalised windows (B, 3, H, W) and their
        region label maps (B, H, W) (0: in no mask), steps 1-7 of the module docstring."""
        tower = self.tower
        rgb = windows.float() * self._clip_std + self._clip_mean
        vfm_feats = last_block_query_key(_timm_vit(self.vfm), (rgb - self._imagenet_mean) / self._imagenet_std)
        b, _, gh, gw = vfm_feats.shape
        e = F.normalize(vfm_feats.flatten(2).transpose(1, 2), dim=-1)  # (B, M, C)
        on_vfm = F.interpolate(labels[:, None].float(), size=(gh, gw), mode="nearest").long().flatten(1)
        merged = torch.stack([merge_regions(on_vfm[i], e[i], self.merge_eps) for i in range(b)])
        attn = torch.stack([scope_attention(e[i] @ e[i].T, merged[i], self.tau) for i in range(b)])

        wanted = sorted(set(self.spatial_blocks) | (set(range(tower.depth - 2)) if self.beta else set()))
        x, grid, outs = tower.forward_intermediates(windows, wanted)
        kept = dict(zip(wanted, outs))
        out = tower.head(self._reconstructed(x, grid, attn, (gh, gw)))
        if self.alpha:
            spatial = torch.stack([kept[i] for i in self.spatial_blocks]).mean(0)
            out = out + self.alpha * tower.head(self._reconstructed(spatial, grid, attn, (gh, gw)))
        if self.beta:
            inputs = [tower.embed(windows)[0]] + [kept[i] for i in range(tower.depth - 2)] + [x]
            semantic = torch.stack([self._semantic(inputs, i, merged[i], grid, (gh, gw)) for i in range(b)])
            out = out + self.beta * tower.head(semantic)  # P is linear: Σ LN_post(·)·P = (Σ LN_post(·))·P
        return out.float().transpose(1, 2).reshape(b, -1, gh, gw)

    def _reconstructed(self, x: torch.Tensor, grid: tuple[int, int], attn: torch.Tensor, out_grid) -> torch.Tensor:
        """O(Attn·V(LN1_L(x))) on the VFM grid: (B, M, D), values resized bilinearly, no residual."""
        tower = self.tower
        _, _, v = tower.qkv(tower.last_block.ln_1(x))  # (B, H, 1+N, d)
        b, h, _, d = v.shape
        v = v[:, :, 1:].reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
        v = F.interpolate(v, size=out_grid, mode="bilinear", align_corners=False)
        v = v.flatten(2).transpose(1, 2).reshape(b, h, -1, d)
        return tower.out_proj(attn.unsqueeze(1).to(v.dtype) @ v)

    def _semantic(self, inputs: list[torch.Tensor], i: int, merged: torch.Tensor, grid, out_grid) -> torch.Tensor:
        """Window ``i``'s region tokens through every block, painted on the VFM grid: (M, D)."""
        on_vfm = merged.view(1, 1, *out_grid).float()
        on_clip = F.interpolate(on_vfm, size=grid, mode="nearest").long().flatten()
        ids, inverse = torch.unique(on_clip, return_inverse=True)
        allowed = torch.cat([torch.ones_like(ids, dtype=torch.bool)[:, None], ids[:, None] == on_clip[None]], 1)
        tokens = inputs[0][i, :1].expand(len(ids), -1)
        for block, context in zip(self.tower.visual.transformer.resblocks, inputs):
            tokens = region_token_block(block, tokens, context[i], allowed)
        painted = F.interpolate(inverse.view(1, 1, *grid).float(), size=out_grid, mode="nearest").long().flatten()
        return tokens[painted]

    # -- the seam -----------------------------------------------------------------------------------------------
    def image_labels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per CLIP-normalised image (B, 3, H, W): its region label map (H, W) from the mask generator."""
        rgb = (images.float() * self._clip_std + self._clip_mean).clamp(0, 1)
        arrays = (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [label_map(self.masks(np.ascontiguousarray(a))).to(images.device) for a in arrays]

    def window_logits(
        self, windows: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, pad_multiple: int
    ) -> torch.Tensor:
        """cos(F, t) (B, K, H, W) of windows with label maps, each zero-padded (centred) to ``pad_multiple``;
        the padding is a region of its own (label max + 1)."""
        h, w = windows.shape[-2:]
        left, right, top, bottom = centered_padding(h, w, pad_multiple)
        if left or right or top or bottom:
            windows = F.pad(windows, (left, right, top, bottom))
            labels = F.pad(labels, (left, right, top, bottom), value=int(labels.max()) + 1)
        feats = F.normalize(self.features(windows, labels), dim=1)
        cos = torch.einsum("bchw,kc->bkhw", feats, text.float())
        cos = F.interpolate(cos, size=windows.shape[-2:], mode="bilinear", align_corners=False)
        return cos[:, :, top : top + h, left : left + w]

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """Per-name logits (B, K, H, W) of whole images: masks, sliding windows, map correction."""
        if surgery:
            raise MethodOptionError(
                "corrclip does not take surgery=True (--surgery): its features are not CLIP's last block."
            )
        outputs = []
        h, w = windows.shape[-2:]
        for image, labels in zip(windows, self.image_labels(windows)):
            boxes = window_boxes(h, w, self.slide_crop, self.slide_stride)
            crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
            crop_labels = torch.stack([labels[y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
            crop_logits = self.window_logits(crops, crop_labels, text, pad_multiple)
            total = crop_logits.new_zeros((text.shape[0], h, w))
            count = crop_logits.new_zeros((h, w))
            for (y1, y2, x1, x2), out in zip(boxes, crop_logits):
                total[:, y1:y2, x1:x2] += out
                count[y1:y2, x1:x2] += 1
            out = total / count
            outputs.append(apply_map_correction(out, labels) if self.map_correction else out)
        return torch.stack(outputs)
