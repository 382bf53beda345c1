"""Pure tensor pieces shared by the self-calibrated CLIP methods: SC-CLIP (Bai et al., Self-Calibrated
CLIP for Training-Free Open-Vocabulary Segmentation, 2024), ``scclip``, and SFP (Jin et al., Feature
Purification Matters, ICCV 2025), ``sfp``; :func:`attention_probs` also serves ``cliper``.

Both papers fix anomaly tokens by their neighbours' mean, average tokens with their similar tokens
(cosine similarities thresholded, rows normalised) and add a similarity attention
softmax(3·(S − mean S)) masked below the mean to the last block. Where the two methods' edge
behaviour differs, the caller picks it with an explicit argument (``isolated``, ``keep_diagonal``);
each function computes in its inputs' dtype unless told otherwise, so each method keeps its precision.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

#: the temperature on the centred similarity in the similarity attention (both papers)
SIMILARITY_TEMPERATURE = 3.0
#: added to the row sums of the thresholded similarities (both official normalisers)
ROW_EPS = 1e-6


def mean_interpolation(
    tokens: torch.Tensor, grid: tuple[int, int], flagged: torch.Tensor, *, isolated: Literal["keep", "zero"]
) -> torch.Tensor:
    """Replace each flagged token (B, N) of tokens (B, N, D) on a row-major grid (h, w) by the mean of
    its in-bounds, unflagged 3×3 neighbours (centre excluded).

    ``isolated``: what becomes of a flagged token with no such neighbour: ``"keep"`` its value
    (SC-CLIP) or ``"zero"`` (SFP).
    """
    if isolated not in ("keep", "zero"):
        raise ValueError(f"isolated must be 'keep' or 'zero', got {isolated!r}.")
    b, n, d = tokens.shape
    keep = (~flagged).to(tokens.dtype).view(b, 1, *grid)
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[..., 1, 1] = 0
    kept = (tokens.transpose(1, 2).reshape(b, d, *grid) * keep).reshape(b * d, 1, *grid)
    sums = F.conv2d(kept, ring, padding=1).view(b, d, n).transpose(1, 2)
    counts = F.conv2d(keep, ring, padding=1).view(b, n, 1)  # valid neighbours
    replace = flagged[..., None] if isolated == "zero" else flagged[..., None] & (counts > 0)
    return torch.where(replace, sums / counts.clamp(min=1), tokens)


def cosine_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) cosine similarities, in the tokens' dtype (an all-zero token: 0)."""
    unit = F.normalize(tokens, dim=-1)
    return unit @ unit.transpose(1, 2)


def thresholded_similarity(sim: torch.Tensor, beta: float) -> torch.Tensor:
    """Similarities (B, N, N) with the entries below ``beta`` set to 0 (SC-CLIP's β, SFP's 0.4)."""
    return sim.masked_fill(sim < beta, 0.0)


def aggregation_weights(sim: torch.Tensor) -> torch.Tensor:
    """Ŝ = S / (rowsum(S) + 1e-6) of a thresholded similarity S: the weights of :func:`aggregate`."""
    return sim / (sim.sum(-1, keepdim=True) + ROW_EPS)


def aggregate(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Ŝ·T: each token (B, N, D) replaced by the weighted mean of the tokens, computed in the weights'
    dtype and returned in the tokens'."""
    return (weights @ tokens.to(weights.dtype)).to(tokens.dtype)


def similarity_attention(sim: torch.Tensor, *, keep_diagonal: Literal["always", "empty_rows"]) -> torch.Tensor:
    """softmax(M), M = 3·(S − mean S) with the entries below 0 masked to −∞, per image: (B, N, N).

    The official codes mask every negative entry, which gives NaN for a row with none left; here the
    diagonal stays unmasked, ``"always"`` (SC-CLIP: S_ii = 1 ≥ mean S, so only rounding could mask
    it) or only in the rows that would otherwise be empty, ``"empty_rows"`` (SFP: an all-zero token
    has S_ii = 0).
    """
    if keep_diagonal not in ("always", "empty_rows"):
        raise ValueError(f"keep_diagonal must be 'always' or 'empty_rows', got {keep_diagonal!r}.")
    logits = SIMILARITY_TEMPERATURE * (sim - sim.mean(dim=(1, 2), keepdim=True))
    masked = logits < 0
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    if keep_diagonal == "empty_rows":
        eye = masked.all(dim=-1, keepdim=True) & eye
    return logits.masked_fill(masked & ~eye, float("-inf")).softmax(dim=-1)


def attention_probs(attn: nn.Module, x_ln: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A block's standard attention softmax(s·QKᵀ) (B, heads, T, T) on its LN1-normalised input, from
    the parameters of its fused in-projection (the names open_clip keeps across versions); q and k are
    cast to ``dtype`` (None: kept in the block's) before the product."""
    d = x_ln.shape[-1]
    heads = attn.num_heads
    bias = attn.in_proj_bias
    qk = F.linear(x_ln, attn.in_proj_weight[: 2 * d], None if bias is None else bias[: 2 * d])
    if dtype is not None:
        qk = qk.to(dtype)
    b, t, _ = qk.shape
    q, k = qk.view(b, t, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)
