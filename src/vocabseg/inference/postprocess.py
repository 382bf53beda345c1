"""From per-name logits to class probabilities and labels (SCLIP ``postprocess_result``).

1. p = softmax(logit_scale · cos) over all names jointly (or, with ``score="sigmoid"``, an independent
   sigmoid(logit_scale · logit) per name: Beyond-Labels' binary per-class scores); when the windows
   were averaged as scores (:func:`window_scores`, CAT-Seg), the values are probabilities already
   and are taken as they are (score ``given``);
2. synonyms merged per class by the max of their probabilities;
3. optional area threshold: a foreground class covering less than ``area_threshold`` of the
   predicted foreground has its probabilities zeroed;
4. label = argmax; pixels whose best probability is below ``prob_threshold`` go to the background.

:func:`class_probabilities` and :func:`decide_labels` do this on all names at once and keep the
(C, H, W) probabilities. :func:`stream_labels` gives the same labels, and each pixel's probability of
its label, from the logits of a few names at a time: with ADE-847's 847 names one (K, H, W) float32
tensor at a photo's resolution is over a gigabyte, and nobody needs it to label the pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

#: the score of values that are probabilities already (:func:`window_scores` made them)
GIVEN = "given"

#: score name -> function of the scaled logits and the names' axis
_SCORE_FUNCTIONS = {
    "softmax": lambda x, dim: x.softmax(dim=dim),
    "sigmoid": lambda x, dim: torch.sigmoid(x),
    GIVEN: lambda x, dim: x,
}

#: names whose logits :func:`stream_labels` holds at once (whole classes, so a class with more synonyms
#: makes a larger step): 32 x 1024 x 1024 float32 is 128 MiB; larger steps do not run faster
NAMES_PER_STEP = 32


def class_probabilities(
    logits: torch.Tensor, logit_scale: float, name_to_class: Sequence[int], num_classes: int, score: str = "softmax"
) -> torch.Tensor:
    """(K_names, H, W) logits -> (C, H, W) max-merged class probabilities.

    A class with no names (a threshold-only background) gets probability 0 everywhere.
    """
    probs = _SCORE_FUNCTIONS[score](logit_scale * logits, 0)
    index = torch.as_tensor(name_to_class, device=logits.device).view(-1, 1, 1).expand_as(probs)
    merged = probs.new_zeros((num_classes, *probs.shape[1:]))
    return merged.scatter_reduce(0, index, probs, reduce="amax", include_self=True)


def window_scores(logits: torch.Tensor, logit_scale: float, score: str) -> torch.Tensor:
    """(B, K, h, w) window logits -> each window's per-name probabilities (softmax over its names, or a
    sigmoid per name), for windows averaged as scores: CAT-Seg's sliding window takes the sigmoid of
    each window's logits (upsampled to the window) before folding the windows together.

    One new tensor besides ``logits`` (left untouched: a method may return a view of its own): with
    847 names a 384-px window's logits are 0.5 GB."""
    scaled = logits * logit_scale
    if score == "sigmoid":
        return scaled.sigmoid_()
    return _SCORE_FUNCTIONS[score](scaled, 1)


def decide_labels(
    probs: torch.Tensor,
    background_index: int | None,
    prob_threshold: float = 0.0,
    area_threshold: float = 0.0,
) -> torch.Tensor:
    """(C, H, W) class probabilities -> (H, W) int64 labels."""
    _check_background(background_index, prob_threshold)
    if area_threshold > 0:
        areas = torch.bincount(probs.argmax(dim=0).flatten(), minlength=probs.shape[0])
        keep = kept_classes(areas, background_index, area_threshold)
        probs = probs * keep.to(probs.dtype).view(-1, 1, 1)
    best, labels = probs.max(dim=0)
    return _send_to_background(labels, best, background_index, prob_threshold)


def kept_classes(areas: torch.Tensor, background_index: int | None, area_threshold: float) -> torch.Tensor:
    """(C,) bool: the classes the area threshold keeps, from each class's pixel count as the argmax.

    The background always stays; a foreground class stays if it covers more than ``area_threshold``
    of all pixels whose argmax is a foreground class.
    """
    areas = areas.to(torch.float32)
    foreground = torch.ones(len(areas), dtype=torch.bool, device=areas.device)
    if background_index is not None:
        foreground[background_index] = False
    return (areas > area_threshold * areas[foreground].sum()) | ~foreground


