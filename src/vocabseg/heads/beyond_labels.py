"""The Beyond-Labels head (Rahman et al., 2025, arXiv 2501.16769) on frozen CLIP features.

Beyond-Labels trains a small head on top of frozen CLIP patch tokens F_V (B, N, d) and class-name
embeddings F_W (K, d):

1. project both to a common width (the paper's "MLPs θ", Eq. 5) and add a Fourier embedding of each
   patch's (x, y) position to the visual tokens (Eq. 2: z_i = x_i + f_emb(x, y));
2. fuse the concatenated [visual ; text] tokens with 8 pre-norm transformer layers of 4 heads (Eq. 5);
3. decode the fused patches with convolutions and 2x upsamplings, then score every pixel against every
   fused class by cosine similarity; predictions use sigmoid(cos / τ) with τ = 0.08.

The paper does not specify the Fourier features, the projections or the decoder, so these follow its
reference [14], Fusioner (Ma et al., BMVC 2022): Fusioner's projections, post-fusion LayerNorm and
bias-free patch/class projections, and its decoder of (conv3x3 → InstanceNorm → ReLU → bilinear x2)
stages ending in conv3x3 → IN → ReLU → conv1x1. Two deliberate differences from Fusioner: there is no
learnable per-class embedding (it would tie the head to a fixed class list, and without it the head is
exactly equivariant to permutations of the classes), and the decoder narrows its channels stage by
stage instead of keeping the full width at up to 8x the token resolution. The Fourier features are the
random Fourier features of Tancik et al. (NeurIPS 2020), the paper's reference [22].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FourierPositionalEncoding", "FusionBlock", "ConvUpsampleDecoder", "BeyondLabelsHead"]


def patch_centres(grid: tuple[int, int], *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised (x, y) centres in [0, 1]² of the patches of an (h, w) grid, row-major: (h*w, 2).

    Patch (i, j) has centre ((j + 0.5) / w, (i + 0.5) / h), so the same image region gets the same
    coordinates at any grid size, which is what lets the head generalise across input sizes.
    """
    h, w = grid
    ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


class FourierPositionalEncoding(nn.Module):
    """f_emb(x, y) of Eq. 2: random Fourier features of the patch centres, then a learnable Linear.

    γ(p) = [sin(2π B_f p), cos(2π B_f p)] ∈ R^{2m} with B_f ~ N(0, σ²) of shape (m, 2), drawn once
    (Tancik et al., 2020). B_f is a persistent buffer, so a checkpoint restores exactly the
    frequencies the Linear was trained on. The phases are computed in float64 (float32 would lose
    ~1e-5 at |2π B_f p| ≈ 200 for σ = 10) except on devices without float64.
    """

    def __init__(
        self, num_frequencies: int = 128, sigma: float = 10.0, out_dim: int = 512, seed: int | None = None
    ) -> None:
        super().__init__()
        if num_frequencies <= 0 or out_dim <= 0:
            raise ValueError(f"num_frequencies and out_dim must be positive, got {num_frequencies}, {out_dim}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.num_frequencies = num_frequencies
        self.sigma = float(sigma)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        freqs = torch.randn(num_frequencies, 2, generator=generator) * self.sigma
        self.register_buffer("frequencies", freqs, persistent=True)
        self.proj = nn.Linear(2 * num_frequencies, out_dim)

    def features(self, grid: tuple[int, int]) -> torch.Tensor:
        """γ(p) for every patch of ``grid``: (h*w, 2m), in the Linear's dtype."""
        freqs = self.frequencies
        exact = torch.float32 if freqs.device.type == "mps" else torch.float64
        p = patch_centres(grid, dtype=exact, device=freqs.device)
        phase = 2.0 * math.pi * (p @ freqs.to(exact).T)  # (N, m)
        return torch.cat([phase.sin(), phase.cos()], dim=1).to(self.proj.weight.dtype)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """The embedding f_emb for every patch of an (h, w) grid, row-major: (h*w, out_dim)."""
        h, w = grid
        if h <= 0 or w <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        return self.proj(self.features((int(h), int(w))))


class FusionBlock(nn.Module):
    """One pre-norm transformer encoder layer of the fusion module (Eq. 5; Fusioner's block).

    x ← x + MHSA(LN(x)); x ← x + MLP(LN(x)), with exact GELU and no dropout, so the output is a
    deterministic function of the weights.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over all tokens (visual and text alike): (B, T, C) -> (B, T, C)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ConvUpsampleDecoder(nn.Module):
    """Fusioner's decoder: progressive 2x upsampling of the fused patches to per-pixel features.

    Stages of conv3x3 → InstanceNorm → ReLU → bilinear x2, then conv3x3 → IN → ReLU → conv1x1 back to
    ``out_channels`` (the text width, so pixels and classes share one space).
    The paper only says "after k convolutional layers, the decoder performs a 2x upsampling"; k = 1 as
    in Fusioner. InstanceNorm has no affine parameters and no running statistics (PyTorch's default,
    as in Fusioner), so training and evaluation behave identically.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        if not channels:
            raise ValueError("the decoder needs at least one stage")
        chans = [in_channels, *channels]
        # no bias before InstanceNorm: the norm removes any per-channel constant, so a bias would get only
        # rounding noise as gradient, which Adam would turn into full-size random steps
        self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip(chans[:-1], chans[1:]))
        self.conv_last = nn.Conv2d(chans[-1], chans[-1], 3, padding=1, bias=False)
        self.out = nn.Conv2d(chans[-1], out_channels, 1)

    @staticmethod
    def _conv_in_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv → InstanceNorm2d (no affine, no running stats, eps 1e-5) → ReLU."""
        return F.relu(F.instance_norm(conv(x), eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, out_channels, h·2^stages, w·2^stages)."""
        for conv in self.stages:
            x = self._conv_in_relu(conv, x)
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self._conv_in_relu(self.conv_last, x)
        return self.out(x)


