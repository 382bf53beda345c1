"""``cliper``: CLIPer (Sun et al., ICCV 2025), early-layer fusion, without the Stable-Diffusion
fine-grained compensation.

CLIPer scores the names itself (a softmax over them, a threshold, a propagation), so it overrides
:meth:`~vocabseg.methods.base.SegmentationMethod.logits` rather than giving dense features to a
cosine. Per image, for a ViT with L blocks whose inputs are X_1..X_L (X_L the last block's input):

1. Blocks 1..L-1 run unchanged. Their head-wise attention maps A_i = softmax(s·Q_i K_iᵀ), over all
   1+N tokens (CLS included), are summed: Ā = Σ_i A_i, (heads, 1+N, 1+N). The layer features are
   F_i = LN1_i(X_i) for i < L (each block's LN1 output) and F_L = X_L.
2. Fused attention, per head, CLS row and column kept throughout: one Sinkhorn round
   S ← S / colsum(S), S ← S / rowsum(S), then M = (S + Sᵀ)/2, M ← max(M − colmean(M), 0) (each
   column's mean over the rows), A_f = M / rowsum(M). The official code normalises Ā in place once
   per layer, so layer k uses S after k rounds (k = 1..L) and the last layer's A_f (L rounds) is the
   one step 6 propagates with; reproduced here.
3. Every F_k goes through the last block with its A_f: Y_k = O(A_f · V(LN1_L(F_k))), no residual,
   no FFN, then LN_post·P; CLS dropped: one dense map per layer.
4. P_k = softmax over [names, mean prompt] of τ·cos(Y_k, t), τ = ``softmax_scale`` (100); the mean
   prompt is the normalised mean of the name embeddings; its column is dropped after the softmax.
5. Sliding views (``slide_crop`` > 0): the window is also cut into crops (mmseg grid, in whole
   patches); each crop runs steps 1-3. The crops' τ·cos logits (all layers) are averaged where
   crops overlap; the head mean of each crop's last A_f, patch rows and columns, is stitched into
   one (N, N) matrix W (divided by the overlap count + 1e-5, rows normalised); the logits become
   P·W (P a row vector per name) and go through step 4's softmax. P_k ← ½ P_k + ½ P_k^slide.
6. With s = ``select_layer`` (-1: the last): P_s is zeroed where below ``attention_thr`` times its
   maximum over the image (per name); the output is P_s·Ā_f + mean_k P_k, with Ā_f the head mean
   of the whole window's last A_f, patch rows and columns, applied as out_j = Σ_i P_s,i Ā_f,ij
   (P_s (K, N) @ Ā_f, as the official code), and the mean over layers includes the thresholded P_s
   (the official code thresholds in place).

The seam: :meth:`CLIPer.logits` returns log(output), bilinearly upsampled to the window first. With
the registered ``logit_scale`` 1 the pipeline's softmax gives output / Σ_names output, whose argmax
is CLIPer's. ``crop`` 0 is registered: the Segmenter's window is the whole resized image, which is
CLIPer's global view, and the sliding views of step 5 are cut inside :meth:`CLIPer.logits` (with
``crop`` > 0 every window is treated as a global view of its own). It is not a
:class:`~vocabseg.methods.base.DenseCLIPMethod`, whose logits are a cosine of dense features, so the
ONNX backends (which export those features) leave it on PyTorch. As in the official code, and unlike
the other methods, position embeddings are resized bilinearly to the grid.

Protocol (official ViT-B/16 configs): short side 336 (Cityscapes 560), sliding views 224 / 112
(VOC 336), τ 100 (COCO-Object and COCO-Stuff 50), ``attention_thr`` 0.2 (VOC 0.1, Cityscapes 0.35);
VOC is VOC21 and VOC20, and the per-dataset method options are registered with the paper protocol
(``slide_crop``, ``softmax_scale``, ``attention_thr``). Without the SD refinement,
with sliding views (the official configs' bracketed numbers): VOC21 62.1, PC60 35.7, Object 37.5,
VOC20 85.0, PC59 39.6, Stuff 26.4, City 38.3, ADE 20.6 mIoU, average 43.2.

Deviations from the official code:

* The mean prompt averages every name :meth:`~CLIPer.logits` receives (background names too: it is
  not told which they are); CLIPer averages the foreground classes only.
* Background names are scored like the other names (thresholded, propagated, returned). CLIPer drops
  its background prompts after the softmax and finds background with its own thresholds on each
  class's max-normalised map (``bkg_thre``, ``score_threshold``), which this seam does not replicate.
* The window is resized (bilinear) to the nearest multiple of the patch size, as the official code
  sizes its input image (bicubic, from the original image), and the output is upsampled to the
  window, where the official code upsamples once, to the original image.
* float32 attention sums and scores (the official code runs CLIP in float16); batched per image.
* Only where the official code gives NaN: a fused-attention row that the clamp empties keeps its
  diagonal, and a stitched row with nothing in it stays zero.
* Crop size and stride are floored to whole patches (the official values are multiples of 16 and 14).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodOptionError
from ..inference.config import InferenceConfig
from ..inference.sliding import centered_padding, window_boxes
from ..models.vit import CLIPVisionTower
from .base import SegmentationMethod
from .registry import PaperSettings, register_method
from .self_calibration import attention_probs

#: added to the overlap count that divides the stitched attention of the sliding views (official)
STITCH_EPS = 1e-5


def sinkhorn_round(s: torch.Tensor) -> torch.Tensor:
    """(..., T, T): columns, then rows, normalised to sum 1."""
    s = s / s.sum(-2, keepdim=True)
    return s / s.sum(-1, keepdim=True)


def fused_attention(s: torch.Tensor) -> torch.Tensor:
    """CLIPer's fused attention from a Sinkhorn-normalised attention sum (..., T, T): symmetrised,
    each column's mean (over the rows) subtracted, clamped at 0, rows normalised to sum 1."""
    m = (s + s.transpose(-1, -2)) / 2
    m = (m - m.mean(-2, keepdim=True)).clamp(min=0)
    empty = m.sum(-1) == 0  # nothing above the column means: the token attends to itself
    m.diagonal(dim1=-2, dim2=-1).add_(empty.to(m.dtype))
    return m / m.sum(-1, keepdim=True)


