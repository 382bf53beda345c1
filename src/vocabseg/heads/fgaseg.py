"""FGAseg's additions to CAT-Seg (Li et al., 2025, arXiv 2501.00877), and CAT-Seg's head with them.

FGAseg keeps CAT-Seg's cost-aggregation pipeline and adds:

* **P2Tformer** (Sec. III-B1, Eqs. 5-6): the class text embeddings cross-attend to the image tokens,
  so every image gets its own text embeddings text' = text + γ ⊙ out (γ ∈ R^d, initialised to 0.1).
* **T2Ploss** (Sec. III-B2, Eqs. 7-8): a projector upsamples the image features ×4 and each class's
  text' generates a 3×3 kernel and a bias that convolve them into an alignment map, supervised with
  the one-hot ground truth (BCE-with-logits in the official code, MSE in the paper), weight 0.02.
* **LCS**, local category supplementation (Sec. III-C2, Eq. 10): a second, convolutional cost volume
  next to CAT-Seg's cosine one (GCS), from per-class k×k kernels generated from the normalised text'
  with "kernel normalisation" (softmax over the k² taps), embedded with its own conv 7×7.
* **Fusion** (Sec. III-C3, Fig. 2c): the GCS and LCS embeddings are merged before the aggregator
  (``cat``: concatenate + Linear, or ``add``), and LCS is merged again before each upsampling stage.
* **Fast decoder** (Sec. III-D, Fig. 5): conv 3×3 auxiliary heads score the classes at three points;
  in training they add auxiliary losses, at inference each stage keeps only the classes that are in
  some pixel's top N by the auxiliary score.

The official release computes these in ``modeling/transformer/{P2Tformer,projector,Local_align,
Decoder,Decoder_fast}.py``; where paper and code differ the code's choice is the default and the
paper's an option. :class:`FGASegHead` puts them into CAT-Seg's head through its overridable stages
(:class:`~vocabseg.heads.catseg.CATSegHead`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._names import lookup
from .catseg import CATSegHead, CostState, _group_norm
from .losses import LossFn, _check, _per_image_mean, binary_ce_loss

__all__ = [
    "FUSIONS",
    "LOCAL_COST_MODES",
    "T2P_LOSSES",
    "AddFusion",
    "CatFusion",
    "FGASegHead",
    "LocalCost",
    "LocalCostUpsampler",
    "P2TLayer",
    "P2Tformer",
    "T2PProjector",
    "build_fusion",
    "class_scores",
    "downsample_labels",
    "one_hot_mse_loss",
    "sine_position_encoding",
    "top_n_classes",
]


# -- P2Tformer --------------------------------------------------------------------------------------------------
def sine_position_encoding(
    grid: tuple[int, int], dim: int, *, temperature: float = 10000.0, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """DETR's normalised sine position encoding of an (h, w) grid, row-major: (h·w, dim).

    The first dim/2 channels encode the row, the last dim/2 the column. Row i has coordinate
    y = (i + 1) / (h + 1e-6) · 2π (likewise for columns); channel pair (2j, 2j+1) holds
    (sin, cos)(y / T^(2j / (dim/2))). This is the ``PositionEmbeddingSine(d/2, normalize=True)`` the
    official P2Tformer adds to the image tokens.
    """
    h, w = int(grid[0]), int(grid[1])
    if dim % 4:
        raise ValueError(f"the sine position encoding needs a width divisible by 4, got {dim}")
    feats = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = (torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * scale)[:, None].expand(h, w)
    x = (torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * scale)[None, :].expand(h, w)
    pair = torch.arange(feats, dtype=torch.float32, device=device) // 2
    freq = temperature ** (2 * pair / feats)

    def encode(coord: torch.Tensor) -> torch.Tensor:
        phase = coord[..., None] / freq  # (h, w, feats)
        return torch.stack([phase[..., 0::2].sin(), phase[..., 1::2].cos()], dim=-1).flatten(-2)

    return torch.cat([encode(y), encode(x)], dim=-1).reshape(h * w, dim).to(dtype)


class P2TLayer(nn.Module):
    """One P2Tformer layer (Eq. 5): text ← LN(text + Linear(MHA(q=text, k=image + pos, v=image))).

    As the official ``ShortCut_CrossAttention``: the position encoding goes on the keys only, the text
    queries carry none, there is no dropout, and the attention's projection matrices are
    Xavier-initialised.
    """

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        for p in (*self.attn.parameters(), *self.norm.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, text: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """text (B, K, d), tokens (B, N, d), pos (N, d) -> (B, K, d)."""
        out = self.attn(text, tokens + pos, tokens, need_weights=False)[0]
        return self.norm(text + self.proj(out))


class P2Tformer(nn.Module):
    """Pixel-to-text alignment (Sec. III-B1): per-image text embeddings text' = text + γ ⊙ out (Eq. 6).

    ``out`` is the last of ``layers`` :class:`P2TLayer` applied to the text with the image tokens as
    memory; γ ∈ R^d is trainable, initialised to 0.1 (the paper's "trainable γ" beats every fixed
    value in its Table III c). One layer is the paper's choice (Table III b).
    """

    def __init__(self, dim: int, heads: int = 8, layers: int = 1, gamma_init: float = 0.1) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"P2Tformer needs at least one layer, got {layers}")
        self.dim = dim
        self.layers = nn.ModuleList(P2TLayer(dim, heads) for _ in range(layers))
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image (B, d, h, w) dense features, text (K, d) shared or (B, K, d) -> text' (B, K, d)."""
        b, d, h, w = image.shape
        if d != self.dim:
            raise ValueError(f"image features have {d} channels, the P2Tformer expects {self.dim}")
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(b, -1, -1)
        if text.dim() != 3 or text.shape[0] != b or text.shape[-1] != d:
            raise ValueError(f"text must be (K, {d}) or ({b}, K, {d}), got {tuple(text.shape)}")
        tokens = image.flatten(2).transpose(1, 2)
        pos = sine_position_encoding((h, w), d, device=image.device, dtype=image.dtype)
        out = text
        for layer in self.layers:
            out = layer(out, tokens, pos)
        return text + self.gamma * out


