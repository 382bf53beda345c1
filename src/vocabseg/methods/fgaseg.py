"""``fgaseg``: FGAseg (Li et al., 2025, arXiv 2501.00877), CAT-Seg with fine-grained pixel-text alignment.

FGAseg is CAT-Seg (:mod:`vocabseg.methods.catseg`: the same CLIP, fine-tuning, guidance, inference
protocol and template) with the additions of :class:`~vocabseg.heads.fgaseg.FGASegHead`:

* the P2Tformer makes the class text per image (text' = text + γ ⊙ cross-attention to the image
  tokens), and text' replaces the text everywhere downstream;
* a local, convolutional cost volume (LCS) is embedded next to CAT-Seg's cosine one (GCS), fused with
  it before the aggregator and re-injected before each upsampling stage (``fusion="cat"``: concatenate
  and Linear, as the headline "NoFast+Cat"; ``"add"``: sum);
* T2Ploss: a projector and per-class dynamic kernels from text' predict the one-hot masks at 4× the
  feature grid (``t2p_loss="bce"`` as the official code, ``"mse"`` as the paper's Eq. 8);
* optionally the fast decoder (``fast_decoder=True``): auxiliary heads trained with their own losses,
  and at inference only the ``top_n`` (16) best classes of each pixel go on at each stage.

Loss (official ``FGA_seg_model.py``): L_bce + 0.02·L_T2P, plus 0.2·L_aux0 + L_aux1 + L_aux2 with the
fast decoder; every term uses CAT-Seg's label rules (``ignore_as_negative``). There are no released
weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._names import lookup
from ..errors import MethodOptionError
from ..heads.catseg import CATSegHead
from ..heads.fgaseg import T2P_LOSSES, FGASegHead, downsample_labels
from .catseg import CATSeg
from .registry import PaperSettings, get_method_spec, register_method

__all__ = ["FGASeg"]

_CATSEG = get_method_spec("catseg")

#: classes kept per pixel by the fast decoder at inference when ``top_n`` is not given (official ``select_topk``)
DEFAULT_TOP_N = 16


def _head_widths(head: CATSegHead) -> tuple[int, int]:
    """(clip_dim, clip_width) a CAT-Seg head was built for: its text guidance's input and its middle-layer
    guidance's input."""
    return head.text_proj[0].in_features, head.guidance_upsample[0].in_channels


def _at_label_size(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)


