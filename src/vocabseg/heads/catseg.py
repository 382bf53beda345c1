"""CAT-Seg's cost-aggregation head (Cho et al., CVPR 2024, arXiv 2303.11797), on dense CLIP features.

The head turns dense CLIP features and class text embeddings into one logit map per class, in the
order of the official ``Aggregator`` (cat_seg/modeling/transformer/model.py):

1. **cost volume** (Sec. 3.2, Eq. 1): cosine similarity between the L2-normalised dense image
   features (B, C, h, w) and the unit text embeddings (B, K, P, C) of every class and template:
   C ∈ R^{B×P×K×h×w};
2. **class selection** (official code only): with more than ``pad_len`` classes, only the ``pad_len``
   classes of highest maximum cost are aggregated; the others get the logit −100;
3. **embedding**: a 7×7 convolution from the P template channels to ``hidden_dim``, per class map;
4. **aggregation** (Sec. 3.3, Fig. 3), ``num_layers`` times:

   * *spatial*: two Swin blocks on each class map (window ``window``, the second shifted by half a
     window), with the projected appearance guidance (a 3×3 conv of the dense CLIP features)
     concatenated to the queries' and keys' input (Eq. 4);
   * *class*: linear attention (φ = ELU + 1, Katharopoulos et al. 2020) across the classes at every
     position, with the projected text guidance concatenated to the queries' and keys' input
     (Eq. 5). Features are average-pooled ``pooling`` in training and not at all in evaluation (the
     official ``eval.sh`` sets ``POOLING_SIZES [1,1]``), and the class axis is padded to ``pad_len``
     with a learned token (and a learned guidance token), so the attention always sees ``pad_len``
     classes;

5. **decoding** (Sec. 3.4): stages of ConvTranspose ×2, concatenation of projected CLIP middle-layer
   guidance (outputs of CLIP blocks 3/7 for ViT-B, 7/15 for ViT-L, upsampled ×2 / ×4 by
   ConvTranspose and projected by a 3×3 conv), and a double conv (GroupNorm); then a 3×3 conv to one
   logit per class, at 4× the feature grid (96×96 for 24×24 features).

Extension seam (FGAseg, Li et al. 2025, adds a local cost volume, per-image text and auxiliary heads):
:meth:`CATSegHead.forward` is a fixed sequence of small overridable stages that share one
:class:`CostState`::

    text = prepare_text(text, B)                       # (B, K, P, C) unit text
    state = select_classes(CostState(image, text, cost_volume(image, text), ...))
    x = embed(state)                                   # (B, hidden, K', h, w)
    project_guidance(state, guidance)                  # fills state.appearance / text_guidance / decoder_guidance
    x = aggregate(x, state)                            # (B, hidden, K', h, w)
    maps = to_class_maps(x)                            # (B·K', hidden, h, w), batch-major
    for i in range(num_stages): maps = decode_stage(i, maps, state)
    logits = predict(maps, state)                      # (B, K', 4h, 4w)
    logits = restore_classes(logits, state)            # (B, K, 4h, 4w), −100 where not selected

Text may be shared by the batch ((K, P, C)) or per image ((B, K, P, C)); every stage after
:meth:`prepare_text` sees it per image. ``state.extras`` is a free dict for subclasses (auxiliary
logits, a second cost volume), and ``forward(..., return_state=True)`` hands the state back. A decoder
stage may drop classes (FGAseg's top-N pruning): it keeps the same number of rows per image in the
batch-major order and sets ``state.selected`` to the kept classes' indices among the K (composed with
any earlier selection); :meth:`predict` and :meth:`restore_classes` follow the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CATSegHead",
    "ClassAggregation",
    "CostState",
    "GuidedSwinBlock",
    "GuidedWindowAttention",
    "LinearClassAttention",
    "SpatialAggregation",
    "UpBlock",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

#: the logit of classes left out above ``pad_len`` (official code: ``torch.full(..., -100.)``)
UNSELECTED_LOGIT = -100.0
#: the additive attention mask between tokens of different regions of a shifted window (Swin's value)
SHIFT_MASK_VALUE = -100.0


# -- windows -----------------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, H, W, C) -> (N·nW, window·window, C): non-overlapping windows, row-major inside and across."""
    n, h, w, c = x.shape
    x = x.view(n, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (N·nW, window·window, C) -> (N, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(
    h: int, w: int, window: int, shift: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """Swin's mask for a grid rolled by ``-shift``: (nW, window², window²), 0 between tokens of the same
    original region and −100 between tokens the roll brought together (``None`` without a shift)."""
    if shift == 0:
        return None
    region = torch.zeros(1, h, w, 1, device=device)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, rows, cols, :] = count
            count += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, window²)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.where(diff != 0, torch.full_like(diff, SHIFT_MASK_VALUE), torch.zeros_like(diff))


def _window_geometry(grid: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
    """Swin's rule: a grid no larger than the window is one window, unshifted; otherwise the window must
    tile the grid (CAT-Seg's 24×24 grid with window 12)."""
    h, w = grid
    if min(h, w) <= window:
        window, shift = min(h, w), 0
    if h % window or w % window:
        raise ValueError(f"the {h}x{w} cost grid is not tiled by {window}x{window} windows; change window or grid")
    return window, shift


# -- spatial aggregation -------------------------------------------------------------------------------------------
class GuidedWindowAttention(nn.Module):
    """Window multi-head attention whose queries and keys also see the appearance guidance (Eq. 4):
    q, k = Linear([x ; g]), v = Linear(x). No relative position bias (official ``WindowAttention``)."""

    def __init__(self, dim: int, guidance_dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads = dim, heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N·nW, T, dim + guidance_dim) windows; mask (nW, T, T) or None -> (N·nW, T, dim)."""
        n, t, _ = x.shape
        q = self.q(x).view(n, t, self.heads, -1).transpose(1, 2) * self.scale
        k = self.k(x).view(n, t, self.heads, -1).transpose(1, 2)
        v = self.v(x[..., : self.dim]).view(n, t, self.heads, -1).transpose(1, 2)
        attn = q @ k.transpose(-2, -1)  # (N·nW, heads, T, T)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(n // nw, nw, self.heads, t, t) + mask.to(attn.dtype)[None, :, None]
            attn = attn.view(n, self.heads, t, t)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, self.dim))


class Mlp(nn.Sequential):
    """timm's ``Mlp`` (fc1 → GELU → fc2), the Swin blocks' feed-forward."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class GuidedSwinBlock(nn.Module):
    """A pre-norm Swin block (Liu et al. 2021) whose attention input is [LN(x) ; guidance]."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window={window})")
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """x (N, h·w, dim), guidance (N, h·w, g) or None -> (N, h·w, dim)."""
        h, w = grid
        n, length, c = x.shape
        if length != h * w:
            raise ValueError(f"{length} tokens do not form the {h}x{w} grid")
        window, shift = _window_geometry(grid, self.window, self.shift)
        y = self.norm1(x).view(n, h, w, c)
        if guidance is not None:
            y = torch.cat([y, guidance.view(n, h, w, -1)], dim=-1)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        mask = shifted_window_mask(h, w, window, shift, device=x.device)
        y = window_reverse(self.attn(window_partition(y, window), mask), window, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y.reshape(n, h * w, c)
        return x + self.mlp(self.norm2(x))


class SpatialAggregation(nn.Module):
    """Two guided Swin blocks on every class map (the second shifted by half a window), Sec. 3.3.

    The appearance guidance is layer-normalised once and shared by all classes of an image.
    """

    def __init__(self, dim: int, guidance_dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None
        self.blocks = nn.ModuleList(
            GuidedSwinBlock(dim, guidance_dim, heads, window, shift) for shift in (0, window // 2)
        )

    def forward(self, x: torch.Tensor, appearance: torch.Tensor | None) -> torch.Tensor:
        """x (B, C, K, h, w), appearance (B, g, h, w) or None -> (B, C, K, h, w)."""
        b, c, k, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * k, h * w, c)
        guidance = None
        if appearance is not None and self.guidance_norm is not None:
            g = self.guidance_norm(appearance.flatten(2).transpose(1, 2))  # (B, h·w, g)
            guidance = g.unsqueeze(1).expand(b, k, h * w, g.shape[-1]).reshape(b * k, h * w, -1)
        for block in self.blocks:
            tokens = block(tokens, guidance, (h, w))
        return tokens.view(b, k, h, w, c).permute(0, 4, 1, 2, 3)


# -- class aggregation ---------------------------------------------------------------------------------------------
class LinearClassAttention(nn.Module):
    """Multi-head linear attention across classes (Katharopoulos et al. 2020, φ(x) = ELU(x) + 1):
    out_l = φ(q_l)ᵀ Σ_s φ(k_s) v_sᵀ / (φ(q_l)ᵀ Σ_s φ(k_s) + ε), with q, k = Linear([x ; g]), v = Linear(x).

    Values are divided by the number of classes before the sums and the result multiplied back, as the
    official ``LinearAttention`` does against fp16 overflow (with ε = 1e-6 that changes the numbers
    slightly, so it is kept).
    """

    def __init__(self, dim: int, guidance_dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by heads {heads}")
        self.heads, self.eps = heads, eps
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x (N, K, dim), guidance (N, K, g) or None -> (N, K, dim)."""
        n, k, c = x.shape
        xg = x if guidance is None else torch.cat([x, guidance], dim=-1)
        q = F.elu(self.q(xg).view(n, k, self.heads, -1)) + 1
        key = F.elu(self.k(xg).view(n, k, self.heads, -1)) + 1
        v = self.v(x).view(n, k, self.heads, -1) / k
        kv = torch.einsum("nshd,nshv->nhdv", key, v)
        z = 1 / (torch.einsum("nlhd,nhd->nlh", q, key.sum(dim=1)) + self.eps)
        out = torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * k
        return out.reshape(n, k, c)


class ClassAggregation(nn.Module):
    """A pre-norm transformer layer over the class axis at every (pooled) position, Sec. 3.3.

    ``pad_len`` > 0: the class axis is padded to ``pad_len`` with a learned token (and the guidance
    with a learned guidance token) before the attention, so the linear attention's sums always run over
    ``pad_len`` entries whatever the vocabulary size (official ``ClassTransformerLayer``).
    """

    def __init__(self, dim: int, guidance_dim: int, heads: int, pad_len: int) -> None:
        super().__init__()
        self.pad_len = pad_len
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearClassAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim)) if pad_len > 0 else None
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_len > 0 and guidance_dim else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, pooling: tuple[int, int]) -> torch.Tensor:
        """x (B, C, K, h, w), guidance (B, K, g) or None, average-pooling window -> (B, C, K, h, w)."""
        b, c, k, h, w = x.shape
        pooled = x.transpose(1, 2).reshape(b * k, c, h, w)
        if tuple(pooling) != (1, 1):
            pooled = F.avg_pool2d(pooled, kernel_size=tuple(pooling))
        hp, wp = pooled.shape[-2:]
        tokens = pooled.view(b, k, c, hp, wp).permute(0, 3, 4, 1, 2)  # (B, hp, wp, K, C)
        pad = self.pad_len - k if self.padding_tokens is not None else 0
        if pad > 0:
            tokens = torch.cat([tokens, self.padding_tokens.to(tokens.dtype).expand(b, hp, wp, pad, c)], dim=3)
        tokens = tokens.reshape(b * hp * wp, k + max(pad, 0), c)
        if guidance is not None:
            if pad > 0 and self.padding_guidance is not None:
                padding = self.padding_guidance.to(guidance.dtype).expand(b, pad, guidance.shape[-1])
                guidance = torch.cat([guidance, padding], dim=1)
            g = guidance.shape[-1]
            guidance = guidance[:, None].expand(b, hp * wp, -1, g).reshape(b * hp * wp, -1, g)
        tokens = tokens + self.attn(self.norm1(tokens), guidance)
        tokens = tokens + self.mlp(self.norm2(tokens))
        tokens = tokens.view(b, hp, wp, -1, c)[:, :, :, :k]  # drop the padding
        update = tokens.permute(0, 3, 4, 1, 2).reshape(b * k, c, hp, wp)
        if (hp, wp) != (h, w):
            update = F.interpolate(update, size=(h, w), mode="bilinear", align_corners=True)
        return x + update.view(b, k, c, h, w).transpose(1, 2)


