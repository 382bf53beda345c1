"""``beyond_labels``: Beyond-Labels (Rahman et al., 2025, arXiv 2501.16769), a trained head on a frozen CLIP.

Frozen CLIP patch tokens F_V (any training-free method's dense features; CLIP's own by default) and
prompt-ensembled class embeddings F_W (the paper's 12 templates) go through the
:class:`~vocabseg.heads.beyond_labels.BeyondLabelsHead`: Fourier position embedding (Eq. 2),
channel-alignment MLPs, an 8-layer 4-head fusion transformer, a convolutional ×2-upsampling decoder
and cosine similarity. Probabilities are sigmoid(cos / τ), τ = 0.08 (``logit_scale`` = 1/τ = 12.5,
``score="sigmoid"``); on PASCAL-5i a pixel is the class when its sigmoid beats 0.5 (Sec. III-D).
Trained with per-class BCE (cross-entropy as an option); CLIP stays frozen throughout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..heads.beyond_labels import BeyondLabelsHead, FourierPositionalEncoding
from ..heads.losses import get_loss
from ..inference.config import InferenceConfig
from ..inference.sliding import centered_padding
from .registry import PaperSettings, create_method, get_method_spec, register_method
from .trained import TrainedCLIPMethod

TAU = 0.08
FOURIER_MODES = ("add", "replace_clip_pos")


@register_method(
    "beyond_labels",
    defaults=InferenceConfig(short_side=448, crop=224, stride=149, logit_scale=1 / TAU, score="sigmoid"),
    summary="Frozen CLIP + Fourier positions + 8-layer fusion transformer + upsampling decoder; sigmoid(cos/0.08).",
    reference="Rahman et al., Beyond-Labels, ICACI 2025 (arXiv 2501.16769)",
    paper=PaperSettings(
        "Beyond-Labels Sec. III-D: class if sigmoid > 0.5 (PASCAL-5i)",
        {
            "voc21": {"prob_threshold": 0.5},
        },
    ),  # fmt: skip
    trainable=True,
    weights="no released weights: train them with `vocabseg train --recipe beyond_labels_pascal5i --fold F`",
    templates="beyond_labels12",
)
class BeyondLabels(TrainedCLIPMethod):
    """Args:
    dense: the training-free method whose dense features are the frozen visual tokens (``clip``:
        CLIP's own patch tokens, as the paper; ``maskclip``, ``sclip``... also work).
    width, depth, heads, decoder_stages, fourier, fourier_frequencies, fourier_sigma: head sizes
        (:class:`BeyondLabelsHead`); ``seed`` fixes the Fourier frequencies.
    fourier_mode: ``add`` (default): the Fourier embedding is added to the projected visual tokens;
        ``replace_clip_pos``: it replaces CLIP's own patch position embeddings inside the frozen
        encoder, as Eq. 2 literally reads (trainable, so gradients then flow through CLIP, which
        costs a backward pass through the image tower).
    tau: the sigmoid temperature τ.
    loss: ``bce`` (per-class binary, the paper's sigmoid) or ``ce`` (softmax with a background column).
    """

    def __init__(
        self,
        clip: nn.Module,
        dense: str = "clip",
        width: int = 512,
        depth: int = 8,
        heads: int = 4,
        decoder_stages: int = 3,
        fourier: bool = True,
        fourier_frequencies: int = 128,
        fourier_sigma: float = 10.0,
        tau: float = TAU,
        loss: str = "bce",
        seed: int = 0,
        fourier_mode: str = "add",
    ):
        super().__init__(clip)
        if fourier_mode not in FOURIER_MODES:
            raise ValueError(f"fourier_mode must be one of {FOURIER_MODES}, got {fourier_mode!r}")
        if get_method_spec(dense).trainable:
            raise ValueError(f"dense={dense!r} must be a training-free method (the frozen feature extractor).")
        self.dense = create_method(dense, clip)
        self.dense.requires_grad_(False)
        self.loss_fn = get_loss(loss)
        clip_dim = int(getattr(clip.visual, "output_dim", 0) or clip.text_projection.shape[-1])
        self.head = BeyondLabelsHead(
            clip_dim,
            width=width,
            depth=depth,
            heads=heads,
            decoder_stages=decoder_stages,
            fourier=fourier and fourier_mode == "add",
            fourier_frequencies=fourier_frequencies,
            fourier_sigma=fourier_sigma,
            fourier_seed=seed,
            tau=tau,
        )
        self.replaces_clip_position = fourier and fourier_mode == "replace_clip_pos"
        if self.replaces_clip_position:
            width_clip = int(clip.visual.positional_embedding.shape[-1])
            self.clip_position = FourierPositionalEncoding(fourier_frequencies, fourier_sigma, width_clip, seed=seed)
            self.dense.tower.patch_position_fn = self.clip_position

    def shared_clip_prefixes(self) -> tuple[str, ...]:
        return ("dense.",)

    def train(self, mode: bool = True) -> BeyondLabels:
        super().train(mode)
        self.clip.eval()  # frozen: no dropout / batch statistics in CLIP, ever
        self.dense.eval()
        return self

    def visual_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Frozen, L2-normalised CLIP patch tokens (B, N, d) and their grid (with gradients only when
        a trainable position embedding sits inside CLIP)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.replaces_clip_position):
            dense = F.normalize(self.dense(images).float(), dim=1).to(images.dtype)
        b, d, h, w = dense.shape
        return dense.flatten(2).transpose(1, 2), (h, w)

    def cosine(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """cos(pixel, fused class) (B, K, H, W) at the images' resolution."""
        tokens, grid = self.visual_tokens(images)
        cos = self.head(tokens, grid, text.to(tokens.dtype))
        return F.interpolate(cos.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def logits(
        self, windows: torch.Tensor, text: torch.Tensor, *, pad_multiple: int = 0, surgery: bool = False
    ) -> torch.Tensor:
        h, w = windows.shape[-2:]
        left, right, top, bottom = centered_padding(h, w, pad_multiple)
        padded = F.pad(windows, (left, right, top, bottom)) if (left or right or top or bottom) else windows
        return self.cosine(padded, text)[:, :, top : top + h, left : left + w]

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """BCE (or CE) of cos/τ against the label map: classes 0..K-1, K = background, 255 ignored."""
        if self.class_text.numel() == 0:
            raise RuntimeError("set_class_text(...) must give the training classes' text embeddings first.")
        images, target = batch["image"], batch["label"]
        cos = self.cosine(images, self.class_text)
        k = self.class_text.shape[0]
        loss = self.loss_fn(self.head.scaled_logits(cos), target, ignore_index=255, background_index=k)
        return {"loss": loss}