def _default_decoder_channels(width: int, stages: int) -> tuple[int, ...]:
    return tuple(max(width >> (i + 1), 16) for i in range(stages))


class BeyondLabelsHead(nn.Module):
    """Frozen-CLIP tokens and class embeddings -> per-pixel cosine similarities (Beyond-Labels, Fig. 1-2).

    ``forward`` returns the *cosine* (B, K, h·2^s, w·2^s) at decoder resolution; callers divide by
    :attr:`tau` (:meth:`scaled_logits`) for the loss or the sigmoid, and upsample to the image. K may
    change between calls (15 seen classes in training, 2 or 171 at inference): nothing in the head
    depends on the class count or order.
    """

    def __init__(
        self,
        clip_dim: int,
        width: int = 512,
        depth: int = 8,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        decoder_stages: int = 3,
        decoder_channels: Sequence[int] | None = None,
        fourier: bool = True,
        fourier_frequencies: int = 128,
        fourier_sigma: float = 10.0,
        fourier_seed: int | None = None,
        tau: float = 0.08,
    ) -> None:
        super().__init__()
        if clip_dim <= 0 or width <= 0 or depth < 0 or heads <= 0:
            raise ValueError(f"invalid sizes: clip_dim={clip_dim}, width={width}, depth={depth}, heads={heads}")
        if decoder_stages < 1:
            raise ValueError(f"decoder_stages must be >= 1, got {decoder_stages}")
        if decoder_channels is None:
            decoder_channels = _default_decoder_channels(width, decoder_stages)
        decoder_channels = tuple(int(c) for c in decoder_channels)
        if len(decoder_channels) != decoder_stages:
            raise ValueError(f"decoder_channels {decoder_channels} must have decoder_stages={decoder_stages} entries")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self._config: dict[str, Any] = {
            "clip_dim": int(clip_dim),
            "width": int(width),
            "depth": int(depth),
            "heads": int(heads),
            "mlp_ratio": float(mlp_ratio),
            "decoder_stages": int(decoder_stages),
            "decoder_channels": list(decoder_channels),
            "fourier": bool(fourier),
            "fourier_frequencies": int(fourier_frequencies),
            "fourier_sigma": float(fourier_sigma),
            "fourier_seed": fourier_seed,
            "tau": float(tau),
        }
        self.tau = float(tau)
        self.decoder_stages = decoder_stages
        # "MLPs θ" of Eq. 5, as Fusioner's projections.
        self.visual_proj = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, width))
        self.fourier = (
            FourierPositionalEncoding(fourier_frequencies, fourier_sigma, width, seed=fourier_seed) if fourier else None
        )
        self.blocks = nn.ModuleList(FusionBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.patch_out = nn.Linear(width, width, bias=False)
        self.text_out = nn.Linear(width, width, bias=False)
        self.decoder = ConvUpsampleDecoder(width, decoder_channels, width)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        """ViT-style init (truncated normal, std 0.02) for every Linear, as in Fusioner's blocks."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- checkpoints -------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable), so a checkpoint can rebuild the head."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BeyondLabelsHead:
        """Rebuild an (untrained) head from :meth:`config`; load the state dict afterwards."""
        return cls(**config)

    # -- forward -------------------------------------------------------------------------------------
    def fuse(
        self, visual_tokens: torch.Tensor, grid: tuple[int, int], text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 2 and 5: fused patches (B, N, width) and fused classes (B, K, width)."""
        if visual_tokens.dim() != 3:
            raise ValueError(f"visual_tokens must be (B, N, d), got {tuple(visual_tokens.shape)}")
        b, n, _ = visual_tokens.shape
        h, w = int(grid[0]), int(grid[1])
        if h * w != n:
            raise ValueError(f"grid {tuple(grid)} has {h * w} patches but visual_tokens has {n}")
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(b, -1, -1)  # one vocabulary shared by the batch
        if text.dim() != 3 or text.shape[0] != b or text.shape[1] == 0:
            raise ValueError(f"text must be (K, d) or (B, K, d) with K >= 1, got {tuple(text.shape)}")
        x = self.visual_proj(visual_tokens)
        if self.fourier is not None:
            x = x + self.fourier((h, w)).to(x.dtype)  # Eq. 2
        z = torch.cat([x, self.text_proj(text)], dim=1)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)
        return self.patch_out(z[:, :n]), self.text_out(z[:, n:])

    def forward(self, visual_tokens: torch.Tensor, grid: tuple[int, int], text: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (B, K, h·2^s, w·2^s) in [-1, 1] between decoded pixels and fused classes.

        ``visual_tokens`` (B, N = h*w, d) are row-major patch tokens of the frozen CLIP; ``text`` is
        (K, d) shared by the batch, or (B, K, d) per image.
        """
        patches, classes = self.fuse(visual_tokens, grid, text)
        b, n, c = patches.shape
        pixels = self.decoder(patches.transpose(1, 2).reshape(b, c, int(grid[0]), int(grid[1])))
        pixels = F.normalize(pixels, dim=1)
        classes = F.normalize(classes, dim=-1)
        return torch.einsum("bchw,bkc->bkhw", pixels, classes)

    def scaled_logits(self, cosine: torch.Tensor) -> torch.Tensor:
        """cos / τ: the logits of the paper's temperature-scaled sigmoid (τ = 0.08)."""
        return cosine / self.tau
