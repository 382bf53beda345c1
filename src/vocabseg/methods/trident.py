"""``trident``: Trident (Shi et al., ICCV 2025): ProxyCLIP on sub-images, spliced, then aggregated
over the whole image with SAM's attention.

Per image (CLIP-normalised, H x W), with the CLIP patch p:

1. Sub-images. The image is resized (bilinear) to multiples of p: its long side up to the next
   multiple, the short side scaled with it and rounded up, each side at least ``slide_crop`` (the
   official ``preprocess_image``; an image already in multiples of p and no smaller than the crop is
   kept). Crops of ``slide_crop`` px every ``slide_stride`` px (mmseg's grid, in whole patches).
2. Stage 1, per crop: ProxyCLIP's last block (:mod:`~vocabseg.methods.proxyclip`), with the CLS
   token dropped: S = ÊÊᵀ from the VFM's final tokens E (DINO ViT-B/16 by default),
   A = softmax(γ(S − β·mean S)) with entries below 0 masked, Y = O(A·V'), V' = CLIP's values resized
   to the VFM grid; no residual, no FFN, no LN_post yet. As in the official code the crops of an image
   run as one batch and mean S is that batch's mean: one mean over all crops of the image.
3. Splicing: the crops' Y (features, not logits) are pasted into one map over the whole image, on the
   CLIP grid times r = round(VFM grid / CLIP grid) (r = 1 for DINO ViT-B/16; a VFM grid that is not r
   times the CLIP grid is first resized to it), averaged where crops overlap.
4. SAM. The image goes through SAM's image encoder the way SAM takes it: long side resized to the
   encoder's input size S (1024 for SAM ViT-B, bilinear), ImageNet-normalised, zero-padded at the
   bottom and right to S x S. The valid grid (h_s, w_s) = (resized size) // SAM patch is the part of
   the S/16 x S/16 grid the image covers. From the last block (a global-attention block):
   P_h = softmax(s·q_h k_hᵀ + B_rel) over the whole grid (B_rel SAM's decomposed relative-position
   bias), and the values v_h; both are then cut to the valid grid (rows and columns; no new softmax).
5. Aggregation weights: c_h(i, j) = cos(v_h,i, v_h,j); τ_i = min(cos_fac · mean_{h,j} c_h(i, j), 0.9)
   (per query token; with ``refine_neg_cos`` off a negative τ_i becomes 0.6 first);
   W = mean_h [P_h ⊙ (c_h > τ_i)], rows normalised to sum 1.
6. Output: the spliced map, resized (bilinear) to (h_s, w_s), F = LN_post(W·Y)·P (no out-projection
   after the aggregation, no residual): the dense features on SAM's valid grid. The logits are
   cos(F, t), bilinearly upsampled to the window.

``crop`` 0 is registered: the Segmenter's window is the whole resized image and the sub-images of
step 1 are cut inside :meth:`Trident.logits` (CLIPer's pattern). Trident is not a
:class:`~vocabseg.methods.base.DenseCLIPMethod` (its features need the whole image), so the ONNX
backends leave it on PyTorch, and it does not take ``surgery``.

Protocol (official ViT-B/16 configs, SAM ViT-B, DINO ViT-B/16): crops 336 / 224, γ 3, β 1.2,
cos_fac 1.2, logit scale 40; short side 448 (VOC21, COCO-Object, COCO-Stuff, ADE-847, Context-459),
576 (Context-60, Context-59, ADE-150), 688 (Cityscapes), 336 (VOC20); probability thresholds VOC21 0.2,
Context-60 0.15, COCO-Object 0.25; method options (registered with the paper protocol): VOC20
``slide_stride=112, cos_fac=0``; Cityscapes ``cos_fac=3.0, refine_neg_cos=False``; ADE-150
``refine_neg_cos=False``. Paper average over the eight benchmarks: 45.8 mIoU.

Deviations from the official code:

* The optional SAM refinement (box prompts from the coarse masks, ``--sam_refine``) is not implemented.
* SAM sees the Segmenter's window (the resized image), resized to its input size (bilinear,
  antialiased, on the normalised image), where the official code reads the original file again and
  resizes it with PIL; on Cityscapes it runs SAM on the left and right halves separately (two
  aggregations), which is not done here.
* The output is upsampled to the window, and the window to the image by the pipeline; the official code
  upsamples once, to the original image.
* Attention, splicing and aggregation in float32, the networks in the Segmenter's dtype (the official
  code runs everything in float16); the images of a batch are processed independently (the official
  code runs one image at a time).
* Only where the official code gives NaN or fails: a proxy-attention row with every entry masked keeps
  its diagonal (as in ``proxyclip``); an image whose resized side is below one SAM patch gets a valid
  grid of one token on that side; an image in multiples of p but smaller than the crop is resized up to
  it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodOptionError, WeightsUnavailableError
from ..inference.config import InferenceConfig
from ..inference.sliding import centered_padding, window_boxes
from ..models.vfm import TimmVFM, load_vfm
from ..models.vit import CLIPVisionTower
from .base import SegmentationMethod
from .proxyclip import ProxyCLIP, VFMLike
from .registry import PaperSettings, register_method

#: upper bound of the cosine threshold τ (official: "avoid too large sim_thresh")
MAX_COS_THRESHOLD = 0.9
#: τ where it is negative and ``refine_neg_cos`` is off (official Cityscapes / ADE-150 setting)
NEGATIVE_COS_THRESHOLD = 0.6


# -- geometry ----------------------------------------------------------------------------------------------------
def snapped_size(height: int, width: int, patch: int, crop: int) -> tuple[int, int]:
    """Step 1's size: multiples of ``patch``, each side at least ``crop`` (official ``preprocess_image``)."""
    if height % patch == 0 and width % patch == 0 and min(height, width) >= crop:
        return height, width
    longer = max(height, width)
    target = math.ceil(longer / patch) * patch
    new_h, new_w = int(height * target / longer), int(width * target / longer)
    new_h, new_w = math.ceil(new_h / patch) * patch, math.ceil(new_w / patch) * patch
    return max(new_h, crop), max(new_w, crop)


