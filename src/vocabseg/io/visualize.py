"""Colours, palette PNGs and overlays with a legend (plain numpy + PIL, no plotting stack)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaving colour map: (n, 3) uint8, entry 0 black, 1 (128, 0, 0)..."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def class_colors(num_classes: int, background_index: int | None = None) -> np.ndarray:
    """Distinct colours per class: VOC colours from entry 1 (so no class is black), the background
    black; beyond 255 classes, a deterministic pseudo-random colour."""
    base = voc_colormap(256)
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    extra = rng.integers(40, 256, size=(max(num_classes - 255, 0), 3), dtype=np.uint8)
    for i in range(num_classes):
        colors[i] = base[i + 1] if i < 255 else extra[i - 255]
    if background_index is not None:
        colors[background_index] = 0
    return colors


def label_image(labels: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
    """The one writer of label maps: a palette PNG image (mode ``P``) when the labels fit 8 bits,
    grayscale (``L``) without a palette, and 16-bit grayscale for more than 256 classes (a palette
    longer than 256 entries, or a label above 255), which palette PNGs cannot hold."""
    wide = labels.max(initial=0) > 255 or (palette is not None and len(palette) > 256)
    if wide:
        return Image.fromarray(labels.astype(np.uint16))
    if palette is None:
        return Image.fromarray(labels.astype(np.uint8), mode="L")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return img


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    colors: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    legend: bool = True,
) -> Image.Image:
    """Blend class colours over the image; add a legend of the classes present, with area %."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colors[labels].astype(np.float32)
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if not legend:
        return out
    counts = np.bincount(labels.reshape(-1), minlength=len(class_names))
    present = [i for i in np.argsort(-counts) if counts[i] > 0]
    return _with_legend(out, [(class_names[i], colors[i], counts[i] / labels.size) for i in present])


def _with_legend(img: Image.Image, entries: list[tuple[str, np.ndarray, float]]) -> Image.Image:
    size = max(12, min(24, img.height // 25))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a fixed-size bitmap font
        font = ImageFont.load_default()
    line = size + 6
    texts = [f"{name}  {100 * frac:.1f}%" for name, _, frac in entries]
    probe = ImageDraw.Draw(img)
    text_w = max((probe.textlength(t, font=font) for t in texts), default=0)
    width = int(text_w) + line + 24
    canvas = Image.new("RGB", (img.width + width, max(img.height, line * len(entries) + 12)), "white")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, ((_, color, _), text) in enumerate(zip(entries, texts)):
        x, y = img.width + 8, 6 + k * line
        draw.rectangle([x, y, x + size, y + size], fill=tuple(int(c) for c in color), outline="black")
        draw.text((x + size + 8, y), text, fill="black", font=font)
    return canvas
