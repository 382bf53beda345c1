"""LPOSS / LPOSS+: label propagation over patches and pixels (Stojnic et al., CVPR 2025; MIT).

A refinement that sits on top of any method's scores. The initial per-patch class scores Y of the
*whole* image (every sliding window's patches in one graph) are propagated over a kNN graph of
vision-foundation-model (VFM) patch features by solving

    (I - α Ŵ) Z = Y,          Ŵ = D^-1/2 W D^-1/2,  W without self-loops, D its row sums

with a conjugate-gradient solve per class (torch sparse CSR products: no faiss, cupy or scipy).
LPOSS+ then bilinearly upsamples Z to the image and runs the same propagation once more over a
graph of pixels.

The graphs, as the official code builds them:

* **patches** (``knn_graph``): each patch i is joined to its ``k`` most cosine-similar patches
  (itself included; self-loops are dropped when normalising) with weight
  ``max(cos(f_i, f_j), 0)^γ · exp(-σ · d_ij^p)``, where d_ij is the Euclidean distance between the
  two patch centres in *pixels of the network input* (not normalised coordinates: the spatial term
  weakens as the input grows; σ = 0.01 halves the weight at 69 px with p = 1). W is symmetrised as
  ``W + Wᵀ`` (an edge found from both ends counts twice).
* **pixels** (``pixel_graph``): each pixel is joined to every other pixel of the ``window x window``
  square around it (13 x 13: the official ``r = 13`` used as ``r // 2 = 6`` pixels each way) with
  weight ``exp(-||c_i - c_j|| / τ)``, c the CIE-Lab colour divided by (100, 128, 128) and ||·|| the
  Euclidean norm (not squared).

Outputs are scaled by (1 - α) (Zhou et al.'s closed form of label propagation), so they stay on the
scale of the input scores and a logit scale, softmax or probability threshold downstream means what
it meant before; the arg-max is the official one. The official code stops CG after 10 iterations
(relative tolerance 1e-6): those are the defaults, so results are a truncated solve by design;
``max_iter`` and ``tol`` make it exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingsError
from ..models.vfm import last_block_qkv

__all__ = [
    "LPOSS",
    "conjugate_gradient",
    "knn_graph",
    "normalized_adjacency",
    "PixelGraph",
    "pixel_graph",
    "propagate",
    "rgb_to_lab",
    "window_patch_positions",
    "last_block_values",
]

#: Lab channels are divided by these so each lies in about [0, 1] (L in [0, 100], a and b in ±128).
LAB_SCALE = (100.0, 128.0, 128.0)
#: Pixel-graph weights exp(-x) with x above this (below 2e-35) are stored as 0: float32 denormals
#: would slow every later product by orders of magnitude, and such weights change nothing.
NEGLIGIBLE_EXPONENT = 80.0
#: Rows of the similarity matrix computed at once when finding neighbours (bounds memory to
#: ``KNN_CHUNK x N`` floats).
KNN_CHUNK = 1024


@contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Without torch's once-per-process notice that CSR support is in beta (no news to a user)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def _index_dtype(n: int, entries: int) -> torch.dtype:
    """32-bit CSR indices where they fit (half the memory of int64 ones)."""
    return torch.int32 if max(n, entries) < 2**31 - 1 else torch.int64


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """An (n, n) CSR matrix; see :func:`_index_dtype`."""
    index_dtype = _index_dtype(n, col.numel())
    with _quiet_sparse():
        return torch.sparse_csr_tensor(
            crow.to(index_dtype), col.to(index_dtype), values, (n, n), check_invariants=False
        )


@dataclass(frozen=True)
class NormalizedGraph:
    """Ŵ = D^-1/2 W D^-1/2 of a symmetric graph W without self-loops (D: its row sums; a row that
    sums to 0 keeps D = 1, as in the official code).

    Kept as W and D^-1/2, applied as ``d ⊙ (W (d ⊙ X))``: scaling the stored weights instead would
    cost another copy of them (0.23 GB for LPOSS+ on a 512 x 683 image).
    """

    adjacency: torch.Tensor  # CSR (N, N)
    inv_sqrt_degree: torch.Tensor  # (N,)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.inv_sqrt_degree[:, None]
        return scale * (self.adjacency @ (scale * x))

    def to_dense(self) -> torch.Tensor:
        return self.inv_sqrt_degree[:, None] * self.adjacency.to_dense() * self.inv_sqrt_degree[None, :]


def normalized_adjacency(adjacency: torch.Tensor) -> NormalizedGraph:
    """The symmetric normalisation of ``adjacency`` (see :class:`NormalizedGraph`)."""
    ones = torch.ones((adjacency.shape[0], 1), dtype=adjacency.dtype, device=adjacency.device)
    degree = (adjacency @ ones).squeeze(1)
    return NormalizedGraph(adjacency, torch.where(degree > 0, degree, torch.ones_like(degree)).rsqrt())


def knn_graph(
    features: torch.Tensor,
    positions: torch.Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    distance_power: float = 1.0,
) -> torch.Tensor:
    """The symmetric patch graph W (N, N) as a CSR matrix, self-loops removed (see the module doc).

    Args:
        features: (N, C) VFM patch features (normalised here).
        positions: (N, 2) patch centres (row, column) in pixels of the network input.
        k: neighbours per patch, the patch itself included; clipped to N.
    """
    n = features.shape[0]
    k = min(k, n)
    feats = F.normalize(features, dim=1)
    positions = positions.to(feats)
    rows, cols, weights = [], [], []
    for start in range(0, n, KNN_CHUNK):
        stop = min(start + KNN_CHUNK, n)
        sims, idx = (feats[start:stop] @ feats.T).topk(k, dim=1)
        dist = (positions[start:stop, None, :] - positions[idx]).norm(dim=-1)
        weights.append((sims.clamp(min=0) ** gamma * torch.exp(-sigma * dist**distance_power)).flatten())
        rows.append(torch.arange(start, stop, device=feats.device).repeat_interleave(k))
        cols.append(idx.flatten())
    r, c, w = torch.cat(rows), torch.cat(cols), torch.cat(weights)
    keep = r != c
    index = torch.stack([torch.cat([r[keep], c[keep]]), torch.cat([c[keep], r[keep]])])
    coo = torch.sparse_coo_tensor(index, torch.cat([w[keep], w[keep]]), (n, n), check_invariants=False)
    coo = coo.coalesce()  # sums the entries found from both ends: W + Wᵀ
    crow = F.pad(coo.indices()[0].bincount(minlength=n).cumsum(0), (1, 0))  # coalesced: sorted by row
    return _csr(crow, coo.indices()[1], coo.values(), n)


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """CIE-Lab (D65) of an sRGB image (3, H, W) in [0, 1]: L in [0, 100], a and b in about ±128."""
    linear = torch.where(image > 0.04045, ((image + 0.055) / 1.055) ** 2.4, image / 12.92)
    to_xyz = image.new_tensor(
        [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
    )
    white = image.new_tensor([0.95047, 1.0, 1.08883])
    xyz = torch.einsum("ij,jhw->ihw", to_xyz, linear) / white[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1 / 3), 7.787 * xyz + 4 / 29)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


@dataclass(frozen=True)
class PixelGraph:
    """LPOSS+'s colour graph over the image padded by ``window // 2`` pixels on every side.

    The padding pixels are isolated nodes (no edges): with them every image pixel has the same
    ``window² - 1`` neighbour slots in strictly increasing column order, so the matrix is built by
    broadcasting alone, without compacting out the slots that fall outside the image (their weight
    is 0). ``pixels`` holds the node of each image pixel, row-major.
    """

    adjacency: torch.Tensor  # CSR (n, n), n = (H + 2r)(W + 2r)
    pixels: torch.Tensor  # (H*W,) int64


def pixel_graph(image: torch.Tensor, *, tau: float = 0.01, window: int = 13) -> PixelGraph:
    """The colour graph of LPOSS+ (see the module doc and :class:`PixelGraph`).

    Memory: ``H·W·(window² - 1)`` entries of 8 bytes (a 32-bit column index + a float32 weight):
    0.47 GB for a 512 x 683 image with the 13 x 13 window.
    """
    _, h, w = image.shape
    r = window // 2
    hp, wp = h + 2 * r, w + 2 * r
    lab = rgb_to_lab(image.float()) / image.new_tensor(LAB_SCALE, dtype=torch.float32)[:, None, None]
    lab_padded = F.pad(lab, (r, r, r, r))
    inside = F.pad(torch.ones((h, w), dtype=torch.bool, device=image.device), (r, r, r, r))
    # raster order of the offsets = increasing column index within each row, as CSR wants
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    weights = torch.empty((len(offsets), h, w), dtype=torch.float32, device=image.device)
    for i, (dy, dx) in enumerate(offsets):
        rows, cols = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
        exponent = ((lab_padded[:, rows, cols] - lab) ** 2).sum(0).sqrt_().div_(tau)
        torch.exp(exponent.clamp(max=NEGLIGIBLE_EXPONENT).neg_(), out=weights[i])
        weights[i].masked_fill_((exponent > NEGLIGIBLE_EXPONENT) | ~inside[rows, cols], 0.0)
    weights = weights.permute(1, 2, 0).reshape(-1)  # (pixel, offset) order: one CSR row per pixel
    nodes = torch.arange(hp * wp, device=image.device).reshape(hp, wp)[r : r + h, r : r + w].reshape(-1)
    steps = torch.tensor([dy * wp + dx for dy, dx in offsets], device=image.device)
    index_dtype = _index_dtype(hp * wp, h * w * len(offsets))
    columns = (nodes.to(index_dtype)[:, None] + steps.to(index_dtype)).reshape(-1)
    crow = F.pad((inside.reshape(-1).to(torch.int64) * len(offsets)).cumsum(0), (1, 0))
    return PixelGraph(_csr(crow, columns, weights, hp * wp), nodes)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, tol: float = 1e-6, max_iter: int = 10
) -> torch.Tensor:
    """Solve A x = b for every column of ``b`` (N, K) with A symmetric positive definite, given as
    ``matvec(X) = A @ X``; x₀ = 0.

    The columns are independent solves run side by side (each has its own step sizes and stops once
    ``||r|| <= tol · ||b||``, the criterion of scipy's and cupy's ``cg``), so the result equals K
    separate solves. ``max_iter`` bounds the iterations of every column.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    target = tol * b.norm(dim=0)
    active = b.norm(dim=0) > target
    rho = (r * r).sum(0)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q = matvec(p)
        pq = (p * q).sum(0)
        alpha = torch.where(active, rho / torch.where(pq == 0, torch.ones_like(pq), pq), torch.zeros_like(pq))
        x += alpha * p
        r -= alpha * q
        active &= r.norm(dim=0) > target
        rho_next = (r * r).sum(0)
        beta = rho_next / torch.where(rho == 0, torch.ones_like(rho), rho)
        p = torch.where(active, r + beta * p, p)  # finished columns keep p: nothing grows unchecked
        rho = rho_next
    return x