def sam_input_size(height: int, width: int, size: int) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide``: the long side to ``size``, the other scaled and rounded (>= 1)."""
    scale = size / max(height, width)
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


# -- SAM's image encoder (timm ``VisionTransformerSAM``) ---------------------------------------------------------
def sam_encoder(sam: nn.Module) -> nn.Module:
    """The timm SAM ViT inside ``sam`` (a :class:`TimmVFM` or the timm model), checked for what
    :func:`sam_last_attention` reads: absolute positions, global attention in the last block."""
    encoder = sam.model if isinstance(sam, TimmVFM) else sam
    blocks = getattr(encoder, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if isinstance(blocks, nn.Sequential) and len(blocks) else None
    if (
        not all(hasattr(attn, a) for a in ("qkv", "use_rel_pos"))
        or not hasattr(blocks[-1], "window_size")
        or not hasattr(getattr(encoder, "patch_embed", None), "img_size")
    ):
        raise MethodOptionError(
            f"trident: sam must be a SAM image encoder (timm samvit_*, e.g. sam='sam_vitb'), got {type(sam).__name__}."
        )
    if blocks[-1].window_size > 0 or getattr(attn, "rope", None) is not None:
        raise MethodOptionError(
            "trident: the SAM encoder's last block must use global attention with relative positions "
            "(as SAM's do); this one uses window attention or rotary embeddings."
        )
    size = tuple(encoder.patch_embed.img_size)
    if size[0] != size[1]:
        raise MethodOptionError(f"trident: the SAM encoder must take square inputs, this one takes {size}.")
    return encoder


def sam_last_block_input(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's input (B, gh, gw, C) for images (B, 3, S, S) at the encoder's input size (timm's
    ``forward_features`` up to the last block; the absolute positions are at their native grid)."""
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    x = encoder.norm_pre(encoder.patch_drop(encoder.pos_drop(x)))
    for block in encoder.blocks[:-1]:
        x = block(x)
    return x