# -- dynamic per-class kernels ---------------------------------------------------------------------------------
def _per_image_class_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own K kernels: x (B, C, H, W), weight (B, K, C, k, k), bias (B, K)
    -> (B, K, H, W), "same" padding. One grouped convolution (groups = B) instead of a loop."""
    b, c, h, w = x.shape
    k, ks = weight.shape[1], weight.shape[-1]
    out = F.conv2d(
        x.reshape(1, b * c, h, w), weight.reshape(b * k, c, ks, ks), bias.reshape(b * k), padding=ks // 2, groups=b
    )
    return out.reshape(b, k, h, w)


def _split_kernel(params: torch.Tensor, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, C·k·k + 1) generated parameters -> kernels (B, K, C, k, k) and biases (B, K) (last entry)."""
    b, k, _ = params.shape
    return params[..., :-1].reshape(b, k, channels, size, size), params[..., -1]


def _per_image_text(text: torch.Tensor, batch: int) -> torch.Tensor:
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(batch, -1, -1)
    if text.dim() != 3 or text.shape[0] != batch:
        raise ValueError(f"text must be (K, d) or ({batch}, K, d), got {tuple(text.shape)}")
    return text


# -- T2Ploss ----------------------------------------------------------------------------------------------------
class T2PProjector(nn.Module):
    """Text-to-pixel alignment map of T2Ploss (Sec. III-B2, Eq. 7; the official CRIS-style ``Projector``).

    Vision: up×2 → conv3×3 (C_in → C_in) → norm → ReLU → up×2 → conv3×3 (C_in → c) → norm → ReLU →
    conv1×1 (c → c), bilinear upsampling, so (B, C_in, h, w) becomes (B, c, 4h, 4w) (c = C_in / 2 by
    default: 256 for ViT-B's 512). Text: Linear(d → c·k·k + 1) turns each class's text' into a k×k
    kernel over the c channels and a bias; convolving gives the alignment logits (B, K, 4h, 4w).

    The official code normalises with BatchNorm at one image per GPU, i.e. with per-image statistics
    in training; :class:`nn.InstanceNorm2d` with an affine computes exactly that for any batch size, so
    a batch split across DDP processes trains like one process. The map only feeds the T2P loss (the
    prediction never uses it), so BatchNorm's running statistics would never be read.
    """

    def __init__(self, in_channels: int, text_dim: int, channels: int | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        channels = in_channels // 2 if channels is None else int(channels)
        if channels <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"need channels > 0 and an odd kernel_size, got {channels}, {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size

        def conv_norm_relu(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.InstanceNorm2d(b, affine=True), nn.ReLU()]

        self.vision = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *conv_norm_relu(in_channels, in_channels),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *conv_norm_relu(in_channels, channels),
            nn.Conv2d(channels, channels, 1),
        )
        self.text = nn.Linear(text_dim, channels * kernel_size * kernel_size + 1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image (B, C_in, h, w), text' (K, d) or (B, K, d) -> alignment logits (B, K, 4h, 4w)."""
        x = self.vision(image)
        weight, bias = _split_kernel(self.text(_per_image_text(text, x.shape[0])), self.channels, self.kernel_size)
        return _per_image_class_conv(x, weight.to(x.dtype), bias.to(x.dtype))


def downsample_labels(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map (B, H, W) to ``size`` (PyTorch's "nearest": source index
    floor(i · H / h)). The official code resizes the one-hot targets this way, which picks the same
    pixels, so its targets are the one-hot of these labels."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].to(target.dtype)


def one_hot_mse_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, background_index: int | None = None
) -> torch.Tensor:
    """Eq. 8: mean squared error between the maps (B, K, H, W) and the one-hot masks of the labels
    (B, H, W), with :func:`~vocabseg.heads.losses.binary_ce_loss`'s label rules and averaging."""
    _check(logits, target, ignore_index, background_index)
    k = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    onehot = (target.long().unsqueeze(1) == torch.arange(k, device=target.device).view(1, k, 1, 1)).to(logits.dtype)
    per_elem = torch.where(valid, (logits - onehot) ** 2, torch.zeros_like(logits))
    return _per_image_mean(per_elem.sum(dim=(1, 2, 3)), valid.sum(dim=(1, 2, 3)) * k)


#: T2Ploss kinds, for the alignment logits against the labels resized by :func:`downsample_labels`:
#: BCE-with-logits (official code) or MSE (the paper's Eq. 8). Both follow :mod:`vocabseg.heads.losses`'
#: label rules, so the method applies its own ignore policy to either (the official code counts ignored
#: pixels as negatives, as CAT-Seg's main loss does).
T2P_LOSSES: dict[str, LossFn] = {"bce": binary_ce_loss, "mse": one_hot_mse_loss}


# -- LCS --------------------------------------------------------------------------------------------------------
def _full_kernel(weight: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return weight


def _depthwise_kernel(weight: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    # Σ_c t_c (W_c ⊛ F_c) is one full convolution with kernel t_c · W_c: computed that way, without
    # materialising the K·C depthwise maps.
    return weight * text[..., None, None]


LOCAL_COST_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "full": _full_kernel,
    "depthwise": _depthwise_kernel,
}


class LocalCost(nn.Module):
    """LCS (Sec. III-C2, Eq. 10): a convolutional text-pixel cost volume (B, K, h, w) and its embedding.

    Each class's normalised text' t_k goes through Linear(d → C·k·k + 1): a kernel W_k (C, k, k) and a
    bias b_k. "Kernel normalisation" takes a softmax over the k·k taps of every channel (so each
    channel's taps are positive and sum to 1; the paper's Table IV b: −1.3 to −2.0 mIoU without it).
    The image features F are L2-normalised over channels. ``mode``:

    * ``"full"`` (the official ``Local_align``): S_k = Σ_c W_{k,c} ⊛ F_c + b_k, one convolution whose
      kernel spans all channels. As every channel's taps sum to 1, all channels weigh the same: the
      class enters only through where the taps lie and the bias (with k = 1, S_k = Σ_c F_c + b_k).
    * ``"depthwise"`` (our reading of the paper's "depthwise convolution"): each channel is filtered
      with its own normalised kernel, S_k = Σ_c t_{k,c} (W_{k,c} ⊛ F_c) + b_k, i.e. the cosine
      similarity of the text with locally re-weighted image features; with k = 1 it is the cosine
      cost (GCS) plus a bias. It needs the text and image widths to match (CLIP's joint space).

    :meth:`embed` is the LCS's own conv 7×7 (1 → ``embed_dim``), as CAT-Seg's for the cosine cost.
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        embed_dim: int,
        kernel_size: int = 3,
        mode: str = "full",
        kernel_norm: bool = True,
    ) -> None:
        super().__init__()
        self._kernel_fn = lookup(LOCAL_COST_MODES, mode, "LCS mode")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if mode == "depthwise" and vision_dim != text_dim:
            raise ValueError(f"depthwise LCS needs equal text and image widths, got {text_dim} and {vision_dim}")
        self.vision_dim, self.kernel_size, self.mode, self.kernel_norm = vision_dim, kernel_size, mode, kernel_norm
        self.text = nn.Linear(text_dim, vision_dim * kernel_size * kernel_size + 1)
        self.embed_conv = nn.Conv2d(1, embed_dim, kernel_size=7, padding=3)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """image (B, C, h, w) dense features, text' (K, d) or (B, K, d) -> local cost (B, K, h, w)."""
        b = image.shape[0]
        img = F.normalize(image, dim=1)
        t = F.normalize(_per_image_text(text, b), dim=-1)
        weight, bias = _split_kernel(self.text(t), self.vision_dim, self.kernel_size)
        if self.kernel_norm:
            weight = weight.flatten(-2).softmax(dim=-1).view_as(weight)
        weight = self._kernel_fn(weight, t)
        return _per_image_class_conv(img, weight.to(img.dtype), bias.to(img.dtype))

    def embed(self, cost: torch.Tensor) -> torch.Tensor:
        """Local cost (B, K, h, w) -> embedding (B, embed_dim, K, h, w) (CAT-Seg's B C T H W layout)."""
        b, k, h, w = cost.shape
        out = self.embed_conv(cost.reshape(b * k, 1, h, w))
        return out.reshape(b, k, -1, h, w).transpose(1, 2)


# -- fusion -----------------------------------------------------------------------------------------------------
class CatFusion(nn.Module):
    """``cat`` fusion (the headline "NoFast+Cat"): Linear(C_a + C_b → C_out) over cat([a, b]) channels."""

    def __init__(self, channels: int, local_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels + local_channels, out_channels)

    def forward(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """x (N, C_a, ...), local (N, C_b, ...) -> (N, C_out, ...), channels on dim 1."""
        return self.proj(torch.cat([x, local], dim=1).movedim(1, -1)).movedim(-1, 1)


class AddFusion(nn.Module):
    """``add`` fusion: an elementwise sum (all widths equal; no parameters)."""

    def __init__(self, channels: int, local_channels: int, out_channels: int) -> None:
        super().__init__()
        if not channels == local_channels == out_channels:
            raise ValueError(
                f"add fusion needs equal widths, got {channels} + {local_channels} -> {out_channels}; use fusion='cat'"
            )

    def forward(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return x + local


FUSIONS: dict[str, type[nn.Module]] = {"cat": CatFusion, "add": AddFusion}


def build_fusion(mode: str, channels: int, local_channels: int, out_channels: int) -> nn.Module:
    """The fusion registered as ``mode`` in :data:`FUSIONS` (did-you-mean error otherwise)."""
    return lookup(FUSIONS, mode, "fusion")(channels, local_channels, out_channels)


# -- fast decoder -----------------------------------------------------------------------------------------------
def class_scores(head: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """An auxiliary head (conv → 1 channel) on every class map: x (B·K, C, h, w) -> (B, K, h, w)."""
    out = head(x)
    return out.reshape(batch, -1, *out.shape[-2:])


def top_n_classes(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (sorted) of the classes that are among the ``n`` best of at least one pixel of one image.

    scores (B, K, h, w) are the auxiliary logits. Like the official fast decoder, the union runs over
    the whole batch (the method calls the decoder one image at a time at inference, so an image's
    result never depends on the rest of its batch). ``n >= K`` keeps every class, in order.
    """
    k = scores.shape[1]
    if n < 1:
        raise ValueError(f"top_n must be at least 1, got {n}")
    if n >= k:
        return torch.arange(k, device=scores.device)
    best = scores.topk(n, dim=1).indices
    keep = torch.zeros(k, dtype=torch.bool, device=scores.device)
    keep[best.flatten()] = True
    return keep.nonzero().flatten()


def _take_classes(maps: torch.Tensor, keep: torch.Tensor, batch: int) -> torch.Tensor:
    """Keep classes ``keep`` of batch-major class maps (B·K, ...) -> (B·K'', ...)."""
    return maps.view(batch, -1, *maps.shape[1:])[:, keep].flatten(0, 1)


class LocalCostUpsampler(nn.Sequential):
    """The LCS embedding brought to the next decoder stage (official ``corr_local_decoder_projection``):
    ConvTranspose ×2 (C_in → C_out), then CAT-Seg's double conv ((conv3×3 → GroupNorm → ReLU) × 2).
    The official module ends with one more ReLU, a no-op after the double conv's own."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _group_norm(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _group_norm(out_channels),
            nn.ReLU(),
        )


class FGASegHead(CATSegHead):
    """CAT-Seg's head with FGAseg's additions, placed through :class:`CATSegHead`'s stages.

    * :meth:`forward`: the P2Tformer turns the text into per-image text' first; every later stage
      (cosine cost, class selection, LCS, text guidance) uses text', and the T2P alignment map is
      computed from it (:meth:`alignment`, training only). ``state.extras["text"]`` holds text'.
    * :meth:`embed`: CAT-Seg's conv 7×7 embedding of the cosine cost (GCS) fused with the LCS
      embedding (``fusion``); the LCS embedding stays in ``state.extras["local"]``.
    * :meth:`decode_stage`: before stage i, the LCS embedding (upsampled ×2^i, one
      :class:`LocalCostUpsampler` per stage after the first) is fused into the class maps again.
    * ``fast=True``: conv 3×3 auxiliary heads score the classes after each fusion (before the
      aggregator, and before each decoder stage); their logits, over all K classes, are collected in
      ``state.extras["aux"]`` for the auxiliary losses. At inference with ``top_n`` set, each of those
      points keeps only the classes among the ``top_n`` best of some pixel (:func:`top_n_classes`);
      the others get CAT-Seg's logit for unselected classes. ``top_n >= K`` changes nothing.

    Args:
        clip_dim, clip_width: as :class:`CATSegHead`; the other CAT-Seg sizes are keywords.
        fusion: ``"cat"`` (headline) or ``"add"`` (:data:`FUSIONS`).
        lcs: ``"full"`` (official code) or ``"depthwise"`` (:data:`LOCAL_COST_MODES`); ``lcs_kernel``
            its kernel size, ``kernel_norm`` its softmax kernel normalisation.
        p2t_layers, p2t_heads: P2Tformer depth (1) and heads (8).
        fast: add the auxiliary heads; ``top_n``: classes kept per pixel at inference (``None``: all).
    """

    def __init__(
        self,
        clip_dim: int,
        clip_width: int,
        *,
        fusion: str = "cat",
        lcs: str = "full",
        lcs_kernel: int = 3,
        kernel_norm: bool = True,
        p2t_layers: int = 1,
        p2t_heads: int = 8,
        fast: bool = False,
        top_n: int | None = None,
        **catseg_sizes: Any,
    ) -> None:
        super().__init__(clip_dim, clip_width, **catseg_sizes)
        if self.prompt_channels != 1:
            raise ValueError(
                f"FGAseg refines one text embedding per class (prompt_channels=1), got {self.prompt_channels}"
            )
        if top_n is not None and top_n < 1:
            raise ValueError(f"top_n must be at least 1 (or None for all classes), got {top_n}")
        hidden = self.cost_embed.out_channels
        stage_in = [stage.up.in_channels for stage in self.decoder]  # hidden, then decoder_dims[:-1]
        local = [hidden >> i for i in range(self.num_stages)]  # the LCS embedding halves per stage
        if local[-1] << (self.num_stages - 1) != hidden or local[-1] == 0:
            raise ValueError(f"hidden_dim {hidden} must halve evenly over {self.num_stages} decoder stages")
        self.p2t = P2Tformer(clip_dim, p2t_heads, p2t_layers)
        self.t2p = T2PProjector(clip_dim, clip_dim)
        self.local_cost = LocalCost(clip_dim, clip_dim, hidden, lcs_kernel, lcs, kernel_norm)
        self.cost_fusion = build_fusion(fusion, hidden, hidden, hidden)
        self.local_up = nn.ModuleList(LocalCostUpsampler(a, b) for a, b in zip(local[:-1], local[1:]))
        self.stage_fusion = nn.ModuleList(build_fusion(fusion, c, lc, c) for c, lc in zip(stage_in, local))
        self.aux_heads = (
            nn.ModuleList(nn.Conv2d(c, 1, kernel_size=3, padding=1) for c in (hidden, *stage_in)) if fast else None
        )
        self.top_n = top_n

    @property
    def prunes(self) -> bool:
        """Whether this forward pass drops classes (fast decoder, ``top_n`` set, evaluation mode)."""
        return self.aux_heads is not None and self.top_n is not None and not self.training

    # -- FGAseg's stages ------------------------------------------------------------------------------------------
    def alignment(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """T2P alignment logits (B, K, 4h, 4w) of text' (B, K, C) on the dense features (B, C, h, w)."""
        return self.t2p(image, text)

    def embed(self, state: CostState) -> torch.Tensor:
        """GCS embedding fused with the LCS embedding: (B, hidden, K', h, w)."""
        x = super().embed(state)
        local = self.local_cost.embed(self.local_cost(state.image, state.text[:, :, 0]))
        x = self.cost_fusion(x, local)
        state.extras["local"] = self.to_class_maps(local)
        state.extras["aux"] = []
        if self.aux_heads is not None:
            keep = self._auxiliary(0, self.to_class_maps(x), state)
            if keep is not None:
                x = x[:, :, keep]
        return x

    def decode_stage(self, i: int, maps: torch.Tensor, state: CostState) -> torch.Tensor:
        """LCS fused into the class maps, then CAT-Seg's stage ``i``."""
        if i > 0:
            state.extras["local"] = self.local_up[i - 1](state.extras["local"])
        maps = self.stage_fusion[i](maps, state.extras["local"])
        if self.aux_heads is not None:
            keep = self._auxiliary(i + 1, maps, state)
            if keep is not None:
                maps = _take_classes(maps, keep, state.batch)
        return super().decode_stage(i, maps, state)

    def _auxiliary(self, i: int, maps: torch.Tensor, state: CostState) -> torch.Tensor | None:
        """Auxiliary head ``i`` on the class maps (B·K', C, h, w): its logits, restored to all K classes,
        go to ``state.extras["aux"]``; when pruning, returns the indices (among the K') of the classes
        kept, after restricting the state to them (``None``: all kept)."""
        scores = class_scores(self.aux_heads[i], maps, state.batch)
        state.extras["aux"].append(self.restore_classes(scores, state))
        if not self.prunes:
            return None
        keep = top_n_classes(scores, self.top_n)
        if keep.numel() == state.classes:
            return None
        current = state.selected
        if current is None:
            current = torch.arange(state.classes, device=keep.device).expand(state.batch, -1)
        state.extras["local"] = _take_classes(state.extras["local"], keep, state.batch)
        state.cost, state.text, state.selected = state.cost[:, :, keep], state.text[:, keep], current[:, keep]
        if state.text_guidance is not None:
            state.text_guidance = state.text_guidance[:, keep]
        return keep

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        guidance: Sequence[torch.Tensor],
        *,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, CostState]:
        """As :meth:`CATSegHead.forward`, on the P2Tformer's per-image text' (Eqs. 5-6)."""
        text = self.prepare_text(text, image.shape[0])
        refined = self.p2t(image, text[:, :, 0].to(image.dtype))
        logits, state = super().forward(image, refined[:, :, None], guidance, return_state=True)
        state.extras["text"] = refined
        return (logits, state) if return_state else logits
