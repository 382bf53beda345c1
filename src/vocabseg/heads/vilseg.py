"""ViL-Seg's heads and losses (Liu et al., ECCV 2022, arXiv 2207.08455): L = L_vision + L_cross + L_cluster (Eq. 1).

* **L_vision** (Eq. 2): a projection Φ_a of the global embedding, cross-entropy between the global view's
  and the local crops' softmax outputs. The paper's Φ_a is one linear layer + softmax (``head="linear"``);
  the rest is DINO's recipe (Caron et al., ICCV 2021, ``main_dino.py``): an EMA teacher sees the global
  view, the student the local crops, the teacher's outputs are centred (momentum 0.9) and sharpened
  (τ_t 0.04, τ_s 0.1), and ``head="dino"`` is DINO's 3-layer MLP with an L2-normalised 256-d bottleneck
  and a weight-normalised last layer whose norm is fixed to 1.
* **L_cross** (Eqs. 3-4): CLIP's InfoNCE between global image embeddings and caption embeddings; symmetric
  with a learnable logit scale as CLIP and open_clip train it. Under DDP the negatives are every
  process's, gathered *with* gradients (open_clip ``gather_features(gather_with_grad=True)``).
* **L_cluster** (Eqs. 5-8): IIC (Ji et al., ICCV 2019) on the clustering head's per-pixel softmax for an
  image x and its transform g(x) (colour change + horizontal flip), the flip undone on the outputs.

Every loss that is not a plain mean over samples (InfoNCE's negatives, IIC's joint distribution, DINO's
centre) is computed over the whole batch across DDP processes, so two processes with B images each
give exactly the loss and, after DDP's gradient average, the gradients of one process with 2B images.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._names import lookup

__all__ = [
    "PROJECTION_HEADS",
    "ClusterHead",
    "DINOHead",
    "LinearHead",
    "build_projection_head",
    "contrastive_loss",
    "dino_loss",
    "gather_with_grad",
    "iic_joint",
    "iic_loss",
    "photometric_flip",
    "sum_with_grad",
    "unflip",
    "update_center",
]

#: IIC's clamp for log stability (``IID_losses.py``: ``EPS = sys.float_info.epsilon``)
IIC_EPS = sys.float_info.epsilon
#: CLIP's initial temperature τ = 0.07 and its cap on the logit scale 1/τ
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -- projection heads Φ_a -------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """DINO's projection head: Linear-GELU-Linear-GELU-Linear to the bottleneck, L2 normalisation, then a
    weight-normalised Linear(bottleneck → out) with its norm fixed to 1 (``norm_last_layer=True``), i.e.
    every output is a cosine with a unit prototype. MLP weights: truncated normal, std 0.02, zero bias."""

    def __init__(self, in_dim: int, out_dim: int = 2048, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)  # the direction v of weight norm, g = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


class LinearHead(nn.Module):
    """The paper's Φ_a: one linear layer (the softmax is applied in :func:`dino_loss`, with temperature)."""

    def __init__(self, in_dim: int, out_dim: int = 2048, hidden: int = 0, bottleneck: int = 0):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


#: ``head=`` name -> projection head class, built as ``cls(in_dim, out_dim, hidden, bottleneck)``
PROJECTION_HEADS: dict[str, type[nn.Module]] = {"dino": DINOHead, "linear": LinearHead}


def build_projection_head(name: str, in_dim: int, out_dim: int, hidden: int, bottleneck: int) -> nn.Module:
    return lookup(PROJECTION_HEADS, name, "projection head")(in_dim, out_dim, hidden, bottleneck)


# -- L_vision: DINO's local-to-global distillation ------------------------------------------------------
def dino_loss(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """Eq. 2 as DINO computes it: mean over samples and local crops of
    ``-Σ_d softmax((t − c)/τ_t)_d · log softmax(s/τ_s)_d``.

    Args:
        student: (B, V, D) projections of the V local crops of each image.
        teacher: (B, D) the teacher's projections of the global view (no gradient flows into them).
        center: (1, D) or (D,) the running centre of the teacher's outputs.
    """
    targets = F.softmax((teacher.detach().float() - center.float()) / teacher_temp, dim=-1)
    log_probs = F.log_softmax(student.float() / student_temp, dim=-1)
    return -(targets[:, None] * log_probs).sum(-1).mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
    """``c ← m·c + (1 − m)·mean(teacher)`` in place, the mean over the whole batch of every process
    (DINO's ``update_center`` all-reduces the batch sum and divides by the global batch)."""
    total = teacher.detach().float().sum(0, keepdim=True)
    count = torch.tensor(float(teacher.shape[0]), device=teacher.device)
    if _distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    center.mul_(momentum).add_((total / count).to(center.dtype), alpha=1 - momentum)


# -- L_cross: CLIP's InfoNCE -----------------------------------------------------------------------------
def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``x`` in rank order, concatenated, with gradients flowing back to each
    process's own rows (``torch.distributed.nn.functional.all_gather``, as open_clip gathers features);
    ``x`` itself outside DDP."""
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Eqs. 3-4 for images → captions, plus captions → images as CLIP trains):
    ``½[CE(s·cos(I, T), diag) + CE(s·cos(T, I), diag)]`` over the global batch, s = exp(logit_scale)
    capped at 100.

    Each process computes the loss of the whole gathered batch; the gathers' backward sums the
    gradient of every process's copy into the rows it owns, so DDP's average of the processes'
    gradients is the gradient of that one loss.
    """
    image = gather_with_grad(F.normalize(image.float(), dim=-1))
    text = gather_with_grad(F.normalize(text.float(), dim=-1))
    scale = logit_scale.float().exp().clamp(max=LOGIT_SCALE_MAX)
    logits = scale * image @ text.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# -- L_cluster: IIC ----------------------------------------------------------------------------------------
class ClusterHead(nn.Module):
    """Φ_c: a 1×1 convolution to C channels and a softmax over them (Sec. 3.3); with ``overcluster``
    IIC's auxiliary head of 3C clusters beside it, trained with the same loss, unused at inference."""

    def __init__(self, in_dim: int, clusters: int = 25, overcluster: bool = False):
        super().__init__()
        self.main = nn.Conv2d(in_dim, clusters, 1)
        self.over = nn.Conv2d(in_dim, 3 * clusters, 1) if overcluster else None

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) features -> (B, C, h, w) cluster probabilities."""
        return F.softmax(self.main(feats).float(), dim=1)

    def all_heads(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """The probabilities of every head (main first) for the clustering loss."""
        heads = [self.main] + ([self.over] if self.over is not None else [])
        return [F.softmax(h(feats).float(), dim=1) for h in heads]


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over DDP processes, differentiable (its backward sums the gradients the same
    way); ``x`` itself outside DDP."""
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


