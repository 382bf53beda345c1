"""CLIP-Surgery feature adjustment (Li et al., "A Closer Look at the Explainability of Contrastive
Language-Image Pre-training"; also evaluated on top of ProxyCLIP).

For unit image features f (per pixel), unit text embeddings t_c and CLIP's unit global embedding g:
    w_c = softmax_c(2·g·t_c) / mean_c(...)          (class weights: restrain the obvious classes)
    s_c = Σ_d (f_d t_cd w_c − mean_c' f_d t_c'd w_c')  (element-wise products minus their class mean)
which reduces to s_c = w_c·cos_c − mean_c'(w_c'·cos_c'); ``s`` replaces the cosine logits.
"""

from __future__ import annotations

import torch


def surgery_logits(cos: torch.Tensor, global_embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """cos (B, K, h, w), unit global embedding (B, E), unit text (K, E) -> adjusted logits (B, K, h, w)."""
    weights = (2.0 * global_embedding @ text.T).softmax(dim=-1)
    weights = weights / weights.mean(dim=-1, keepdim=True)
    weighted = cos * weights[:, :, None, None]
    return weighted - weighted.mean(dim=1, keepdim=True)
