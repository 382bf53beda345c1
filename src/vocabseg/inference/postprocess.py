"""From per-name logits to class probabilities and labels (SCLIP ``postprocess_result``).

1. p = softmax(logit_scale · cos) over all names jointly (or, with ``score="sigmoid"``, an independent
   sigmoid(logit_scale · logit) per name: Beyond-Labels' binary per-class scores);
2. synonyms merged per class by the max of their probabilities;
3. optional area threshold: a foreground class covering less than ``area_threshold`` of the
   predicted foreground has its probabilities zeroed;
4. label = argmax; pixels whose best probability is below ``prob_threshold`` go to the background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_SCORE_FUNCTIONS = {"softmax": lambda x: x.softmax(dim=0), "sigmoid": torch.sigmoid}


def class_probabilities(
    logits: torch.Tensor, logit_scale: float, name_to_class: Sequence[int], num_classes: int, score: str = "softmax"
) -> torch.Tensor:
    """(K_names, H, W) logits -> (C, H, W) max-merged class probabilities.

    A class with no names (a threshold-only background) gets probability 0 everywhere.
    """
    probs = _SCORE_FUNCTIONS[score](logit_scale * logits)
    index = torch.as_tensor(name_to_class, device=logits.device).view(-1, 1, 1).expand_as(probs)
    merged = probs.new_zeros((num_classes, *probs.shape[1:]))
    return merged.scatter_reduce(0, index, probs, reduce="amax", include_self=True)


def decide_labels(
    probs: torch.Tensor,
    background_index: int | None,
    prob_threshold: float = 0.0,
    area_threshold: float = 0.0,
) -> torch.Tensor:
    """(C, H, W) class probabilities -> (H, W) int64 labels."""
    if prob_threshold > 0 and background_index is None:
        raise ValueError("prob_threshold needs a background class to send low-confidence pixels to.")
    if area_threshold > 0:
        num_classes = probs.shape[0]
        areas = torch.bincount(probs.argmax(dim=0).flatten(), minlength=num_classes).to(probs.dtype)
        foreground = torch.ones(num_classes, dtype=torch.bool, device=probs.device)
        if background_index is not None:
            foreground[background_index] = False
        keep = (areas > area_threshold * areas[foreground].sum()) | ~foreground
        probs = probs * keep.to(probs.dtype).view(-1, 1, 1)
    best, labels = probs.max(dim=0)
    if prob_threshold > 0:
        labels = torch.where(best < prob_threshold, torch.full_like(labels, background_index), labels)
    return labels
