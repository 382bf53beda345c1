"""``scclip``: SC-CLIP (Bai et al., Self-Calibrated CLIP for Training-Free Open-Vocabulary
Segmentation, 2024 / TIP), CLIP only.

With F_i the output of (1-based) block i+1, i.e. the i-th 0-based intermediate (F_{L-2} is the last
block's input X), per image:

1. Anomaly-token resolution: a local outlier factor over X's patch tokens
   (squared L2 distances, k = ``lof_neighbors``) flags the top ``lof_contamination`` of tokens; each
   is replaced by the mean of its in-bounds, unflagged 3×3 spatial neighbours (a token with none
   stays). The same tokens are fixed in F_pre, the features of the pre-adjustment.
2. Self-adjustment, before the last block: S = cos(F_pre) (patch tokens); W(S) = S with entries
   < β set to 0, rows divided by their sum (+1e-6); X ← W(S)·X.
3. Last block, with self-adjusted attention: Attn = ½[softmax(3·(S − mean S)), masked to −∞ where
   S − mean S < 0 (shared by all heads)] + ½ softmax(s·KKᵀ) per head, over patch tokens only;
   Y = O(Attn·V) + ``res_cls``·CLS(X). No FFN; the only residual is the scaled CLS token.
4. Self-adjustment, after the last block: Y ← W(cos(F_post))·Y (F_post not anomaly-fixed).
5. Multi-level fusion: R = Σ_{i=start}^{end-1} F_i goes through the same attention (step 3, with
   its own K, V and CLS), then W(cos(F_post)); Y ← Y + R. Then LN_post and proj; CLS removed.

Indices are the official ViT-B/16 values (``pre_adjust_idx=8``: block 9 of 12, ``post_adjust_idx=3``,
fusion of blocks 4..10), kept absolute for deeper towers (as the official code) and clamped to the
last intermediate (block L-1) on towers with fewer blocks.

Deviations from the official code, none of which matters on the paper protocol's square crops
beyond rounding: LOF, means and thresholds are per image (the official code runs batch 1 only);
flagged tokens map to the grid row-major (the official mapping divides by the grid height, right
only on square grids); k is clamped to N−1 when N ≤ ``lof_neighbors`` (sklearn's rule; the
official code fails there); a token is excluded from its own neighbours explicitly; LOF scores
equal to the quantile up to rounding (relative 1e-5) are not flagged, the exact-arithmetic answer
(a float comparison breaks such ties by rounding noise); the diagonal of the masked similarity
always stays (S_ii = 1 ≥ mean S; only rounding could otherwise empty a row).
"""

from __future__ import annotations

import math

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
    cosine_similarity,
    mean_interpolation,
    similarity_attention,
    thresholded_similarity,
)

#: LOF scores within this relative distance of the quantile tie with it (are not flagged): exact ties,
#: such as two mutually farthest tokens when k = N-1, would otherwise be broken by rounding noise
LOF_TIE_RTOL = 1e-5


def lof_outliers(tokens: torch.Tensor, n_neighbors: int, contamination: float) -> torch.Tensor:
    """Anomaly tokens (B, N) bool of tokens (B, N, D), per image: the simplified local outlier factor.

    Squared L2 distances; k = min(``n_neighbors``, N-1) nearest others. The reachability distance of
    i from a neighbour j is max(d_ij, k-dist(i)) (the official simplification; textbook LOF uses
    k-dist(j)), which is k-dist(i) for every neighbour, so lrd(i) = 1 / k-dist(i) up to a constant
    factor that cancels, and LOF(i) = mean over the neighbours j of lrd(j) / lrd(i). Tokens whose LOF
    exceeds its (1 - ``contamination``) quantile (linear interpolation) by more than rounding are flagged.
    """
    b, n, _ = tokens.shape
    k = min(n_neighbors, n - 1)
    if k < 1 or contamination <= 0:
        return torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    x = tokens.float()
    x = x - x.mean(1, keepdim=True)  # distances do not change; the Gram form below loses less precision
    gram = x @ x.transpose(1, 2)
    gram = (gram + gram.transpose(1, 2)) / 2  # exactly symmetric, so mutual distances tie exactly
    sq = gram.diagonal(dim1=1, dim2=2)
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp(min=0)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    dist = dist.masked_fill(eye, float("inf"))  # a token is not its own neighbour
    knn_dist, knn_idx = dist.topk(k, dim=-1, largest=False)  # ascending: k-dist is the last column
    lrd = 1.0 / knn_dist[..., -1]
    lof = torch.gather(lrd[:, None, :].expand(b, n, n), 2, knn_idx).mean(-1) / lrd
    threshold = torch.quantile(lof, 1.0 - contamination, dim=-1, keepdim=True)
    return lof > threshold * (1.0 + LOF_TIE_RTOL)


