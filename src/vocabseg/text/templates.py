"""Prompt templates: named sets, or any custom list of strings containing ``{}``.

The default is the 80 OpenAI ImageNet templates every SCLIP-lineage method uses; they are taken
from open_clip (one source of truth) rather than re-typed here.
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from .._names import lookup

# Beyond-Labels (Rahman et al., 2025), appendix H, as printed: 12 entries, one of them listed twice (kept,
# so it carries twice the weight in the average, as in the paper's list).
BEYOND_LABELS_TEMPLATES = (
    "An image of a {}.",
    "This is an image of a {}.",
    "An image of a small {}.",
    "An image of a medium {}.",
    "An image of a large {}.",
    "An image of a {} within the context.",
    "An image of the {} within the context.",
    "An image of the {} within the context.",
    "A resized image of a {} within the context.",
    "This falls under a {} within the context.",
    "This falls under the {} within the context.",
    "This falls under one {} within the context.",
)

#: CAT-Seg's and PixelCLIP's single template (PixelCLIP writes its learnable class names into it)
SCENE_TEMPLATE = "A photo of a {} in the scene"

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai80": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    "openai7": tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES),
    # PixelCLIP's evaluation ensemble ("imagenet_select"): the 7 above, then the scene template
    "pixelclip8": (*(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES), SCENE_TEMPLATE),
    "beyond_labels12": BEYOND_LABELS_TEMPLATES,
    # CAT-Seg's (and FGAseg's) PROMPT_ENSEMBLE_TYPE "single"
    "catseg1": (SCENE_TEMPLATE,),
    "name": ("{}",),
    "photo": ("a photo of a {}.",),  # ViL-Seg (Sec. 3.3), after CLIP's zero-shot prompt
}
DEFAULT_TEMPLATES = "openai80"


def resolve_templates(templates: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """A template-set name (see :data:`TEMPLATE_SETS`) or a list of ``{}`` strings -> the strings."""
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if isinstance(templates, str):
        return lookup(TEMPLATE_SETS, templates, "template set")
    resolved = tuple(templates)
    if not resolved:
        raise ValueError("The template list is empty.")
    bad = [t for t in resolved if t.count("{}") != 1]
    if bad:
        raise ValueError(f"Each template must contain '{{}}' exactly once; these do not: {bad}")
    return resolved