def _relative_positions(table: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size, d): the embedding of offset (query − key) along one axis."""
    if table.shape[0] != 2 * size - 1:
        raise ValueError(f"relative-position table of {table.shape[0]} rows for a grid side of {size}")
    offsets = torch.arange(size, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + size - 1]


def sam_last_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities (B, heads, N, N) and values (B, heads, N, d) of SAM's last block (global
    attention) for its input x (B, gh, gw, C), N = gh·gw, float32: softmax(s·q kᵀ + B_rel), with
    B_rel(i, j) = q_i·R_h[y_i − y_j] + q_i·R_w[x_i − x_j] (timm's decomposed relative positions)."""
    attn = block.attn
    b, gh, gw, _ = x.shape
    qkv = attn.qkv(block.norm1(x).reshape(b, gh * gw, -1)).float()
    q, k, v = qkv.view(b, gh * gw, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        r_q = q.reshape(b, attn.num_heads, gh, gw, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, _relative_positions(attn.rel_pos_h.float(), gh))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, _relative_positions(attn.rel_pos_w.float(), gw))
        logits = logits + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, attn.num_heads, gh * gw, -1)
    return logits.softmax(-1), v


def sam_affinity(
    probs: torch.Tensor, values: torch.Tensor, cos_fac: float, refine_neg_cos: bool = True
) -> torch.Tensor:
    """Step 5: aggregation weights (B, M, M) from SAM's attention (B, heads, M, M) and values
    (B, heads, M, d) on the valid grid. One head at a time, so only two (M, M) maps live at once."""
    unit = F.normalize(values.float(), dim=-1)
    # τ_i = cos_fac · mean over heads and j of cos(v_i, v_j) = cos_fac · mean_h v̂_h,i · mean_j v̂_h,j
    tau = cos_fac * (unit * unit.mean(2, keepdim=True)).sum(-1).mean(1)  # (B, M)
    if not refine_neg_cos:
        tau = torch.where(tau < 0, torch.full_like(tau, NEGATIVE_COS_THRESHOLD), tau)
    tau = tau.clamp(max=MAX_COS_THRESHOLD).unsqueeze(-1)
    total = probs.new_zeros(probs.shape[0], *probs.shape[2:])
    for h in range(probs.shape[1]):
        cos = unit[:, h] @ unit[:, h].transpose(-2, -1)
        total += torch.where(cos > tau, probs[:, h], 0.0)
    total = total / probs.shape[1]
    return total / total.sum(-1, keepdim=True).clamp_min(torch.finfo(total.dtype).tiny)


# -- the method --------------------------------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_sam(sam: str | nn.Module, pretrained: str | None, device: torch.device) -> nn.Module:
    if not isinstance(sam, str):
        return sam
    if pretrained not in (None, "default") and not Path(pretrained).is_file():
        raise WeightsUnavailableError(
            f"trident: sam_pretrained={pretrained!r}: checkpoint file not found; pass an existing file, "
            "'default' (hub weights) or None (random weights)."
        )
    try:
        return load_vfm(sam, pretrained, device=device)
    except WeightsUnavailableError as exc:  # load_vfm's hint names --vfm-pretrained, which is DINO's here
        raise WeightsUnavailableError(
            f"trident: SAM {sam!r}: {str(exc).splitlines()[0]}\n  Pass a local SAM checkpoint as "
            "sam_pretrained='/path/to/sam_vit_b_01ec64.pth' (or a timm samvit file), or a module as sam=."
        ) from exc