@register_method(
    "scclip",
    defaults=InferenceConfig(),  # the SCLIP-lineage defaults
    summary="Self-calibrated CLIP: LOF anomaly-token fix, similarity-adjusted attention and "
    "aggregation from middle layers, multi-level fusion; residual and FFN removed.",
    reference="Bai et al., Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation (SC-CLIP), "
    "arXiv 2411.15869, 2024",
    paper=PaperSettings(
        "SuleBai/SC-CLIP configs/cfg_*.py",
        {
            "voc21": {"logit_scale": 50.0, "prob_threshold": 0.15, "area_threshold": 0.1},
            "context60": {"prob_threshold": 0.15},
            "coco_object": {"logit_scale": 55.0, "prob_threshold": 0.35},
            "cityscapes": {"short_side": 560},
        },
    ),  # fmt: skip
)
class SCCLIP(DenseCLIPMethod):
    """Args (0-based indices into the outputs of blocks 1..L-1; on a tower with fewer blocks than an
    index needs, it is clamped to the last of them, block L-1):
    pre_adjust_idx: features whose similarity drives the pre-adjustment and the last block's attention.
    post_adjust_idx: features whose similarity drives the post-adjustment.
    multi_start_idx, multi_end_idx: the intermediate outputs [start, end) summed for the fusion.
    res_cls: the weight of the CLS token added to every last-block output.
    beta: similarity threshold of the adjustments.
    lof_neighbors, lof_contamination: the anomaly detector's k and flagged fraction.
    """

    def __init__(
        self,
        clip: nn.Module,
        pre_adjust_idx: int = 8,
        post_adjust_idx: int = 3,
        multi_start_idx: int = 3,
        multi_end_idx: int = 10,
        res_cls: float = 0.3,
        beta: float = 0.4,
        lof_neighbors: int = 30,
        lof_contamination: float = 0.05,
    ):
        super().__init__(clip)
        indices = dict(
            pre_adjust_idx=pre_adjust_idx,
            post_adjust_idx=post_adjust_idx,
            multi_start_idx=multi_start_idx,
            multi_end_idx=multi_end_idx,
        )
        for name, value in indices.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MethodOptionError(f"scclip: {name} must be an integer >= 0, got {value!r}.")
        if multi_start_idx >= multi_end_idx:
            raise MethodOptionError(
                f"scclip: multi_start_idx ({multi_start_idx}) must be below multi_end_idx ({multi_end_idx})."
            )
        if not isinstance(lof_neighbors, int) or isinstance(lof_neighbors, bool) or lof_neighbors < 1:
            raise MethodOptionError(f"scclip: lof_neighbors must be an integer >= 1, got {lof_neighbors!r}.")
        if not _finite(lof_contamination) or not 0 <= lof_contamination < 1:
            raise MethodOptionError(
                f"scclip: lof_contamination must be a number in [0, 1) (0: off), got {lof_contamination!r}."
            )
        if not _finite(beta) or not -1 <= beta <= 1:
            raise MethodOptionError(f"scclip: beta must be a number in [-1, 1] (a cosine), got {beta!r}.")
        if not _finite(res_cls):
            raise MethodOptionError(f"scclip: res_cls must be a finite number, got {res_cls!r}.")
        last = self.tower.depth - 2  # the last intermediate: block L-1, the last block's input
        self.pre_adjust_idx = min(pre_adjust_idx, last)
        self.post_adjust_idx = min(post_adjust_idx, last)
        self.multi_end_idx = min(multi_end_idx, last + 1)
        self.multi_start_idx = min(multi_start_idx, self.multi_end_idx - 1)
        self.res_cls = float(res_cls)
        self.beta = float(beta)
        self.lof_neighbors = lof_neighbors
        self.lof_contamination = float(lof_contamination)

    def adjustment_weights(self, sim: torch.Tensor) -> torch.Tensor:
        """W(S) of the self-adjustments: similarities below ``beta`` set to 0, rows normalised to sum 1."""
        return aggregation_weights(thresholded_similarity(sim, self.beta))

    def adjusted_last_block(self, tokens: torch.Tensor, attn_sim: torch.Tensor) -> torch.Tensor:
        """The rewired last block on (B, 1+N, D) tokens: patch tokens out (B, N, D)."""
        tower = self.tower
        _, k, v = tower.qkv(tower.last_block.ln_1(tokens[:, 1:]))
        mixed = attn_sim[:, None].to(v.dtype) @ v + F.scaled_dot_product_attention(k, k, v)
        return tower.out_proj(mixed / 2) + self.res_cls * tokens[:, :1]

    def forward(
        self, images: torch.Tensor, return_global: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Dense features (B, E, h, w); with ``return_global`` also CLIP's image embedding (B, E)."""
        multi = range(self.multi_start_idx, self.multi_end_idx)
        x, (h, w), feats = self.tower.forward_intermediates(images, [self.pre_adjust_idx, self.post_adjust_idx, *multi])
        pre, post, fused = feats[0], feats[1], feats[2:]

        flagged = lof_outliers(x[:, 1:], self.lof_neighbors, self.lof_contamination)
        patches = mean_interpolation(x[:, 1:], (h, w), flagged, isolated="keep")
        sim = cosine_similarity(mean_interpolation(pre[:, 1:], (h, w), flagged, isolated="keep").float())
        attn_sim = similarity_attention(sim, keep_diagonal="always")
        post_weights = self.adjustment_weights(cosine_similarity(post[:, 1:].float()))

        patches = aggregate(self.adjustment_weights(sim), patches)
        y = self.adjusted_last_block(torch.cat([x[:, :1], patches], dim=1), attn_sim)
        y = aggregate(post_weights, y)
        r = self.adjusted_last_block(torch.stack(fused).sum(0), attn_sim)
        y = y + aggregate(post_weights, r)

        out = self.tower.head(y)
        dense = out.transpose(1, 2).reshape(out.shape[0], out.shape[-1], h, w)
        if return_global:
            return dense, self.tower.global_embedding(x)
        return dense


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
