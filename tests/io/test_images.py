"""Every kind of input image: modes, bit depths, EXIF rotation, and the ones we must refuse."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vocabseg.errors import ImageLoadError, ImageTooLargeError
from vocabseg.io.images import load_image
from vocabseg.io.visualize import class_colors, label_image, overlay, voc_colormap


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_path_bytes_pil_and_array_agree(tmp_path, rgb_image):
    path = tmp_path / "x.png"
    Image.fromarray(rgb_image).save(path)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(rgb_image), rgb_image):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (50, 70, 3)
        np.testing.assert_array_equal(out, rgb_image)


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    out = load_image(png_bytes(Image.fromarray(gray, mode="L")))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = load_image(png_bytes(Image.fromarray(values)))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue
    out = load_image(png_bytes(Image.fromarray(rgba, mode="RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_cmyk_jpeg_is_converted():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    out = load_image(png_bytes(cmyk, fmt="JPEG", quality=100))
    assert out.shape == (8, 8, 3)
    r, g, b = out[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(png_bytes(img, fmt="JPEG", exif=exif, quality=95))
    assert out.shape == (30, 10, 3)  # portrait after rotation
    assert out[2, 5, 0] > 200 and out[-3, 5, 0] < 60  # the stripe is now at the top


def test_palette_image():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(png_bytes(p))[0, 0].tolist() == [10, 20, 30]


def test_not_an_image(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, this is not a picture")
    with pytest.raises(ImageLoadError, match="notes.txt: not an image"):
        load_image(bad)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_truncated_image(tmp_path):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png: unreadable or truncated"):
        load_image(path)


def test_huge_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(ImageTooLargeError, match=r"200x100 = 20,000 pixels is above the limit of 19,999"):
        load_image(path, max_pixels=19_999)
    assert load_image(path, max_pixels=20_000).shape == (100, 200, 3)
    with pytest.raises(ImageTooLargeError, match="limit of 100"):
        load_image(np.zeros((20, 20, 3), dtype=np.uint8), max_pixels=100)


def test_bad_arrays():
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="dtype"):
        load_image(np.zeros((4, 4, 3), dtype=np.int64))
    assert load_image(np.full((2, 2, 3), 0.5, dtype=np.float32))[0, 0].tolist() == [128, 128, 128]


# -- visualisation --------------------------------------------------------------------------------------------------
def test_voc_colormap_first_entries():
    cmap = voc_colormap(4)
    assert cmap.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]


def test_palette_png_round_trips_labels(tmp_path):
    labels = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.int32)
    colors = class_colors(3, background_index=2)
    assert colors[2].tolist() == [0, 0, 0] and colors[0].tolist() == [128, 0, 0]
    label_image(labels, colors).save(tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), labels)
    assert back.getpalette()[:9] == colors.reshape(-1).tolist()


def test_many_classes_use_16_bit_labels():
    labels = np.array([[0, 300]], dtype=np.int32)
    img = label_image(labels, class_colors(400))
    np.testing.assert_array_equal(np.asarray(img), labels)


def test_overlay_blends_and_adds_legend(rgb_image):
    labels = np.zeros((50, 70), dtype=np.int32)
    labels[:, 35:] = 1
    colors = class_colors(2)
    plain = np.asarray(overlay(rgb_image, labels, colors, ["a", "b"], alpha=0.5, legend=False))
    want = np.clip(0.5 * rgb_image + 0.5 * colors[labels] + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(plain.astype(int) - want.astype(int)).max() <= 1
    with_legend = overlay(rgb_image, labels, colors, ["a", "b"])
    assert with_legend.width > 70 and with_legend.height >= 50
