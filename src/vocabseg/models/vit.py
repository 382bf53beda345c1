"""Read-only access to the pieces of an open_clip ``VisionTransformer`` that dense methods rewire.

Training-free methods change only CLIP's *last* block (research notes, section 1). This module runs
the tower up to that block and exposes the last block's parts (LN1, q/k/v, out-projection, MLP,
LN_post, proj) as plain functions of the block's *parameters*, never by calling ``block.attn(...)``:
open_clip 4.x replaces ``nn.MultiheadAttention`` with its own module but keeps the parameter names
``in_proj_weight``, ``in_proj_bias``, ``out_proj`` and ``num_heads``, so this keeps working there.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIPVisionTower", "POSITION_RESIZES", "PositionResize"]

PositionResize = Literal["bicubic", "bilinear", "bicubic_size"]
POSITION_RESIZES: tuple[str, ...] = typing.get_args(PositionResize)


class CLIPVisionTower(nn.Module):
    """Wraps (does not copy or patch) the ``visual`` tower of an open_clip CLIP model."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        missing = [
            a
            for a in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
            if not hasattr(visual, a)
        ]
        if missing:
            raise TypeError(
                f"Dense CLIP methods need an open_clip ViT image tower; {type(visual).__name__} "
                f"lacks {', '.join(missing)} (ResNet and timm-tower CLIPs are not supported)."
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("CLIP towers with attentional pooling (CoCa) are not supported.")
        last = visual.transformer.resblocks[-1]
        attn = getattr(last, "attn", None)
        if attn is None or not hasattr(attn, "in_proj_weight") or not hasattr(attn, "out_proj"):
            raise TypeError(
                "The last CLIP block has no fused in_proj_weight/out_proj attention "
                "(custom blocks with qk-norm or scaled cosine attention are not supported)."
            )
        self.visual = visual
        #: a callable (h, w) -> (h*w, width) replacing CLIP's patch position embeddings (Beyond-Labels'
        #: "replace" mode); not a sub-module here, so its owner stores its weights
        self.patch_position_fn: Callable[[tuple[int, int]], torch.Tensor] | None = None

    # -- geometry --------------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        k = self.visual.conv1.kernel_size
        return (k, k) if isinstance(k, int) else tuple(k)

    @property
    def native_grid(self) -> tuple[int, int]:
        n = self.visual.positional_embedding.shape[0] - 1
        grid = getattr(self.visual, "grid_size", None)
        if grid is not None and grid[0] * grid[1] == n:
            return tuple(grid)
        side = math.isqrt(n)
        return side, side

    @property
    def last_block(self) -> nn.Module:
        return self.visual.transformer.resblocks[-1]

    # -- forward pieces ----------------------------------------------------------------------------
    def positional_embedding(self, grid: tuple[int, int], resize: PositionResize = "bicubic") -> torch.Tensor:
        """Position embeddings for a ``grid`` of patches; the native grid's are used unchanged.

        ``resize="bicubic"``: as the SCLIP lineage does, with ``scale_factor = (g + 0.1) / g_native``
        (the DINO recipe, research note (d)2), which differs numerically from a ``size=``-based resize.
        ``resize="bilinear"``: a bilinear resize to ``size=grid``, as CLIPer's official code does.
        ``resize="bicubic_size"``: a bicubic resize to ``size=grid``, as CAT-Seg's and PixelCLIP's dense
        CLIP (``resized_pos_embed``) does.
        """
        if resize not in POSITION_RESIZES:
            raise ValueError(f"resize must be one of {POSITION_RESIZES}, got {resize!r}.")
        pos = self.visual.positional_embedding
        if self.patch_position_fn is not None:  # CLIP's CLS position, the replacement's patch positions
            return torch.cat([pos[:1], self.patch_position_fn(tuple(grid)).to(pos.dtype)], dim=0)
        native = self.native_grid
        if tuple(grid) == tuple(native):
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        dim = pos.shape[-1]
        patch_pos = patch_pos.reshape(1, native[0], native[1], dim).permute(0, 3, 1, 2).float()
        if resize in ("bilinear", "bicubic_size"):
            mode = "bilinear" if resize == "bilinear" else "bicubic"
            patch_pos = F.interpolate(patch_pos, size=grid, mode=mode, align_corners=False)
        else:
            scale = ((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1])
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
            if tuple(patch_pos.shape[-2:]) != tuple(grid):  # rounding of the scale factor; never seen
                patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(-1, dim)
        return torch.cat([cls_pos, patch_pos], dim=0)

    @property
    def depth(self) -> int:
        return len(self.visual.transformer.resblocks)

    def embed(self, images: torch.Tensor, resize: PositionResize = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
        """The first block's input (B, 1+N, D) and the patch grid: patch embedding, CLS token, position
        embeddings (resized as :meth:`positional_embedding` says), patch dropout and ``ln_pre``.

        Public for methods that run the blocks themselves (CLIPer reads every block's input).
        """
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, D, gh, gw)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid, resize).to(x.dtype)
        return v.ln_pre(v.patch_dropout(x)), grid

    def tokens_before_last_block(
        self, images: torch.Tensor, resize: PositionResize = "bicubic"
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch-embed ``images`` and run every block but the last. Returns ((B, 1+N, D), grid)."""
        x, grid, _ = self.forward_intermediates(images, (), resize)
        return x, grid

    def forward_intermediates(
        self, images: torch.Tensor, indices: Sequence[int] = (), resize: PositionResize = "bicubic"
    ) -> tuple[torch.Tensor, tuple[int, int], list[torch.Tensor]]:
        """Run every block but the last, keeping the outputs of blocks ``indices`` on the way.

        timm's ``forward_intermediates`` idea: trained heads use middle layers as guidance (CAT-Seg:
        blocks 3/7 of ViT-B, 7/15 of ViT-L) and some training-free methods fuse them. Indices are
        0-based block numbers, negative ones count from the end; the last block is never run here
        (methods rewire it), so ``indices`` must name one of the first ``depth - 1`` blocks.

        Returns: the last block's input (B, 1+N, D), the patch grid, and one (B, 1+N, D) tensor per
        index (CLS token first, before any ``ln_post``), in the order asked.
        """
        wanted = [i % self.depth if -self.depth <= i < self.depth else i for i in indices]
        bad = [i for i, w in zip(indices, wanted) if not 0 <= w < self.depth - 1]
        if bad:
            raise ValueError(
                f"Intermediate block indices {bad} are out of range: this tower has {self.depth} blocks, "
                f"and blocks 0..{self.depth - 2} (or -{self.depth}..-2) can be returned."
            )
        v = self.visual
        x, grid = self.embed(images, resize)
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(v.transformer.resblocks[:-1]):
            x = block(x)
            if i in wanted:
                kept[i] = x if batch_first else x.transpose(0, 1)
        if not batch_first:
            x = x.transpose(0, 1)
        return x, grid, [kept[w] for w in wanted]

    def qkv(self, x_ln: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the last block for LN1-normalised tokens, each (B, heads, T, head_dim)."""
        attn = self.last_block.attn
        q, k, v = F.linear(x_ln, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        b, t, d = q.shape
        h = attn.num_heads
        return tuple(z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))

    def out_proj(self, heads: torch.Tensor) -> torch.Tensor:
        """Merge heads (B, heads, T, head_dim) -> (B, T, D) and apply the attention out-projection."""
        b, h, t, d = heads.shape
        merged = heads.transpose(1, 2).reshape(b, t, h * d)
        proj = self.last_block.attn.out_proj
        return F.linear(merged, proj.weight, proj.bias)

    def value_path_cls_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The last block as CAT-Seg's and PixelCLIP's dense CLIP runs it: no q-k attention,
        ``Y = O(V) + X_cls`` (the CLS token's input added to *every* token, not each token's own),
        then the MLP with its residual. (B, 1+N, D) -> (B, 1+N, D), before ``ln_post``.

        Differs from MaskCLIP's ``Y = X + O(V)`` only in the residual.
        """
        _, _, v = self.qkv(self.last_block.ln_1(x))
        return self.mlp_residual(self.attention_residual(x[:, :1], self.out_proj(v)))

    def attention_residual(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """``X + ls_1(attn_out)``: the residual around the last block's attention."""
        return x + self.last_block.ls_1(attn_out)

    def mlp_residual(self, y: torch.Tensor) -> torch.Tensor:
        """``Y + ls_2(MLP(LN2(Y)))``: the last block's feed-forward with its residual."""
        block = self.last_block
        return y + block.ls_2(block.mlp(block.ln_2(y)))

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """``LN_post`` then the visual projection, per token: (B, T, D) -> (B, T, embed_dim)."""
        x = self.visual.ln_post(tokens)
        proj = self.visual.proj
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Module) else x @ proj

    def vanilla_last_block(self, x: torch.Tensor) -> torch.Tensor:
        """The unmodified last block (standard softmax attention via SDPA, residuals, MLP)."""
        q, k, v = self.qkv(self.last_block.ln_1(x))
        y = self.attention_residual(x, self.out_proj(F.scaled_dot_product_attention(q, k, v)))
        return self.mlp_residual(y)

    def global_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding (what ``encode_image`` returns) from the last block's input."""
        y = self.vanilla_last_block(x)
        v = self.visual
        if getattr(v, "final_ln_after_pool", False):
            pooled = y[:, 0] if v.pool_type == "tok" else y[:, 1:].mean(1)
            pooled = v.ln_post(pooled)
        else:
            y = v.ln_post(y)
            pooled = y[:, 0] if getattr(v, "pool_type", "tok") == "tok" else y[:, 1:].mean(1)
        proj = v.proj
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
