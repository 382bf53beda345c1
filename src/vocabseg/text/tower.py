"""CLIP's text tower as a differentiable function of token *embeddings*.

``clip.encode_text`` starts from token ids, so it cannot take learnable prompt vectors (PixelCLIP's
class prompts, CoOp-style context tokens). :func:`encode_token_embeddings` runs the same modules of
an open_clip ``CLIP`` model (token embedding, positional embedding, transformer, ``ln_final``,
end-of-text pooling, projection) but lets the caller replace the input embeddings; gradients flow
to those embeddings and to any text-tower parameter that requires them.
"""

from __future__ import annotations

import torch
from open_clip.transformer import text_global_pool
from torch import nn

__all__ = ["token_embeddings", "encode_token_embeddings"]


def token_embeddings(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B, L, width) input embeddings, in the tower's compute dtype."""
    return clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())


def encode_token_embeddings(
    clip: nn.Module, tokens: torch.Tensor, embeddings: torch.Tensor | None = None
) -> torch.Tensor:
    """Text embeddings (B, D), unnormalised, with gradients.

    Args:
        clip: an open_clip ``CLIP`` model (text tower inside the model, not a ``CustomTextCLIP``).
        tokens: (B, L) token ids; they decide where the end-of-text token is pooled.
        embeddings: (B, L, width) input embeddings to use instead of ``clip.token_embedding(tokens)``
            (e.g. with learnable vectors written over placeholder positions); ``None`` = the ids'.
    """
    if not hasattr(clip, "token_embedding"):
        raise TypeError(f"{type(clip).__name__} has no built-in text tower (token_embedding); use an open_clip CLIP.")
    x = token_embeddings(clip, tokens) if embeddings is None else embeddings
    cast_dtype = clip.transformer.get_cast_dtype()
    x = x.to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x
