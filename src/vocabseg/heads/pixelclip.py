"""PixelCLIP's training pieces (Shin et al., NeurIPS 2024, arXiv 2409.19846): learnable class prompts,
online clustering of unlabeled masks, and the convolutional head that decodes cost maps.

PixelCLIP fine-tunes CLIP's image encoder with masks that carry no labels (SA-1B, or k-means of DINO
features). Its loss, as the official code computes it:

1. k learnable class names, each L token embeddings written into "A photo of a {} in the scene" and
   passed through the frozen text tower, give k cluster embeddings T (:class:`ClassPrompts`);
2. every mask is average-pooled on the momentum teacher's dense features (:func:`mask_pool`), scored
   against T by ``eps * cos`` and balanced over the clusters with Sinkhorn-Knopp, SwAV style, across
   all GPUs (:func:`sinkhorn`); each mask goes to its best cluster (:func:`hard_assignment`);
3. the masks of one cluster merge into one binary target per cluster (:func:`merge_targets`);
4. the student's cosine map with each cluster goes through :class:`ConvHead` (one map at a time), and
   binary cross-entropy is taken over the pixels some mask covers (:func:`covered_bce`).

Only the fine-tuned image encoder is kept for inference; prompts and head are training aids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..text.tower import encode_token_embeddings, token_embeddings

__all__ = [
    "ClassPrompts",
    "placeholder_template",
    "mask_pool",
    "sinkhorn",
    "hard_assignment",
    "merge_targets",
    "DoubleConv",
    "ConvHead",
    "covered_bce",
]

#: the official code draws the initial names from the vocabulary but its last 10 ids
_VOCAB_MARGIN = 10


def placeholder_template(tokenizer: Any, template: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, C) of ``template`` with its ``{}`` spelled as ``length`` placeholder words, and the
    (length,) positions of those words, where the learnable embeddings go.

    The placeholder is the literal word ``{}`` (the official code writes ``'{} ' * L`` into the template
    and finds its token id); its id is looked up with the tokenizer here instead of hard-coded.
    """
    if template.count("{}") != 1:
        raise ValueError(f"The prompt template must contain '{{}}' exactly once, got {template!r}.")
    if length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {length}.")
    word = tokenizer(["{}"])[0]
    word = word[word != 0]
    if word.numel() != 3:  # start, the word, end
        raise ValueError(f"The tokenizer splits '{{}}' into {word.numel() - 2} tokens; it must be one.")
    tokens = tokenizer([template.replace("{}", " ".join(["{}"] * length))])[:1].long()
    positions = (tokens[0] == word[1]).nonzero().flatten()
    if positions.numel() != length:
        raise ValueError(
            f"The {length} placeholder words in {template!r} do not tokenize as {length} separate '{{}}' tokens "
            "(the template's '{}' needs spaces around it)."
        )
    return tokens, positions