def stream_labels(
    logits_of: Callable[[list[int]], torch.Tensor],
    name_to_class: Sequence[int],
    num_classes: int,
    logit_scale: float,
    score: str = "softmax",
    background_index: int | None = None,
    prob_threshold: float = 0.0,
    area_threshold: float = 0.0,
    names_per_step: int = NAMES_PER_STEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decide_labels(class_probabilities(logits, ...), ...)`` without the (K, H, W) logits.

    ``logits_of(names)`` returns the (n, H, W) logits of the given name indices as a new tensor (it
    is scaled in place). It is asked for the names of whole classes, about ``names_per_step`` at a
    time, so synonyms are max-merged within one step. Each pixel keeps only its best class so far:
    with sigmoid (or given) scores, by probability; with softmax, by scaled logit (every name's probability is
    divided by the same per-pixel normaliser, a log-sum-exp over all names kept as a running
    maximum and sum, so the order is the same).

    The area threshold needs every pixel's best class before it can tell which classes it drops;
    where a dropped class was best, a second pass over the names of the kept classes only (usually
    few) finds the best kept class, as zeroing the dropped classes' probabilities does.

    Returns:
        (H, W) int64 labels, equal to :func:`decide_labels`' but for exact ties of softmax
        probabilities and probabilities within float rounding of ``prob_threshold``; and (H, W)
        float32 scores: each pixel's probability of its label class (``class_probabilities`` there).
    """
    if score not in _SCORE_FUNCTIONS:
        raise ValueError(f"score must be one of {', '.join(_SCORE_FUNCTIONS)}, got {score!r}")
    _check_background(background_index, prob_threshold)
    names_of: list[list[int]] = [[] for _ in range(num_classes)]
    for name, cls in enumerate(name_to_class):
        names_of[cls].append(name)
    # the background's values (for thresholded pixels) and the first class's (where the area threshold
    # drops every class with names, the argmax of all-zero probabilities) are kept aside
    watch = {0} | ({background_index} if background_index is not None else set())
    best, labels, log_norm, watched = _best_classes(
        logits_of, names_of, range(num_classes), logit_scale, names_per_step, score, watch
    )

    def probability(value: torch.Tensor | None) -> torch.Tensor:
        if value is None:  # a class without names
            return torch.zeros_like(best)
        return torch.exp(value - log_norm) if score == "softmax" else value.clamp(min=0)  # -inf: no class

    none_kept = None
    if area_threshold > 0:
        keep = kept_classes(torch.bincount(labels.flatten(), minlength=num_classes), background_index, area_threshold)
        dropped = ~keep[labels]
        if dropped.any():
            kept = keep.nonzero().flatten().tolist()
            again_best, again_labels, _, _ = _best_classes(
                logits_of, names_of, kept, logit_scale, names_per_step, score, set(), like=best
            )
            best = torch.where(dropped, again_best, best)
            labels = torch.where(dropped, again_labels, labels)
            none_kept = dropped & (again_best == -torch.inf)
    scores = probability(best)  # of the best kept class: what the probability threshold compares
    labels = _send_to_background(labels, scores, background_index, prob_threshold)
    if none_kept is not None:
        scores = torch.where(none_kept & (labels == 0), probability(watched.get(0)), scores)
    if background_index is not None:
        scores = torch.where(labels == background_index, probability(watched.get(background_index)), scores)
    return labels, scores


def _best_classes(
    logits_of: Callable[[list[int]], torch.Tensor],
    names_of: list[list[int]],
    classes: Iterable[int],
    logit_scale: float,
    names_per_step: int,
    score: str,
    watch: set[int],
    like: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
    """Per pixel, over ``classes``: the best class's value (softmax: its scaled logit; sigmoid: its
    probability) and index (the first on ties, like argmax; -inf and class 0 where no class has
    names), the log-sum-exp over their names (softmax), and the values of the ``watch`` classes."""
    best = labels = top = total = None
    watched: dict[int, torch.Tensor] = {}
    if like is not None:
        best = torch.full_like(like, -torch.inf)
        labels = torch.zeros(like.shape, dtype=torch.int64, device=like.device)
    for step_classes, names in _steps(names_of, classes, names_per_step):
        x = logits_of(names).mul_(logit_scale)
        if best is None:
            best = x.new_full(x.shape[1:], -torch.inf)
            labels = torch.zeros(x.shape[1:], dtype=torch.int64, device=x.device)
        if score == "sigmoid":
            x = x.sigmoid_()
        sizes = [len(names_of[cls]) for cls in step_classes]  # a class's names are consecutive in ``names``
        merged = x if len(sizes) == len(names) else torch.stack([part.amax(dim=0) for part in x.split(sizes)])
        value, where = merged.max(dim=0)
        if score == "softmax":  # the best class's logit is the best name's: the running maximum
            step_top = value if top is None else torch.maximum(top, value)
            scaled = (x - step_top).exp_().sum(dim=0)
            total = scaled if total is None else total.mul_(torch.exp(top - step_top)).add_(scaled)
            top = step_top
        better = value > best  # strictly: an earlier class keeps a tie
        best = torch.where(better, value, best)
        labels = torch.where(better, torch.tensor(step_classes, device=x.device)[where], labels)
        for cls in watch.intersection(step_classes):
            watched[cls] = merged[step_classes.index(cls)].clone()
    log_norm = top + torch.log(total) if top is not None else None
    return best, labels, log_norm, watched


def _steps(names_of: list[list[int]], classes: Iterable[int], size: int) -> Iterator[tuple[list[int], list[int]]]:
    """Consecutive whole classes with about ``size`` names between them: (classes, their names).
    Classes without names are left out (their probability is 0)."""
    step_classes: list[int] = []
    names: list[int] = []
    for cls in classes:
        if not names_of[cls]:
            continue
        if names and len(names) + len(names_of[cls]) > size:
            yield step_classes, names
            step_classes, names = [], []
        step_classes.append(cls)
        names.extend(names_of[cls])
    if names:
        yield step_classes, names


def _check_background(background_index: int | None, prob_threshold: float) -> None:
    if prob_threshold > 0 and background_index is None:
        raise ValueError("prob_threshold needs a background class to send low-confidence pixels to.")


def _send_to_background(
    labels: torch.Tensor, best: torch.Tensor, background_index: int | None, prob_threshold: float
) -> torch.Tensor:
    """Pixels whose best probability is below ``prob_threshold`` get the background's label."""
    if prob_threshold > 0:
        labels = torch.where(best < prob_threshold, torch.full_like(labels, background_index), labels)
    return labels
