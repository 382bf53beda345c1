"""CLIP's text tower as a differentiable function of token *embeddings*, and at the prompts' real length.

``clip.encode_text`` starts from token ids, so it cannot take learnable prompt vectors (PixelCLIP's
class prompts, CoOp-style context tokens). :func:`encode_token_embeddings` runs the same modules of
an open_clip ``CLIP`` model (token embedding, positional embedding, transformer, ``ln_final``,
end-of-text pooling, projection) but lets the caller replace the input embeddings; gradients flow
to those embeddings and to any text-tower parameter that requires them.

``encode_text`` also runs every prompt at the full context (77 tokens for CLIP) although prompt
ensembles are ~10 tokens long. The tower is causal and pools at the end-of-text token, so that
token's output depends only on the tokens up to it: :func:`encode_text_fast` runs the tower on the
first ``L`` = (last pooled position in the batch + 1) tokens, with the positional table and the
attention mask sliced to ``L``, and gets the same embeddings several times faster. It does so only
where that is exact (see :func:`truncated_length`) and calls ``clip.encode_text`` otherwise.
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

__all__ = ["token_embeddings", "encode_token_embeddings", "pooled_positions", "truncated_length", "encode_text_fast"]


def token_embeddings(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B, L, width) input embeddings, in the tower's compute dtype."""
    return clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())


def _check_builtin_tower(clip: nn.Module) -> None:
    if not hasattr(clip, "token_embedding"):
        raise TypeError(f"{type(clip).__name__} has no built-in text tower (token_embedding); use an open_clip CLIP.")


def _run_tower(clip: nn.Module, tokens: torch.Tensor, x: torch.Tensor, truncated: bool = False) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` after the token embedding; ``truncated``: at the length of ``x``,
    with the positional table and attention mask sliced to it (only exact where the caller checked)."""
    cast_dtype = clip.transformer.get_cast_dtype()
    pos, mask = clip.positional_embedding, clip.attn_mask
    if truncated:
        length = x.shape[1]
        pos, mask = pos[:length], None if mask is None else mask[:length, :length]
    x = x.to(cast_dtype) + pos.to(cast_dtype)
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def encode_token_embeddings(
    clip: nn.Module, tokens: torch.Tensor, embeddings: torch.Tensor | None = None
) -> torch.Tensor:
    """Text embeddings (B, D), unnormalised, with gradients, at the full token length.

    Args:
        clip: an open_clip ``CLIP`` model (text tower inside the model, not a ``CustomTextCLIP``).
        tokens: (B, L) token ids; they decide where the end-of-text token is pooled.
        embeddings: (B, L, width) input embeddings to use instead of ``clip.token_embedding(tokens)``
            (e.g. with learnable vectors written over placeholder positions); ``None`` = the ids'.
    """
    _check_builtin_tower(clip)
    x = token_embeddings(clip, tokens) if embeddings is None else embeddings
    return _run_tower(clip, tokens, x)


def _is_causal(mask: torch.Tensor | None) -> bool:
    """Whether an additive mask hides every later token (open_clip's ``build_causal_mask``), so the
    first ``L`` outputs never see positions ``>= L``."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or not mask.is_floating_point():
        return False
    later = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu_(1)
    return bool(torch.isneginf(mask[later]).all())


def pooled_positions(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """(B,) index of the token each prompt is pooled at, as ``text_global_pool`` picks it; ``None``
    when the pooling does not read one token chosen by the ids (``first``, ``last``, ``none``)."""
    pool = getattr(clip, "text_pool_type", None)
    if pool == "argmax":
        return tokens.argmax(dim=-1)  # the first maximum, as torch.argmax returns it
    if pool == "eos" and getattr(clip, "text_eos_id", None) is not None:
        return (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return None


def truncated_length(clip: nn.Module, tokens: torch.Tensor) -> int | None:
    """How many leading tokens give exactly ``clip.encode_text(tokens)``, or ``None`` where truncation
    is not exact and the full ``encode_text`` must run.

    Exact needs all of: the model's ``encode_text`` is open_clip's ``CLIP.encode_text`` (the code
    replayed here; not ``CustomTextCLIP`` / CoCa / HF towers, nor a subclass or instance that
    overrides it), a causal attention mask, and pooling at one token chosen by the ids.
    """
    if not isinstance(clip, CLIP) or getattr(type(clip), "encode_text", None) is not CLIP.encode_text:
        return None
    if "encode_text" in vars(clip) or not _is_causal(getattr(clip, "attn_mask", None)):
        return None
    positions = pooled_positions(clip, tokens)
    if positions is None or positions.numel() == 0:
        return None
    return min(int(positions.max()) + 1, tokens.shape[1])


def encode_text_fast(clip: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``clip.encode_text(tokens, normalize)`` (B, D), run on the first :func:`truncated_length` tokens
    where that is exact, else ``clip.encode_text`` itself. Gradients flow as through ``encode_text``."""
    length = truncated_length(clip, tokens)
    if length is None:
        return clip.encode_text(tokens, normalize=normalize)
    tokens = tokens[:, :length]
    x = _run_tower(clip, tokens, token_embeddings(clip, tokens), truncated=True)
    return nn.functional.normalize(x, dim=-1) if normalize else x