@register_method(
    "fgaseg",
    defaults=_CATSEG.defaults,
    paper=PaperSettings(
        "LiBingyu01/FGA-seg eval.sh (CAT-Seg's sliding window), SemSegEvaluator",
        _CATSEG.paper.settings,
        convention=_CATSEG.paper.convention,
    ),
    summary="CAT-Seg + per-image text (P2Tformer), T2P alignment loss and a local conv cost volume; sigmoid logits.",
    reference="Li et al., FGAseg, arXiv 2501.00877 (2025)",
    trainable=True,
    weights="no released weights (the official release has none): train them with "
    "`vocabseg train --recipe fgaseg_vitb_coco_stuff` (or fgaseg_vitl_coco_stuff)",
    text_input=_CATSEG.text_input,
    templates=_CATSEG.templates,
)
class FGASeg(CATSeg):
    """Args:
    feature_grid, guidance_layers, finetune, hidden_dim, heads, appearance_guidance_dim, text_guidance_dim,
    num_layers, window, pooling, pad_len, decoder_dims, decoder_guidance_dims, decoder_guidance_proj_dims,
    ignore_as_negative: as :class:`~vocabseg.methods.catseg.CATSeg` (one template per class).
    fusion: how the LCS embedding joins the cost embedding and the decoder stages (``cat`` / ``add``;
        ``add`` needs ``decoder_dims[0] == hidden_dim / 2``).
    lcs: ``full`` (official code) or ``depthwise`` (the paper's wording); ``lcs_kernel`` its kernel size
        (3; the paper finds 9 marginally better), ``kernel_norm`` its softmax kernel normalisation.
    p2t_layers: P2Tformer layers (1).
    t2p_loss, t2p_weight: the T2P loss (``bce`` / ``mse``) and its weight λ (0.02).
    fast_decoder: auxiliary heads (losses weighted ``aux_weights``: 0.2, 1, 1) and, at inference, top-N
        class pruning with ``top_n`` classes per pixel (16 when not given).
    """

    def __init__(
        self,
        clip: nn.Module,
        feature_grid: int = 24,
        guidance_layers: Sequence[int] | None = None,
        finetune: str = "attention",
        hidden_dim: int = 128,
        heads: int = 4,
        appearance_guidance_dim: int = 128,
        text_guidance_dim: int = 128,
        num_layers: int = 2,
        window: int = 12,
        pooling: Sequence[int] = (2, 2),
        pad_len: int = 256,
        decoder_dims: Sequence[int] = (64, 32),
        decoder_guidance_dims: Sequence[int] = (256, 128),
        decoder_guidance_proj_dims: Sequence[int] = (32, 16),
        ignore_as_negative: bool = True,
        fusion: str = "cat",
        lcs: str = "full",
        lcs_kernel: int = 3,
        kernel_norm: bool = True,
        p2t_layers: int = 1,
        t2p_loss: str = "bce",
        t2p_weight: float = 0.02,
        fast_decoder: bool = False,
        top_n: int | None = None,
        aux_weights: Sequence[float] = (0.2, 1.0, 1.0),
    ):
        sizes: dict[str, Any] = dict(
            hidden_dim=hidden_dim,
            heads=heads,
            appearance_guidance_dim=appearance_guidance_dim,
            text_guidance_dim=text_guidance_dim,
            num_layers=num_layers,
            window=window,
            pooling=pooling,
            pad_len=pad_len,
            decoder_dims=decoder_dims,
            decoder_guidance_dims=decoder_guidance_dims,
            decoder_guidance_proj_dims=decoder_guidance_proj_dims,
        )
        super().__init__(
            clip,
            feature_grid=feature_grid,
            guidance_layers=guidance_layers,
            finetune=finetune,
            prompt_channels=1,
            ignore_as_negative=ignore_as_negative,
            **sizes,
        )
        if top_n is not None and not fast_decoder:
            raise MethodOptionError(f"top_n={top_n} prunes classes in the fast decoder only; set fast_decoder=True")
        self.t2p_fn = lookup(T2P_LOSSES, t2p_loss, "T2P loss")
        self.t2p_weight = float(t2p_weight)
        stages = self.head.num_stages
        self.aux_weights = tuple(float(w) for w in aux_weights) if fast_decoder else ()
        if fast_decoder and len(self.aux_weights) != stages + 1:
            raise MethodOptionError(
                f"aux_weights {list(aux_weights)} needs one weight per auxiliary head ({stages + 1}: before the "
                f"aggregator and before each of the {stages} decoder stages)"
            )
        # the CAT-Seg head is replaced by FGAseg's, with the same widths and sizes
        self.head = FGASegHead(
            *_head_widths(self.head),
            prompt_channels=1,
            **sizes,
            fusion=fusion,
            lcs=lcs,
            lcs_kernel=lcs_kernel,
            kernel_norm=kernel_norm,
            p2t_layers=p2t_layers,
            fast=fast_decoder,
            top_n=(DEFAULT_TOP_N if top_n is None else int(top_n)) if fast_decoder else None,
        )

    def class_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """As CAT-Seg's; with top-N pruning, one image at a time, so the classes an image keeps are its own
        (the pruning keeps the union over the batch it is given)."""
        if not self.head.prunes or images.shape[0] == 1:
            return super().class_logits(images, text)
        per_image = text.dim() == 4
        outputs = []
        for i in range(images.shape[0]):
            outputs.append(super().class_logits(images[i : i + 1], text[i : i + 1] if per_image else text))
        return torch.cat(outputs)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L_bce + λ·L_T2P (+ the weighted auxiliary losses with the fast decoder); each term is also
        returned (detached) for the training log."""
        images, label = batch["image"], batch["label"]
        dense, guidance = self.image_features(images)
        text = self.text_features(self.encode_class_text()).to(dense.dtype)
        logits, state = self.head(dense, text, guidance, return_state=True)
        align = self.head.alignment(dense, state.extras["text"]).float()
        terms = {
            "loss_seg": self.loss(_at_label_size(logits, label), label),
            "loss_t2p": self.loss(align, downsample_labels(label, tuple(align.shape[-2:])), fn=self.t2p_fn),
        }
        weights = {"loss_seg": 1.0, "loss_t2p": self.t2p_weight}
        for i, (aux, weight) in enumerate(zip(state.extras["aux"], self.aux_weights, strict=True)):
            terms[f"loss_aux{i}"] = self.loss(_at_label_size(aux, label), label)
            weights[f"loss_aux{i}"] = weight
        total = sum(weights[name] * value for name, value in terms.items())
        return {"loss": total, **{name: value.detach() for name, value in terms.items()}}