class ClassPrompts(nn.Module):
    """k learnable class names of L token embeddings each; :meth:`forward` encodes them into cluster
    embeddings T (k, D) through CLIP's (frozen) text tower, with gradients to the embeddings.

    Initialised as the official code does: ids drawn uniformly from the vocabulary but its last 10
    (``torch.randint`` after ``torch.manual_seed(seed)``), looked up in CLIP's token embedding.
    """

    def __init__(self, token_embedding: nn.Embedding, num_classes: int = 64, length: int = 4, seed: int = 0):
        super().__init__()
        if num_classes < 1 or length < 1:
            raise ValueError(f"num_classes and length must be >= 1, got {num_classes}, {length}")
        high = token_embedding.num_embeddings - _VOCAB_MARGIN
        ids = torch.randint(high, (num_classes, length), generator=torch.Generator().manual_seed(seed), device="cpu")
        with torch.no_grad():
            init = token_embedding(ids.to(token_embedding.weight.device)).float()
        self.embeddings = nn.Parameter(init)  # (k, L, width)

    @property
    def num_classes(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, clip: nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Unnormalised cluster embeddings (k, D) for the template ``tokens`` (1, C) with placeholder
        ``positions`` (L,) (see :func:`placeholder_template`)."""
        k = self.num_classes
        tokens = tokens.expand(k, -1)
        x = token_embeddings(clip, tokens[:1]).expand(k, -1, -1).clone()
        x[:, positions] = self.embeddings.to(x.dtype)
        return encode_token_embeddings(clip, tokens, x)


def mask_pool(
    features: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, min_pixels: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean feature of every mask: (N, C) for the N usable masks of the batch.

    Args:
        features: (B, C, R, R) dense features at the masks' resolution.
        masks: (B, M, R, R) bool masks; ``valid`` (B, M) says which are real (the rest is padding).
        min_pixels: masks with fewer pixels are dropped (official: masks of 1 pixel or fewer, lost in
            downsampling).

    Returns: pooled features (N, C), the image of each mask (N,), and the masks themselves (N, R, R),
    image by image in mask order. Computed per image (a float copy of a whole batch of up to 512 masks
    at 256² would need gigabytes), each mask's weights divided by its area first, as the official code.
    """
    keep = valid & (masks.flatten(2).sum(-1) >= min_pixels)
    pooled, owners, kept = [], [], []
    for i in range(masks.shape[0]):
        m = masks[i, keep[i]]
        if m.shape[0] == 0:
            continue
        weights = m.to(features.dtype)
        weights = weights / weights.sum(dim=(1, 2), keepdim=True)
        pooled.append(torch.einsum("chw,nhw->nc", features[i], weights))
        owners.append(torch.full((m.shape[0],), i, dtype=torch.long, device=masks.device))
        kept.append(m)
    if not pooled:
        r = masks.shape[-2:]
        return features.new_zeros(0, features.shape[1]), masks.new_zeros(0, dtype=torch.long), masks.new_zeros(0, *r)
    return torch.cat(pooled), torch.cat(owners), torch.cat(kept)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments (N, K) of N samples to K clusters (SwAV's ``distributed_sinkhorn``
    as PixelCLIP modifies it): Q starts as the softmax of the logits over clusters; then each round
    scales every cluster's total to 1/K and every sample's to 1/B, B the number of samples on all
    processes; finally columns are scaled back to sum to 1.

    The global total and the per-cluster sums are all-reduced when a process group is initialised,
    so N samples split over several processes get the assignments one process would give them all.
    A process with no samples (N = 0) still takes part in the all-reduces.
    """
    q = logits.softmax(dim=-1).T  # (K, N)
    k = q.shape[0]
    total = _all_reduce(q.sum())  # = B: every softmax column sums to 1
    q = q / total
    for _ in range(iterations):
        rows = _all_reduce(q.sum(dim=1, keepdim=True))
        q = q / rows
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / total
    return (q * total).T


def hard_assignment(assignments: torch.Tensor) -> torch.Tensor:
    """Each sample's cluster (N,): the argmax of its (N, K) soft assignment."""
    return assignments.argmax(dim=-1)


def merge_targets(
    masks: torch.Tensor, owners: torch.Tensor, clusters: torch.Tensor, batch: int, num_classes: int
) -> torch.Tensor:
    """Multi-label targets (B, K, R, R), bool: pixel p of image b is positive for cluster c when some
    mask of image b assigned to c covers p (the union of the cluster's masks).

    Args: ``masks`` (N, R, R), each mask's image ``owners`` (N,) and cluster ``clusters`` (N,).
    """
    r = masks.shape[-2:]
    targets = torch.zeros(batch, num_classes, *r, dtype=torch.bool, device=masks.device)
    for i in range(batch):
        mine = owners == i
        if not bool(mine.any()):
            continue
        counts = torch.zeros(num_classes, r[0] * r[1], device=masks.device)
        counts.index_add_(0, clusters[mine], masks[mine].flatten(1).float())
        targets[i] = (counts > 0).view(num_classes, *r)
    return targets


class DoubleConv(nn.Module):
    """(conv3×3 → GroupNorm (16 channels a group) → ReLU) × 2, biases off (the norm removes them)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels % 16:
            raise ValueError(f"DoubleConv needs a multiple of 16 channels, got {out_channels}")
        groups = out_channels // 16
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class ConvHead(nn.Module):
    """Decodes one cosine map at a time: (N, 1, h, w) -> (N, 1, 4h, 4w) mask logits.

    conv3×3 1→64; ConvTranspose ×2 → 64 + :class:`DoubleConv`; ConvTranspose ×2 → 32 + DoubleConv;
    conv3×3 → 1. Module names follow the official ``ConvHead`` so released weights load by name.
    """

    def __init__(self, channels: Sequence[int] = (64, 64, 32)):
        super().__init__()
        c0, c1, c2 = channels
        self.conv0 = nn.Conv2d(1, c0, kernel_size=3, padding=1)
        self.up1 = nn.ConvTranspose2d(c0, c1, kernel_size=2, stride=2)
        self.conv1 = DoubleConv(c1, c1)
        self.up2 = nn.ConvTranspose2d(c1, c2, kernel_size=2, stride=2)
        self.conv2 = DoubleConv(c2, c2)
        self.proj = nn.Conv2d(c2, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        x = self.conv1(self.up1(x))
        x = self.conv2(self.up2(x))
        return self.proj(x)


def covered_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over every cluster, at the pixels some mask covers (any target set).

    ``logits`` and ``targets`` (B, K, R, R). The mean runs over (covered pixels × K), as the official
    loss; with no covered pixel at all the loss is a zero that still reaches every parameter.
    """
    covered = targets.any(dim=1)  # (B, R, R)
    if not bool(covered.any()):
        return logits.sum() * 0.0
    pix_logits = logits.permute(0, 2, 3, 1)[covered]  # (P, K)
    pix_targets = targets.permute(0, 2, 3, 1)[covered].to(pix_logits.dtype)
    return F.binary_cross_entropy_with_logits(pix_logits, pix_targets)
