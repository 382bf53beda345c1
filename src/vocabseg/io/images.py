"""Reading images safely: any common mode becomes 8-bit RGB, EXIF rotation is applied, and files
that are not images, are truncated, or are too large are refused with a message saying why."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError, ImageTooLargeError

#: Default pixel limit (width x height): 40 MP, e.g. 8000 x 5000. Larger images are refused before
#: they are decoded; raise it with ``max_pixels=`` / ``--max-pixels``.
DEFAULT_MAX_PIXELS = 40_000_000

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparent pixels are composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr, top = arr - lo, max(hi - lo, 1e-12)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def source_name(source: object) -> str:
    """How messages name an image: its path, or a placeholder for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<array>" if isinstance(source, np.ndarray) else "<image>"


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read ``source`` (path, encoded bytes, PIL image or HxW[x3|4] array) as (H, W, 3) uint8 RGB.

    Arrays may be uint8, uint16, or float in [0, 1].

    Raises:
        ImageLoadError: not an image, unreadable, truncated, an unsupported array or another type.
        ImageTooLargeError: more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    name = source_name(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name, max_pixels)
    if isinstance(source, Image.Image):
        return _decode(source, name, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), name, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        given = "None" if source is None else type(source).__name__
        raise ImageLoadError(
            f"Expected an image as a file path, encoded bytes, a PIL image or a numpy array; got {given}."
        )
    path = Path(source)
    if path.is_dir():
        raise ImageLoadError(f"{name}: is a directory, not an image file")
    if not path.is_file():  # a device or pipe could block the open
        raise ImageLoadError(f"{name}: " + ("not a regular file" if path.exists() else "no such file"))
    try:
        fp = path.open("rb")
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot be opened ({exc.strerror or exc})") from None
    with fp:  # closed once decoded: PIL leaves the files it is handed open
        return _decode(fp, name, max_pixels)


def _decode(source: Image.Image | io.BufferedIOBase, name: str, max_pixels: int | None) -> np.ndarray:
    """Decode an open file (or check a PIL image) fully, so nothing is read after the file closes."""
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(source)
        _check_size(name, img.size[0] * img.size[1], max_pixels, img.size)
        img.load()  # decode now, so truncated files fail here and not later
        img = ImageOps.exif_transpose(img)
        return np.asarray(_to_rgb(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name}: image too large ({exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageLoadError):
            raise
        raise ImageLoadError(f"{name}: unreadable or truncated image ({exc})") from None


def _check_size(name: str, pixels: int, max_pixels: int | None, size: tuple[int, int]) -> None:
    if size[0] < 1 or size[1] < 1:
        raise ImageLoadError(f"{name}: image has no pixels ({size[0]}x{size[1]})")
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {size[0]}x{size[1]} = {pixels:,} pixels is above the limit of {max_pixels:,} pixels; "
            "downscale it or raise the limit (--max-pixels / max_pixels=)."
        )


def _array_to_rgb(arr: np.ndarray, name: str, max_pixels: int | None) -> np.ndarray:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageLoadError(f"Expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")
    _check_size(name, arr.shape[0] * arr.shape[1], max_pixels, (arr.shape[1], arr.shape[0]))
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = (_checked_unit_floats(arr) * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageLoadError(f"Unsupported array dtype {arr.dtype} (use uint8, uint16 or float in [0, 1])")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return np.asarray(_to_rgb(Image.fromarray(arr)))


def _checked_unit_floats(arr: np.ndarray) -> np.ndarray:
    """A float image must be in [0, 1]: one in 0-255 would otherwise turn silently white."""
    if np.isnan(arr).any():
        raise ImageLoadError("The float image array contains NaN values; every pixel needs a value in [0, 1].")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageLoadError(
            f"A float image array must have values in [0, 1], got values from {lo:g} to {hi:g}. For an image "
            "in 0-255, convert it with .astype(np.uint8) or divide it by 255."
        )
    return arr