class AggregatorLayer(nn.Module):
    """Spatial aggregation, then class aggregation (one of the official ``AggregatorLayer``)."""

    def __init__(self, dim: int, appearance_dim: int, text_dim: int, heads: int, window: int, pad_len: int) -> None:
        super().__init__()
        self.spatial = SpatialAggregation(dim, appearance_dim, heads, window)
        self.classwise = ClassAggregation(dim, text_dim, heads, pad_len)

    def forward(
        self,
        x: torch.Tensor,
        appearance: torch.Tensor | None,
        text_guidance: torch.Tensor | None,
        pooling: tuple[int, int],
    ) -> torch.Tensor:
        return self.classwise(self.spatial(x, appearance), text_guidance, pooling)


# -- decoder ---------------------------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 16 channels per group (official ``DoubleConv``; at least one group)."""
    return nn.GroupNorm(max(channels // 16, 1), channels)


class UpBlock(nn.Module):
    """ConvTranspose ×2 to ``in - guidance`` channels, concatenation of the guidance, then
    (conv3×3 → GroupNorm → ReLU) × 2 (official ``Up`` + ``DoubleConv``)."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int) -> None:
        super().__init__()
        if not 0 <= guidance_channels < in_channels:
            raise ValueError(f"decoder guidance {guidance_channels} must be below the stage input {in_channels}")
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _group_norm(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _group_norm(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x (B·K, C, h, w), guidance (B, g, 2h, 2w) or None -> (B·K, out, 2h, 2w)."""
        x = self.up(x)
        if guidance is not None:
            per_class = x.shape[0] // guidance.shape[0]
            x = torch.cat([x, guidance.repeat_interleave(per_class, dim=0)], dim=1)
        return self.conv(x)


# -- the head -------------------------------------------------------------------------------------------------------
@dataclass
class CostState:
    """What the stages of :class:`CATSegHead` share for one forward pass.

    Attributes:
        image: (B, C, h, w) dense CLIP features, not normalised (the appearance guidance's input).
        text: (B, K', P, C) unit text of the classes aggregated (after :meth:`CATSegHead.select_classes`).
        cost: (B, P, K', h, w) cosine cost volume of those classes.
        num_classes: K, the number of classes asked for.
        selected: (B, K') indices of the aggregated classes among the K, or ``None`` for all, in order.
        appearance: (B, g_a, h, w) projected appearance guidance (or ``None``).
        text_guidance: (B, K', g_t) projected text guidance (or ``None``).
        decoder_guidance: one (B, g_i, h·2^(i+1), w·2^(i+1)) map (or ``None``) per decoder stage.
        extras: free room for subclasses (auxiliary logits, a second cost volume...).
    """

    image: torch.Tensor
    text: torch.Tensor
    cost: torch.Tensor
    num_classes: int
    selected: torch.Tensor | None = None
    appearance: torch.Tensor | None = None
    text_guidance: torch.Tensor | None = None
    decoder_guidance: list[torch.Tensor | None] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.cost.shape[0]

    @property
    def classes(self) -> int:
        """K', the number of classes aggregated."""
        return self.cost.shape[2]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = (int(v) for v in value)
    return a, b


class CATSegHead(nn.Module):
    """Dense CLIP features + class text + CLIP middle-layer guidance -> per-class logits at 4× the grid.

    Args:
        clip_dim: width of the dense features and text embeddings (CLIP's joint space: 512 for ViT-B/16,
            768 for ViT-L/14).
        clip_width: width of CLIP's image tower (768 / 1024): the middle-layer guidance's channels.
        prompt_channels: P, the templates per class the cost volume has (1: "A photo of a {} in the scene").
        hidden_dim, heads: aggregator width and heads (128, 4).
        appearance_guidance_dim, text_guidance_dim: projected guidance widths (128, 128).
        num_layers: aggregator layers (2).
        window: Swin window (12 on the 24×24 grid).
        pooling: average pooling before the class attention in training ((2, 2)); evaluation uses
            ``eval_pooling`` ((1, 1), as the official evaluation script sets).
        pad_len: classes the class attention always sees (256; 0 disables padding and selection).
        decoder_dims: output channels of each upsampling stage ((64, 32)).
        decoder_guidance_dims: channels the CLIP middle layers are upsampled to, one per stage ((256, 128)).
        decoder_guidance_proj_dims: their projected channels, concatenated in each stage ((32, 16)).
    """

    def __init__(
        self,
        clip_dim: int,
        clip_width: int,
        prompt_channels: int = 1,
        hidden_dim: int = 128,
        heads: int = 4,
        appearance_guidance_dim: int = 128,
        text_guidance_dim: int = 128,
        num_layers: int = 2,
        window: int = 12,
        pooling: int | Sequence[int] = (2, 2),
        eval_pooling: int | Sequence[int] = (1, 1),
        pad_len: int = 256,
        decoder_dims: Sequence[int] = (64, 32),
        decoder_guidance_dims: Sequence[int] = (256, 128),
        decoder_guidance_proj_dims: Sequence[int] = (32, 16),
    ) -> None:
        super().__init__()
        decoder_dims, decoder_guidance_dims = tuple(decoder_dims), tuple(decoder_guidance_dims)
        decoder_guidance_proj_dims = tuple(decoder_guidance_proj_dims)
        if not (len(decoder_dims) == len(decoder_guidance_dims) == len(decoder_guidance_proj_dims) >= 1):
            raise ValueError(
                f"decoder_dims {decoder_dims}, decoder_guidance_dims {decoder_guidance_dims} and "
                f"decoder_guidance_proj_dims {decoder_guidance_proj_dims} need one entry per stage (>= 1)"
            )
        if min(clip_dim, clip_width, prompt_channels, hidden_dim, num_layers, window) <= 0 or pad_len < 0:
            raise ValueError("head sizes must be positive (pad_len >= 0)")
        if appearance_guidance_dim <= 0 or text_guidance_dim <= 0:
            raise ValueError("the appearance and text guidance widths must be positive")
        self.prompt_channels = int(prompt_channels)
        self.pad_len = int(pad_len)
        self.pooling, self.eval_pooling = _pair(pooling), _pair(eval_pooling)
        self.cost_embed = nn.Conv2d(prompt_channels, hidden_dim, kernel_size=7, padding=3)
        self.appearance_proj = nn.Sequential(nn.Conv2d(clip_dim, appearance_guidance_dim, 3, padding=1), nn.ReLU())
        self.text_proj = nn.Sequential(nn.Linear(clip_dim, text_guidance_dim), nn.ReLU())
        self.layers = nn.ModuleList(
            AggregatorLayer(hidden_dim, appearance_guidance_dim, text_guidance_dim, heads, window, pad_len)
            for _ in range(num_layers)
        )
        # CLIP middle layer i is upsampled ×2^(i+1) (kernel = stride) to meet decoder stage i's output
        self.guidance_upsample = nn.ModuleList(
            nn.ConvTranspose2d(clip_width, d, kernel_size=2 ** (i + 1), stride=2 ** (i + 1))
            for i, d in enumerate(decoder_guidance_dims)
        )
        self.decoder_guidance_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, p, 3, padding=1), nn.ReLU())
            for d, p in zip(decoder_guidance_dims, decoder_guidance_proj_dims)
        )
        ins = (hidden_dim, *decoder_dims[:-1])
        self.decoder = nn.ModuleList(UpBlock(i, o, g) for i, o, g in zip(ins, decoder_dims, decoder_guidance_proj_dims))
        self.predictor = nn.Conv2d(decoder_dims[-1], 1, kernel_size=3, padding=1)

    @property
    def num_stages(self) -> int:
        return len(self.decoder)

    @property
    def upsampling(self) -> int:
        """The logits' resolution over the feature grid's (4 with two stages)."""
        return 2**self.num_stages

    # -- stages (override these) ---------------------------------------------------------------------------------
    def prepare_text(self, text: torch.Tensor, batch: int) -> torch.Tensor:
        """(K, P, C) shared or (B, K, P, C) per image -> (B, K, P, C) unit text with this head's P.

        A head built for one template (``prompt_channels=1``) takes any number of templates as their
        prompt ensemble (mean of the unit embeddings, renormalised), as the official code's
        ``feature_map`` averages templates; any other mismatch is an error.
        """
        if text.dim() == 3:
            text = text.unsqueeze(0).expand(batch, *text.shape)
        if text.dim() != 4 or text.shape[0] != batch or text.shape[1] == 0:
            raise ValueError(f"text must be (K, P, C) or (B={batch}, K, P, C) with K >= 1, got {tuple(text.shape)}")
        text = F.normalize(text, dim=-1)
        p = text.shape[2]
        if p != self.prompt_channels:
            if self.prompt_channels != 1:
                raise ValueError(
                    f"this head was built for {self.prompt_channels} templates per class, got {p}; "
                    f"encode the classes with the {self.prompt_channels} templates it was trained with"
                )
            text = F.normalize(text.mean(dim=2, keepdim=True), dim=-1)
        return text

    def cost_volume(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 1: cos(image feature, text embedding), (B, C, h, w) x (B, K, P, C) -> (B, P, K, h, w)."""
        return torch.einsum("bchw,bkpc->bpkhw", F.normalize(image, dim=1), F.normalize(text, dim=-1))

    def select_classes(self, state: CostState) -> CostState:
        """Above ``pad_len`` classes keep the ``pad_len`` of highest maximum cost (over templates and
        positions), per image, in their original order (official code: ``topk`` on the same score)."""
        if self.pad_len <= 0 or state.classes <= self.pad_len:
            return state
        score = state.cost.amax(dim=(1, 3, 4))  # (B, K)
        index = score.topk(self.pad_len, dim=-1).indices.sort(dim=-1).values  # (B, pad_len)
        b, p, _, h, w = state.cost.shape
        state.cost = state.cost.gather(2, index[:, None, :, None, None].expand(b, p, -1, h, w))
        state.text = state.text.gather(1, index[:, :, None, None].expand(-1, -1, *state.text.shape[2:]))
        state.selected = index
        return state

    def embed(self, state: CostState) -> torch.Tensor:
        """The 7×7 conv of each class's P cost maps: (B, P, K', h, w) -> (B, hidden, K', h, w)."""
        b, p, k, h, w = state.cost.shape
        x = self.cost_embed(state.cost.transpose(1, 2).reshape(b * k, p, h, w))
        return x.view(b, k, -1, h, w).transpose(1, 2)

    def project_guidance(self, state: CostState, guidance: Sequence[torch.Tensor]) -> None:
        """Appearance guidance (3×3 conv + ReLU of the dense features), text guidance (Linear + ReLU of
        the templates' renormalised mean) and decoder guidance (ConvTranspose then 3×3 conv + ReLU of
        CLIP's middle-layer token maps (B, width, h, w), one per decoder stage)."""
        if len(guidance) != self.num_stages:
            raise ValueError(f"{len(guidance)} middle-layer guidance maps for {self.num_stages} decoder stages")
        state.appearance = self.appearance_proj(state.image)
        state.text_guidance = self.text_proj(F.normalize(state.text.mean(dim=2), dim=-1))
        state.decoder_guidance = [
            proj(up(g)) for up, proj, g in zip(self.guidance_upsample, self.decoder_guidance_proj, guidance)
        ]

    def aggregate(self, x: torch.Tensor, state: CostState) -> torch.Tensor:
        """The aggregator layers: (B, hidden, K', h, w) -> same shape."""
        pooling = self.pooling if self.training else self.eval_pooling
        for layer in self.layers:
            x = layer(x, state.appearance, state.text_guidance, pooling)
        return x

    @staticmethod
    def to_class_maps(x: torch.Tensor) -> torch.Tensor:
        """(B, C, K, h, w) -> (B·K, C, h, w), batch-major (row b·K + k), the decoder's layout."""
        b, c, k, h, w = x.shape
        return x.transpose(1, 2).reshape(b * k, c, h, w)

    def decode_stage(self, i: int, maps: torch.Tensor, state: CostState) -> torch.Tensor:
        """Decoder stage ``i``: (B·K', C, h, w) -> (B·K', decoder_dims[i], 2h, 2w)."""
        return self.decoder[i](maps, state.decoder_guidance[i] if state.decoder_guidance else None)

    def predict(self, maps: torch.Tensor, state: CostState) -> torch.Tensor:
        """The last 3×3 conv: (B·K', C, H, W) -> (B, K', H, W) logits (K' from the rows, so a stage that
        dropped classes only has to keep the batch-major row order)."""
        out = self.predictor(maps)
        return out.view(state.batch, -1, *out.shape[-2:])

    def restore_classes(self, logits: torch.Tensor, state: CostState) -> torch.Tensor:
        """Put the logits (B, K', H, W) of the classes ``state.selected`` names (all K, in order, when it is
        ``None``) back among all K; the others get −100."""
        if state.selected is None:
            return logits
        b, _, h, w = logits.shape
        full = logits.new_full((b, state.num_classes, h, w), UNSELECTED_LOGIT)
        return full.scatter(1, state.selected[:, :, None, None].expand(-1, -1, h, w), logits)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        guidance: Sequence[torch.Tensor],
        *,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, CostState]:
        """Logits (B, K, h·2^s, w·2^s).

        Args:
            image: (B, C, h, w) dense CLIP features (not normalised).
            text: (K, P, C) unit text shared by the batch, or (B, K, P, C) per image.
            guidance: one (B, width, h, w) CLIP middle-layer token map per decoder stage (block 3's then
                block 7's for ViT-B).
            return_state: also return the :class:`CostState` (for losses on intermediate outputs).
        """
        text = self.prepare_text(text, image.shape[0])
        state = CostState(image=image, text=text, cost=self.cost_volume(image, text), num_classes=text.shape[1])
        state = self.select_classes(state)
        x = self.embed(state)
        self.project_guidance(state, guidance)
        maps = self.to_class_maps(self.aggregate(x, state))
        for i in range(self.num_stages):
            maps = self.decode_stage(i, maps, state)
        logits = self.restore_classes(self.predict(maps, state), state)
        return (logits, state) if return_state else logits
