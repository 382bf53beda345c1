"""``sfp``: SFP (Jin et al., Feature Purification Matters, ICCV 2025), outlier purification + fused attention.

Follows the released code (Kimsure/SFP, ``SFP_ICCV/clip/model.py``, ``VisionTransformer.forward``).
Notation: F_i is the output of block i (0-based, CLS first) of a tower of D blocks; X = F_{D-2} is the
last block's input; s = head_dim^-1/2; O is the attention out-projection; r = ``res_cls`` = 0.3.

1. Self-adaptive outlier mitigator (SOM). In the head-averaged attention A of block D-2 (the one that
   produces X), patch p is a candidate when 1.5·A[cls, p] > A[p, p]; the ``num_outliers`` = 10
   candidates with the largest 1.5·A[cls, p] are the outliers (``outlier="l2norm"``: the 10 patches of X
   with the largest L2 norm). An outlier token of X and of F_pre is replaced by the mean of its 3×3
   neighbours that are not outliers (zero if none is): X̃, F̃_pre.
2. Similarities, from patch tokens only: S_pre = cos(F̃_pre), S_post = cos(F_post), both set to 0 below
   0.4; Ŝ = S / (rowsum(S) + 1e-6) (the aggregation "Ŝ·T" averages each token with its similar tokens).
3. Semantic-aware attention enhancer (SAE), on P = Ŝ_pre·X̃ (patch tokens, no CLS):
       M = 3·(S_pre − mean(S_pre)), −∞ where negative      (the mean per image, over all N² entries)
       A = ⅓[softmax(s·QQᵀ) + softmax(s·KKᵀ) + softmax(M)],  Q, K, V of LN1(P)
       T1 = O(A·V) + r·X_cls
4. Hierarchical attention integrator (HAI), on the sum Σ = Σ_{i ∈ fuse_layers} F_i:
       T2 = O(softmax(M)·V(LN1(Σ_patches))) + r·Σ_cls
5. F = LN_post(Ŝ_post·T1 + Ŝ_post·T2)·P: no residual, no FFN in the last block.

Layers: ``pre_layer`` 8, ``post_layer`` 3, ``fuse_layers`` 3..9, the released code's fixed choice (used
for ViT-L/14 too). Left at ``None`` they are those blocks, each clamped to block D-2 where the tower is
too shallow for it (so small test towers run); given explicitly, they must exist.

Deviations from the released code, all where it would fail or where it is ambiguous:
* an outlier's grid position is (index // columns, index % columns); the released code divides by the
  number of rows, the same on the square windows of its protocol but wrong on other grids;
* a token left all-zero by the replacement (every neighbour an outlier) has zero similarity instead of
  NaN, and a row of M whose every entry is masked keeps its diagonal (the released code gives NaN
  for the whole window in both cases);
* the 1.5 weight of A[cls, p] is a constant here; the released code computes it as 5·res_cls, so it
  differs only when ``res_cls`` is changed;
* ``outlier="none"`` skips step 1 (the released code's ``purify=False`` raises a NameError); its LOF
  detector is not implemented;
* batched, with every mean and similarity per image (the released code runs one window at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodOptionError
from ..inference.config import InferenceConfig
from .base import DenseCLIPMethod
from .registry import PaperSettings, register_method
from .self_calibration import (
    aggregate,
    aggregation_weights,
    attention_probs,
    cosine_similarity,
    mean_interpolation,
    similarity_attention,
    thresholded_similarity,
)

#: the outlier detectors: "som" (CLS attention above self-attention), "l2norm" (largest token norms),
#: "none" (no purification)
OUTLIER_DETECTORS = ("som", "l2norm", "none")

# the released code's fixed blocks (0-based): pre similarity, post similarity, fused outputs
PRE_LAYER, POST_LAYER, FUSE_LAYERS = 8, 3, tuple(range(3, 10))
SOM_CLS_WEIGHT = 1.5  # A[cls, p] is weighted by this before the comparison with A[p, p]
SIM_THRESHOLD = 0.4  # cosine similarities below this are set to 0


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: the ``k`` largest finite scores of each row (all finite ones if fewer)."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(1, top.indices, torch.isfinite(top.values))


def _som_outliers(attn: torch.Tensor, k: int) -> torch.Tensor:
    """SOM outliers (B, N) from head-averaged attention (B, 1+N, 1+N)."""
    cls_to_patch = SOM_CLS_WEIGHT * attn[:, 0, 1:]
    self_attn = attn[:, 1:, 1:].diagonal(dim1=-2, dim2=-1)
    return _top_mask(cls_to_patch.masked_fill(cls_to_patch <= self_attn, float("-inf")), k)


@register_method(
    "sfp",
    defaults=InferenceConfig(),  # the SCLIP-lineage defaults
    summary="Outlier tokens replaced by their neighbours' mean; Q-Q + K-K + similarity attention, "
    "fused with middle layers; residual and FFN removed.",
    reference="Jin et al., Feature Purification Matters (SFP), ICCV 2025",
    paper=PaperSettings(
        "Kimsure/SFP SFP_ICCV/configs/cfg_*.py (ViT-B/16)",
        {
            "voc21": {"logit_scale": 50.0, "prob_threshold": 0.15, "area_threshold": 0.1},
            "context60": {"prob_threshold": 0.15},
            "coco_object": {"logit_scale": 55.0, "prob_threshold": 0.35},
            "cityscapes": {"short_side": 560},
            "ade150": {"short_side": 384},
        },
    ),  # fmt: skip
)
class SFP(DenseCLIPMethod):
    """Args:
    outlier: the outlier detector, one of :data:`OUTLIER_DETECTORS`.
    num_outliers: how many tokens (at most) the detector marks per window.
    res_cls: weight r of the CLS token added to both attention branches.
    pre_layer, post_layer: the blocks whose patch tokens give S_pre and S_post.
    fuse_layers: the blocks whose outputs are summed for the second attention branch.
    """

    def __init__(
        self,
        clip: nn.Module,
        outlier: str = "som",
        num_outliers: int = 10,
        res_cls: float = 0.3,
        pre_layer: int | None = None,
        post_layer: int | None = None,
        fuse_layers: tuple[int, ...] | None = None,
    ):
        super().__init__(clip)
        if outlier not in OUTLIER_DETECTORS:
            raise MethodOptionError(f"sfp: outlier={outlier!r} must be one of {', '.join(OUTLIER_DETECTORS)}.")
        if isinstance(num_outliers, bool) or not isinstance(num_outliers, int) or num_outliers < 0:
            raise MethodOptionError(f"sfp: num_outliers={num_outliers!r} must be an integer >= 0.")
        depth = self.tower.depth
        if depth < 3 and outlier == "som":
            raise MethodOptionError(
                f"sfp: outlier='som' reads the attention of block D-2, so the tower needs 3 or more blocks "
                f"(it has {depth}); use outlier='l2norm' or 'none'."
            )
        last = depth - 2  # the last block the tower returns (the rewired last block's input)
        self.outlier = outlier
        self.num_outliers = num_outliers
        self.res_cls = float(res_cls)
        self.pre_layer = min(PRE_LAYER, last) if pre_layer is None else self._layer("pre_layer", pre_layer, last)
        self.post_layer = min(POST_LAYER, last) if post_layer is None else self._layer("post_layer", post_layer, last)
        if fuse_layers is None:
            self.fuse_layers = tuple(sorted({min(i, last) for i in FUSE_LAYERS}))
        elif isinstance(fuse_layers, (str, bytes)) or not hasattr(fuse_layers, "__len__") or not fuse_layers:
            raise MethodOptionError(f"sfp: fuse_layers={fuse_layers!r} must be a non-empty sequence of block indices.")
        else:
            self.fuse_layers = tuple(self._layer("fuse_layers", i, last) for i in fuse_layers)

    def _layer(self, option: str, value: int, last: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= last:
            raise MethodOptionError(
                f"sfp: {option} names block {value!r}, which this tower does not return: it has "
                f"{self.tower.depth} blocks, so blocks 0..{last} (0-based, before the rewired last block) can be used."
            )
        return value

    def dense_tokens(self, x: torch.Tensor, grid: tuple[int, int], images: torch.Tensor):
        raise NotImplementedError("sfp reads several blocks' outputs: call the method itself (forward).")

    def outlier_mask(self, x: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N) bool outliers of the last block's input ``x`` (``before``: the input of block D-2)."""
        if self.outlier == "som":
            block = self.tower.visual.transformer.resblocks[-2]
            attn = attention_probs(block.attn, block.ln_1(before)).mean(dim=1)
            return _som_outliers(attn, self.num_outliers)
        if self.outlier == "l2norm":
            return _top_mask(x[:, 1:].norm(dim=-1), self.num_outliers)
        return None

    def forward(
        self, images: torch.Tensor, return_global: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tower = self.tower
        before = tower.depth - 3  # block D-2's input is block D-3's output
        indices = sorted(
            {self.pre_layer, self.post_layer, *self.fuse_layers} | ({before} if self.outlier == "som" else set())
        )
        x, grid, kept = tower.forward_intermediates(images, indices)
        out = dict(zip(indices, kept))
        outliers = self.outlier_mask(x, out.get(before))
        patches, reference = x[:, 1:], out[self.pre_layer][:, 1:]
        if outliers is not None:
            patches = mean_interpolation(patches, grid, outliers, isolated="zero")
            reference = mean_interpolation(reference, grid, outliers, isolated="zero")
        pre_sim = thresholded_similarity(cosine_similarity(reference), SIM_THRESHOLD)
        post_sim = thresholded_similarity(cosine_similarity(out[self.post_layer][:, 1:]), SIM_THRESHOLD)
        # (B, 1, N, N), shared by the heads
        semantic = similarity_attention(pre_sim, keep_diagonal="empty_rows").unsqueeze(1)

        ln_1 = tower.last_block.ln_1
        q, k, v = tower.qkv(ln_1(aggregate(aggregation_weights(pre_sim), patches)))
        attended = (
            F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v) + semantic @ v
        ) / 3
        enhanced = tower.out_proj(attended) + self.res_cls * x[:, :1]
        fused = sum(out[i] for i in self.fuse_layers)
        _, _, v_fused = tower.qkv(ln_1(fused[:, 1:]))
        integrated = tower.out_proj(semantic @ v_fused) + self.res_cls * fused[:, :1]

        feats = tower.head(aggregate(aggregation_weights(post_sim), enhanced + integrated))  # Ŝ_post is linear
        dense = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[-1], *grid)
        if return_global:
            return dense, tower.global_embedding(x)
        return dense