def propagate(
    adjacency: torch.Tensor, scores: torch.Tensor, *, alpha: float, tol: float, max_iter: int, class_chunk: int = 0
) -> torch.Tensor:
    """(1 - α) (I - α Ŵ)^-1 Y for the symmetric graph ``adjacency`` (CSR, no self-loops) and scores
    Y (N, K), by :func:`conjugate_gradient`; ``class_chunk`` > 0 solves that many classes at a time
    (the solve keeps about eight (N, K) arrays alive: chunks bound them on large images; the classes
    are independent solves, so the result is the same)."""
    normalized = normalized_adjacency(adjacency.to(scores.dtype))

    def matvec(x: torch.Tensor) -> torch.Tensor:
        return x - alpha * (normalized @ x)

    step = class_chunk if class_chunk > 0 else max(scores.shape[1], 1)
    parts = [
        conjugate_gradient(matvec, scores[:, i : i + step].contiguous(), tol=tol, max_iter=max_iter)
        for i in range(0, scores.shape[1], step)
    ]
    out = torch.cat(parts, dim=1) if parts else scores.clone()
    return (1 - alpha) * out


def window_patch_positions(box: tuple[int, int, int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(gh*gw, 2) centres (row, column), in image pixels, of a window's feature grid, row-major.

    ``box`` is the window (y1, y2, x1, x2) as :func:`~vocabseg.inference.sliding.window_boxes` gives
    it; the grid's cells tile the window evenly (patch centres when the window is a multiple of the
    patch, as in the official code's ``y1 + patch // 2 + i · patch``).
    """
    y1, y2, x1, x2 = box
    gh, gw = grid
    rows = y1 + (torch.arange(gh, dtype=torch.float32) + 0.5) * (y2 - y1) / gh
    cols = x1 + (torch.arange(gw, dtype=torch.float32) + 0.5) * (x2 - x1) / gw
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def last_block_values(vfm: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The value vectors of the last attention block of a timm ViT VFM, (B, C, h, w): the DINO
    features the official LPOSS builds its graph on (``enc_type_feats: v``)."""
    return last_block_qkv(vfm, images)[2]


@dataclass(frozen=True)
class LPOSS:
    """LPOSS (``pixel=False``) or LPOSS+ (``pixel=True``) with the paper's defaults.

    Attributes:
        k, gamma, sigma, distance_power: the patch graph (:func:`knn_graph`).
        alpha: the propagation weight α of both stages.
        tol, max_iter: the CG stopping rule of both stages (the official 1e-6 and 10 iterations).
        pixel: run the pixel-level stage (LPOSS+).
        tau, window: the pixel graph (:func:`pixel_graph`).
        class_chunk: classes solved at a time in the pixel stage (0: all); memory only.
    """

    k: int = 400
    gamma: float = 3.0
    sigma: float = 0.01
    distance_power: float = 1.0
    alpha: float = 0.95
    tol: float = 1e-6
    max_iter: int = 10
    pixel: bool = False
    tau: float = 0.01
    window: int = 13
    class_chunk: int = 32

    #: what the Segmenter must hand over besides the method's scores (see :meth:`refine_windows`)
    needs_vfm = True

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r} ({rule})"
            for name, ok, rule in [
                ("k", self.k >= 1, "at least 1"),
                ("gamma", self.gamma > 0, "above 0"),
                ("sigma", self.sigma >= 0, "0 or more"),
                ("distance_power", self.distance_power > 0, "above 0"),
                ("alpha", 0 < self.alpha < 1, "between 0 and 1, exclusive"),
                ("tol", self.tol >= 0, "0 or more"),
                ("max_iter", self.max_iter >= 1, "at least 1"),
                ("tau", self.tau > 0, "above 0"),
                ("window", self.window >= 3 and self.window % 2 == 1, "an odd number, at least 3"),
                ("class_chunk", self.class_chunk >= 0, "0 (all classes) or more"),
            ]
            if not ok
        ]
        if problems:
            raise SettingsError(f"Invalid LPOSS setting: {'; '.join(problems)}.")

    @torch.no_grad()
    def refine_patches(self, scores: torch.Tensor, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Propagate per-patch scores (N, K) over the kNN graph of ``features`` (N, C) at
        ``positions`` (N, 2) (see :func:`knn_graph`); returns (N, K)."""
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        graph = knn_graph(
            features.to(dtype),
            positions.to(dtype),
            k=self.k,
            gamma=self.gamma,
            sigma=self.sigma,
            distance_power=self.distance_power,
        )
        return propagate(graph, scores.to(dtype), alpha=self.alpha, tol=self.tol, max_iter=self.max_iter)

    @torch.no_grad()
    def refine_pixels(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """LPOSS+'s second stage: propagate per-pixel scores (K, H, W) over the colour graph of
        ``image`` (3, H, W), RGB in [0, 1]; returns (K, H, W)."""
        k, h, w = scores.shape
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        graph = pixel_graph(image.to(scores.device), tau=self.tau, window=self.window)
        flat = scores.new_zeros((graph.adjacency.shape[0], k), dtype=dtype)
        flat[graph.pixels] = scores.to(dtype).reshape(k, h * w).T  # padding nodes: 0, and they stay 0
        out = propagate(
            graph.adjacency, flat, alpha=self.alpha, tol=self.tol, max_iter=self.max_iter, class_chunk=self.class_chunk
        )
        return out[graph.pixels].T.reshape(k, h, w)

    @torch.no_grad()
    def refine_windows(
        self,
        image: torch.Tensor,
        boxes: Sequence[tuple[int, int, int, int]],
        window_scores: Sequence[torch.Tensor],
        window_features: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Refine a whole image from its sliding windows: the entry point for the Segmenter.

        Args:
            image: (3, H, W) the network input (resized image), RGB in [0, 1]; LPOSS+ reads its colours.
            boxes: each window's (y1, y2, x1, x2) in ``image``; one box covering the image for
                whole-image inference.
            window_scores: per window, (K, h, w) class scores (a method's logits at the window's
                resolution, or already on the VFM grid); resampled bilinearly to the VFM grid.
            window_features: per window, (C, gh, gw) VFM features of that window.
        Returns:
            (K, H, W) refined scores: the windows' propagated patch scores upsampled bilinearly to
            their windows and averaged where windows overlap, then (LPOSS+) propagated over pixels.
        """
        ys, feats, positions, grids = [], [], [], []
        for box, score, feat in zip(boxes, window_scores, window_features, strict=True):
            grid = tuple(feat.shape[-2:])
            on_grid = F.interpolate(score[None].float(), size=grid, mode="bilinear", align_corners=False)[0]
            ys.append(on_grid.flatten(1).T)
            feats.append(feat.flatten(1).T.float())
            positions.append(window_patch_positions(box, grid).to(feat.device))
            grids.append(grid)
        refined = self.refine_patches(torch.cat(ys), torch.cat(feats), torch.cat(positions))
        num_classes, (h, w) = refined.shape[1], image.shape[-2:]
        total = refined.new_zeros((num_classes, h, w))
        count = refined.new_zeros((h, w))
        start = 0
        for (y1, y2, x1, x2), (gh, gw) in zip(boxes, grids):
            patch = refined[start : start + gh * gw].T.reshape(1, num_classes, gh, gw)
            start += gh * gw
            size = (y2 - y1, x2 - x1)
            total[:, y1:y2, x1:x2] += F.interpolate(patch, size=size, mode="bilinear", align_corners=False)[0]
            count[y1:y2, x1:x2] += 1
        stitched = total / count.clamp(min=1)
        return self.refine_pixels(image, stitched) if self.pixel else stitched