def iic_joint(p1: torch.Tensor, p2: torch.Tensor, window: int = 0) -> torch.Tensor:
    """The (C, C) joint distribution of Eq. 7 as IIC's ``IID_segmentation_loss`` computes it: the sum over
    images and pixels (and displacements within ±``window``) of the outer products p1 ⊗ p2, summed over
    DDP processes, divided by its total (a constant: each outer product sums to one), symmetrised.

    Args:
        p1, p2: (B, C, h, w) cluster probabilities of x and of g(x) brought back into x's frame.
    """
    if p1.shape != p2.shape or p1.dim() != 4:
        raise ValueError(f"expected two (B, C, h, w) probability maps of one shape, got {p1.shape} and {p2.shape}")
    dtype = torch.promote_types(p1.dtype, torch.float32)  # at least single precision, under autocast too
    x1 = p1.to(dtype).permute(1, 0, 2, 3).contiguous()  # (C, B, h, w): images are conv2d's input channels
    x2 = p2.to(dtype).permute(1, 0, 2, 3).contiguous()
    with torch.autocast(device_type=p1.device.type, enabled=False):  # no half-precision products
        joint = F.conv2d(x1, weight=x2, padding=window).sum(dim=(2, 3))  # (C, C)
    joint = sum_with_grad(joint)
    joint = joint / joint.sum().detach()
    return (joint + joint.t()) / 2


def iic_loss(p1: torch.Tensor, p2: torch.Tensor, lamb: float = 1.0, window: int = 0) -> torch.Tensor:
    """``−I(J) = −Σ_cc' J_cc' (ln J_cc' − λ ln J_c − λ ln J_c')`` (Eq. 8, IIC with λ = 1), the marginals
    taken before J, J_c and J_c' are clamped at EPS for the logarithms (clamped entries get no gradient)."""
    joint = iic_joint(p1, p2, window)
    rows = joint.sum(dim=1, keepdim=True)  # (C, 1)
    cols = joint.sum(dim=0, keepdim=True)  # (1, C)

    def clamp(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t < IIC_EPS, torch.full_like(t, IIC_EPS), t)

    joint, rows, cols = clamp(joint), clamp(rows), clamp(cols)
    return -(joint * (joint.log() - lamb * rows.log() - lamb * cols.log())).sum()


#: g's colour change, in CLIP-normalised units: per image and channel x·a + b, a ∈ [1 − s, 1 + s], b ∈ [−t, t]
JITTER_SCALE = 0.4
JITTER_SHIFT = 0.4


def photometric_flip(
    images: torch.Tensor, flip_prob: float = 0.5, rand: Callable[..., torch.Tensor] = torch.rand
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clustering transform g of Sec. 3.3: a random multiplicative and additive colour change per
    image and channel (in normalised space, so an affine colour change of the pixels too) and a random
    horizontal flip. Returns g(x) and the (B,) boolean flip flags, to undo the flip on the outputs."""
    b, c = images.shape[:2]
    opts = dict(device=images.device, dtype=images.dtype)
    scale = 1 + JITTER_SCALE * (2 * rand(b, c, 1, 1, **opts) - 1)
    shift = JITTER_SHIFT * (2 * rand(b, c, 1, 1, **opts) - 1)
    flipped = rand(b, device=images.device) < flip_prob
    out = images * scale + shift
    return torch.where(flipped[:, None, None, None], out.flip(-1), out), flipped


def unflip(maps: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """g⁻¹ on (B, C, h, w) outputs: flip back the images :func:`photometric_flip` flipped."""
    return torch.where(flipped[:, None, None, None], maps.flip(-1), maps)