def _values(attn: nn.Module, x_ln: torch.Tensor) -> torch.Tensor:
    """The value heads (B, heads, T, head_dim) of an attention's fused in-projection."""
    d = x_ln.shape[-1]
    bias = attn.in_proj_bias
    v = F.linear(x_ln, attn.in_proj_weight[2 * d :], None if bias is None else bias[2 * d :])
    b, t, _ = v.shape
    return v.view(b, t, attn.num_heads, d // attn.num_heads).transpose(1, 2)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@register_method(
    "cliper",
    defaults=InferenceConfig(crop=0, logit_scale=1.0),
    summary="Early-layer fusion: every layer's features through the last block with the fused attention "
    "of blocks 1..L-1 (no residual, no FFN), coarse-to-fine propagation, global + sliding views (no SD).",
    reference="Sun et al., CLIPer: Hierarchically Improving Spatial Representation of CLIP for "
    "Open-Vocabulary Semantic Segmentation, ICCV 2025",
    paper=PaperSettings(
        "linsun449/cliper.code scripts/config/vit-b-16/ovs_*.yaml (without the SD refinement)",
        {"cityscapes": {"short_side": 560}},
        options={
            "voc21": {"slide_crop": 336, "attention_thr": 0.1},
            "voc20": {"slide_crop": 336, "attention_thr": 0.1},
            "coco_object": {"softmax_scale": 50.0},
            "coco_stuff": {"softmax_scale": 50.0},
            "cityscapes": {"attention_thr": 0.35},
        },
    ),
)
class CLIPer(SegmentationMethod):
    """Args:
    attention_thr: fraction of each name's maximum below which the selected layer's probabilities
        are zeroed before the propagation (official: 0.1 VOC, 0.2 most, 0.35 Cityscapes).
    softmax_scale: τ of CLIPer's own softmax over the names and the mean prompt (official
        ``logit_scale``: 100, COCO-Object / COCO-Stuff 50).
    slide_crop, slide_stride: the sliding views cut inside each window, in pixels (0: the global
        view only; official 224 / 112, VOC 336).
    select_layer: the layer whose probabilities are thresholded and propagated (official: -1 for
        ViT-B/16, -2 for most ViT-L/14 configs).
    """

    def __init__(
        self,
        clip: nn.Module,
        attention_thr: float = 0.2,
        softmax_scale: float = 100.0,
        slide_crop: int = 224,
        slide_stride: int = 112,
        select_layer: int = -1,
    ):
        super().__init__()
        self.tower = CLIPVisionTower(clip.visual)
        blocks = self.tower.visual.transformer.resblocks
        if len(blocks) < 2 or any(not hasattr(b.attn, "in_proj_weight") for b in blocks):
            raise TypeError("cliper needs a CLIP of 2 blocks or more, each with a fused in_proj_weight.")
        patch = self.tower.patch_size[0]
        depth = self.tower.depth
        if not _is_number(attention_thr) or not 0 <= attention_thr <= 1:
            raise MethodOptionError(f"cliper: attention_thr must be a number in [0, 1], got {attention_thr!r}.")
        if not _is_number(softmax_scale) or softmax_scale <= 0:
            raise MethodOptionError(f"cliper: softmax_scale must be a number > 0, got {softmax_scale!r}.")
        if not _is_int(slide_crop) or slide_crop < 0 or 0 < slide_crop < patch:
            raise MethodOptionError(
                f"cliper: slide_crop must be 0 (no sliding views) or an integer >= the patch size ({patch}), "
                f"got {slide_crop!r}."
            )
        if not _is_int(slide_stride) or slide_stride < patch or (slide_crop and slide_stride > slide_crop):
            raise MethodOptionError(
                f"cliper: slide_stride must be an integer from the patch size ({patch}) to slide_crop, "
                f"got {slide_stride!r}."
            )
        if not _is_int(select_layer) or not -depth <= select_layer < depth:
            raise MethodOptionError(
                f"cliper: select_layer must be an integer from {-depth} to {depth - 1} (this CLIP has {depth} "
                f"layers), got {select_layer!r}."
            )
        self.attention_thr = float(attention_thr)
        self.softmax_scale = float(softmax_scale)
        self.slide_crop = slide_crop
        self.slide_stride = slide_stride
        self.select_layer = select_layer

    # -- steps 1-3: every layer's features through the last block with the fused attention ------------------
    def layer_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Per-layer dense features (L, B, N, E) float32 (patch tokens, after LN_post·P), the head mean
        of the last fused attention over patches (B, N, N), the last block's input and the grid."""
        tower = self.tower
        transformer = tower.visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        x, grid = tower.embed(images, resize="bilinear")  # the official code's position embeddings
        feats, total = [], None
        for block in transformer.resblocks[:-1]:
            x_ln = block.ln_1(x)
            feats.append(x_ln)
            maps = attention_probs(block.attn, x_ln, dtype=torch.float32)
            total = maps if total is None else total + maps
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        feats.append(x)
        last = tower.last_block
        s, outputs, fused = total, [], None
        for f in feats:
            s = sinkhorn_round(s)  # the official in-place normalisation: one more round per layer
            fused = fused_attention(s)
            v = _values(last.attn, last.ln_1(f))
            outputs.append(tower.head(tower.out_proj(fused.to(v.dtype) @ v)[:, 1:]).float())
        return torch.stack(outputs), fused.mean(1)[:, 1:, 1:], x, grid

    def forward(
        self, images: torch.Tensor, return_global: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The last layer's fused-attention features (B, E, h, w); with ``return_global`` also CLIP's
        image embedding (B, E). (CLIPer's logits use every layer, see :meth:`scores`.)"""
        layers, _, x, (h, w) = self.layer_features(images)
        dense = layers[-1].transpose(1, 2).reshape(layers.shape[1], -1, h, w)
        if return_global:
            return dense, self.tower.global_embedding(x)
        return dense

    # -- steps 4-6 ---------------------------------------------------------------------------------------------
    def _prompt_logits(self, layers: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """τ·cos of per-layer features (L, B, N, E) with unit prompts (P, E): (L, B, P, N)."""
        return self.softmax_scale * torch.einsum("lbne,pe->lbpn", F.normalize(layers, dim=-1), prompts)

    def _slide_logits(self, images: torch.Tensor, prompts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Step 5 before the softmax: the crops' logits averaged and propagated, (L, B, P, N)."""
        patch = self.tower.patch_size[0]
        gh, gw = grid
        boxes = window_boxes(gh, gw, self.slide_crop // patch, self.slide_stride // patch)  # in patches
        crops = torch.cat([images[..., y1 * patch : y2 * patch, x1 * patch : x2 * patch] for y1, y2, x1, x2 in boxes])
        layers, attn, _, (ch, cw) = self.layer_features(crops)  # every box has the same size
        logits = self._prompt_logits(layers, prompts)
        n, b = len(boxes), images.shape[0]
        logits = logits.view(logits.shape[0], n, b, -1, ch, cw)
        attn = attn.view(n, b, ch, cw, ch, cw)
        preds = logits.new_zeros((logits.shape[0], b, logits.shape[3], gh, gw))
        count = logits.new_zeros((gh, gw))
        stitched = attn.new_zeros((b, gh, gw, gh, gw))
        overlaps = attn.new_zeros((gh, gw, gh, gw))
        for i, (y1, y2, x1, x2) in enumerate(boxes):
            preds[..., y1:y2, x1:x2] += logits[:, i]
            count[y1:y2, x1:x2] += 1
            stitched[:, y1:y2, x1:x2, y1:y2, x1:x2] += attn[i]
            overlaps[y1:y2, x1:x2, y1:y2, x1:x2] += 1
        preds = (preds / count).flatten(-2)
        stitched = (stitched / (overlaps + STITCH_EPS)).view(b, gh * gw, gh * gw)
        stitched = stitched / stitched.sum(-1, keepdim=True).clamp_min(torch.finfo(stitched.dtype).tiny)
        return preds @ stitched

    def scores(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIPer's output (B, K, h, w) on the patch grid, for CLIP-normalised images (B, 3, H, W)
        and unit name embeddings (K, E) (steps 1-6 of the module docstring)."""
        k = text.shape[0]
        prompts = F.normalize(torch.cat([text, text.mean(0, keepdim=True)]).float(), dim=-1)
        layers, attn, _, grid = self.layer_features(images)
        probs = self._prompt_logits(layers, prompts).softmax(2)[:, :, :k]  # (L, B, K, N)
        if self.slide_crop > 0:
            slide = self._slide_logits(images, prompts, grid).softmax(2)[:, :, :k]
            probs = 0.5 * slide + 0.5 * probs
        selected = probs[self.select_layer]
        selected = selected.masked_fill(selected < self.attention_thr * selected.amax(-1, keepdim=True), 0.0)
        probs = probs.clone()
        probs[self.select_layer] = selected
        out = selected @ attn + probs.mean(0)
        return out.view(out.shape[0], k, *grid)

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        """log of :meth:`scores` (B, K, h, w), bilinearly upsampled to the windows, which are first
        resized to the nearest multiple of the patch size; see the module docstring for why log."""
        if surgery:
            raise MethodOptionError(
                "cliper does not take surgery=True (--surgery): it scores names with its own softmax, "
                "not with the cosines CLIP-Surgery adjusts."
            )
        h, w = windows.shape[-2:]
        left, right, top, bottom = centered_padding(h, w, pad_multiple)
        padded = F.pad(windows, (left, right, top, bottom)) if (left or right or top or bottom) else windows
        size = tuple(padded.shape[-2:])
        ph, pw = self.tower.patch_size
        snapped = (max(int(size[0] / ph + 0.5), 1) * ph, max(int(size[1] / pw + 0.5), 1) * pw)
        images = padded
        if snapped != size:
            images = F.interpolate(padded, size=snapped, mode="bilinear", align_corners=False)
        out = F.interpolate(self.scores(images, text), size=size, mode="bilinear", align_corners=False)
        out = out[:, :, top : top + h, left : left + w]
        return out.clamp_min(torch.finfo(out.dtype).tiny).log()