@register_method(
    "trident",
    defaults=InferenceConfig(short_side=448, crop=0),
    summary="ProxyCLIP (DINO) on 336/224 sub-images, features spliced over the whole image and aggregated "
    "with SAM's last-block attention, masked by SAM value cosines.",
    reference="Shi et al., Harnessing Vision Foundation Models for High-Performance, Training-Free Open "
    "Vocabulary Segmentation (Trident), ICCV 2025",
    paper=PaperSettings(
        "YuHengsss/Trident configs/cfg_*.py (without --sam_refine)",
        {
            "voc21": {"prob_threshold": 0.2},
            "context60": {"short_side": 576, "prob_threshold": 0.15},
            "coco_object": {"prob_threshold": 0.25},
            "voc20": {"short_side": 336},
            "context59": {"short_side": 576},
            "ade150": {"short_side": 576},
            "cityscapes": {"short_side": 688},
        },
        options={
            "voc20": {"slide_stride": 112, "cos_fac": 0.0},
            "cityscapes": {"cos_fac": 3.0, "refine_neg_cos": False},
            "ade150": {"refine_neg_cos": False},
        },
    ),
)
class Trident(SegmentationMethod):
    """Args:
    vfm, vfm_pretrained, gamma, beta: stage 1's proxy attention, as ProxyCLIP's options.
    sam: a SAM image-encoder name (``sam_vitb``, ``sam_vitl``) or module (a timm ``samvit_*`` model,
        or a :class:`~vocabseg.models.vfm.TimmVFM` around one).
    sam_pretrained: for a SAM name: ``"default"`` (hub weights), a local file, or ``None`` (random).
    cos_fac: τ = cos_fac × the mean SAM value cosine (official 1.2; VOC20 0, Cityscapes 3).
    refine_neg_cos: keep a negative τ (official; off, a negative τ becomes 0.6: Cityscapes, ADE-150).
    slide_crop, slide_stride: the sub-images, in pixels, multiples of the CLIP patch (official 336 / 224,
        VOC20 stride 112).
    """

    def __init__(
        self,
        clip: nn.Module,
        vfm: str | VFMLike = "dino_vitb16",
        vfm_pretrained: str | None = "default",
        sam: str | nn.Module = "sam_vitb",
        sam_pretrained: str | None = "default",
        gamma: float = 3.0,
        beta: float = 1.2,
        cos_fac: float = 1.2,
        refine_neg_cos: bool = True,
        slide_crop: int = 336,
        slide_stride: int = 224,
    ):
        super().__init__()
        ph, pw = CLIPVisionTower(clip.visual).patch_size
        if ph != pw:
            raise MethodOptionError(f"trident needs square CLIP patches, this CLIP's are {ph}x{pw}.")
        for name, value in (("gamma", gamma), ("beta", beta), ("cos_fac", cos_fac)):
            if not _is_number(value):
                raise MethodOptionError(f"trident: {name} must be a finite number, got {value!r}.")
        if not isinstance(refine_neg_cos, bool):
            raise MethodOptionError(f"trident: refine_neg_cos must be True or False, got {refine_neg_cos!r}.")
        if not _is_int(slide_crop) or slide_crop <= 0 or slide_crop % ph:
            raise MethodOptionError(
                f"trident: slide_crop must be a positive multiple of the CLIP patch size ({ph}), got {slide_crop!r}."
            )
        if not _is_int(slide_stride) or slide_stride <= 0 or slide_stride % ph or slide_stride > slide_crop:
            raise MethodOptionError(
                f"trident: slide_stride must be a multiple of the CLIP patch size ({ph}) from {ph} to slide_crop "
                f"({slide_crop}), got {slide_stride!r}."
            )
        self.proxy = ProxyCLIP(clip, vfm=vfm, vfm_pretrained=vfm_pretrained, gamma=gamma, beta=beta)
        self.sam = sam_encoder(_load_sam(sam, sam_pretrained, next(clip.parameters()).device))
        self.cos_fac = float(cos_fac)
        self.refine_neg_cos = refine_neg_cos
        self.slide_crop = slide_crop
        self.slide_stride = slide_stride

    @property
    def tower(self) -> CLIPVisionTower:
        return self.proxy.tower

    # -- steps 1-3 -----------------------------------------------------------------------------------------------
    def spliced_features(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 1 on the sub-images of images (B, 3, H, W), spliced: (B, D, h, w) float32, on the CLIP
        grid of the snapped image times r (steps 1-3)."""
        patch = self.tower.patch_size[0]
        size = snapped_size(images.shape[-2], images.shape[-1], patch, self.slide_crop)
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        boxes = window_boxes(size[0], size[1], self.slide_crop, self.slide_stride)
        b, n = images.shape[0], len(boxes)
        crops = torch.stack([images[..., y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], dim=1).flatten(0, 1)
        x, grid = self.tower.tokens_before_last_block(crops)  # crops image-major: one mean per image
        tokens, (vh, vw) = self.proxy.dense_tokens(x, grid, crops, share=n)
        maps = tokens.float().transpose(1, 2).reshape(b * n, -1, vh, vw)
        r = max(round(vh / grid[0]), 1)
        if (vh, vw) != (grid[0] * r, grid[1] * r):
            maps = F.interpolate(maps, size=(grid[0] * r, grid[1] * r), mode="bilinear", align_corners=False)
        maps = maps.view(b, n, *maps.shape[1:])
        out = maps.new_zeros(b, maps.shape[2], size[0] // patch * r, size[1] // patch * r)
        count = maps.new_zeros(out.shape[-2:])
        for i, (y1, y2, x1, x2) in enumerate(boxes):  # in whole patches, each patch r x r cells
            rows, cols = slice(y1 // patch * r, y2 // patch * r), slice(x1 // patch * r, x2 // patch * r)
            out[..., rows, cols] += maps[:, i]
            count[rows, cols] += 1
        return out / count

    # -- steps 4-5 -----------------------------------------------------------------------------------------------
    def sam_weights(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """SAM's aggregation weights (B, M, M) on its valid grid (h_s, w_s), M = h_s·w_s (steps 4-5);
        one image at a time (the attention over SAM's whole grid is large)."""
        encoder = self.sam
        full = encoder.patch_embed.img_size[0]
        sp = encoder.patch_embed.patch_size[0]
        sh, sw = sam_input_size(images.shape[-2], images.shape[-1], full)
        vh, vw = max(sh // sp, 1), max(sw // sp, 1)
        dtype = next(encoder.parameters()).dtype
        weights = []
        for image in images:
            x = F.interpolate(image[None].float(), size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
            x = F.pad(self.proxy.imagenet_normalised(x), (0, full - sw, 0, full - sh))
            tokens = sam_last_block_input(encoder, x.to(dtype))
            probs, values = sam_last_attention(encoder.blocks[-1], tokens)
            gh, gw = tokens.shape[1:3]
            heads = probs.shape[1]
            probs = probs.view(1, heads, gh, gw, gh, gw)[:, :, :vh, :vw, :vh, :vw].reshape(1, heads, vh * vw, -1)
            values = values.view(1, heads, gh, gw, -1)[:, :, :vh, :vw].reshape(1, heads, vh * vw, -1)
            weights.append(sam_affinity(probs, values, self.cos_fac, self.refine_neg_cos))
        return torch.cat(weights), (vh, vw)

    # -- step 6 --------------------------------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, return_global: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Trident's dense features (B, E, h_s, w_s) on SAM's valid grid, for CLIP-normalised images; with
        ``return_global`` also CLIP's embedding of the images (B, E) (a forward pass of its own)."""
        if return_global:
            return self(images), self.tower.global_embedding(self.tower.tokens_before_last_block(images)[0])
        spliced = self.spliced_features(images)
        weights, (vh, vw) = self.sam_weights(images)
        spliced = F.interpolate(spliced, size=(vh, vw), mode="bilinear", align_corners=False)
        aggregated = weights @ spliced.flatten(2).transpose(1, 2)  # (B, M, D)
        dtype = self.tower.visual.ln_post.weight.dtype
        feats = self.tower.head(aggregated.to(dtype)).float()
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, vh, vw)

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """cos(features, text) (B, K, h, w), bilinearly upsampled to the windows."""
        if surgery:
            raise MethodOptionError(
                "trident does not take surgery=True (--surgery): Trident does not use the CLIP-Surgery "
                "adjustment (proxyclip, its stage 1, does take it)."
            )
        h, w = windows.shape[-2:]
        left, right, top, bottom = centered_padding(h, w, pad_multiple)
        padded = F.pad(windows, (left, right, top, bottom)) if (left or right or top or bottom) else windows
        feats = F.normalize(self(padded), dim=1)
        cos = torch.einsum("bchw,kc->bkhw", feats, text.float())
        cos = F.interpolate(cos, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return cos[:, :, top : top + h, left : left + w]
