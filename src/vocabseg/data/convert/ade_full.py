"""ADE20K-full (``ADE20K_2021_17_01``) -> the A-847 layout: ``images_detectron2/<split>/*.jpg`` and
``annotations_detectron2/<split>/*.tif`` (16-bit labels, 65535 = ignored).

Follows the preparation MaskFormer introduced and CAT-Seg uses (``prepare_ade20k_full_sem_seg.py``):

* the object class of a pixel of ``<image>_seg.png`` is ``R // 10 * 256 + G``;
* the 847 evaluated classes are the ADE object classes of :data:`ADE847_OBJECT_IDS`, in label order
  (the names are ``classnames/ade847.txt``); every other class and unlabelled pixels become 65535;
* images whose shorter side exceeds 512 are resized to a shorter side of 512 (rounded), the image
  bilinearly and the labels by nearest neighbour, then the image is saved as JPEG again (quality 75).

The reference resizes with OpenCV; here the same half-pixel bilinear and OpenCV's nearest-neighbour
rule are written in NumPy, so labels match exactly and images to within rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import DatasetLayoutError
from ...io.files import atomic_write

IGNORE = 65535
MAX_SIZE = 512

# ADE20K-full object class of each A-847 label 0..846
ADE847_OBJECT_IDS = (
    2978, 312, 2420, 2855, 2131, 976, 447, 165, 2377, 838, 350, 1831, 1125, 3055, 401, 1610, 1910, 2684, 471, 687,
    774, 2473, 2264, 1735, 2994, 1564, 1276, 2178, 2329, 57, 907, 913, 1395, 2138, 2272, 2128, 724, 155, 2053, 2380,
    689, 1788, 3087, 2530, 581, 2388, 2985, 2454, 2096, 137, 294, 212, 2185, 524, 2212, 943, 1869, 2251, 2793, 2423,
    1121, 266, 1948, 1744, 783, 571, 627, 629, 491, 1374, 223, 3016, 2598, 978, 239, 608, 236, 2531, 2616, 591, 327,
    2679, 1451, 181, 420, 2821, 1023, 855, 2733, 2928, 1240, 77, 1969, 2880, 14, 1936, 2828, 631, 103, 3144, 308,
    1282, 38, 1563, 29, 480, 2569, 247, 187, 778, 2243, 1941, 2833, 120, 95, 2836, 1087, 868, 1401, 220, 47, 843,
    123, 2537, 1927, 2337, 1702, 64, 249, 642, 1981, 609, 2840, 2586, 1393, 2704, 1304, 146, 1494, 2739, 389, 1551,
    131, 738, 161, 747, 1919, 3109, 2179, 2989, 206, 1930, 1002, 2254, 1708, 2526, 160, 2901, 2262, 44, 597, 2235,
    1260, 682, 2151, 3107, 432, 1098, 2932, 461, 410, 2046, 533, 1481, 1858, 894, 1322, 1891, 1756, 49, 1272, 1229,
    2850, 1784, 2962, 259, 319, 954, 1974, 1013, 2356, 97, 318, 592, 2885, 1017, 851, 1407, 1332, 303, 2714, 1924,
    1346, 1081, 1583, 2727, 2509, 2123, 602, 202, 10, 490, 530, 2213, 1884, 2934, 2687, 387, 2668, 982, 2547, 1474,
    877, 1391, 414, 698, 2019, 2422, 3010, 1139, 753, 1747, 2175, 1301, 1033, 1789, 2939, 2730, 1652, 90, 1349,
    2830, 1485, 2370, 2155, 118, 1402, 1957, 3130, 1197, 52, 2688, 96, 762, 772, 1857, 2315, 1016, 643, 3105, 1849,
    791, 349, 6, 3114, 1587, 1233, 559, 1223, 3049, 1943, 853, 709, 1390, 2748, 2007, 1546, 1513, 2600, 2538, 1790,
    194, 326, 2877, 594, 2036, 1662, 2366, 1754, 418, 2553, 1951, 1963, 918, 2086, 997, 2731, 704, 1365, 569, 3108,
    948, 839, 63, 1305, 378, 2362, 2734, 2982, 2398, 1119, 382, 1141, 1805, 3102, 2341, 1131, 2316, 2626, 3104, 198,
    1896, 2800, 190, 3131, 1463, 357, 929, 209, 912, 1164, 1509, 2539, 3116, 2615, 1644, 818, 242, 2217, 2347, 2686,
    2300, 572, 789, 358, 2443, 101, 2969, 2692, 606, 2339, 1533, 2060, 1782, 495, 371, 2707, 889, 3156, 2683, 1499,
    1135, 1619, 125, 2838, 2792, 1695, 746, 1343, 1370, 2858, 145, 2565, 1892, 1103, 286, 170, 3073, 922, 1655,
    1602, 2160, 1151, 2176, 2239, 132, 394, 1424, 607, 700, 116, 1425, 2676, 141, 2360, 2449, 897, 317, 2228, 2351,
    1543, 656, 1088, 373, 2472, 2892, 1740, 3067, 1367, 188, 79, 1633, 1885, 677, 1779, 1297, 2334, 3027, 2735,
    1791, 2405, 1748, 2983, 3035, 2824, 2168, 385, 2148, 2465, 175, 390, 268, 2722, 2857, 3088, 2926, 2782, 1378,
    1934, 2072, 2889, 944, 1158, 1383, 867, 2145, 1915, 361, 402, 482, 2761, 300, 1554, 636, 260, 1186, 871, 2859,
    2103, 208, 2236, 2012, 2462, 1462, 2832, 2617, 1024, 1129, 18, 376, 134, 407, 434, 2017, 2717, 2005, 2993, 1545,
    1445, 2831, 1161, 2411, 2949, 1769, 552, 2327, 939, 3013, 1986, 1486, 2723, 1549, 2649, 1020, 392, 422, 1419,
    2099, 2464, 3058, 430, 675, 2941, 2955, 2355, 840, 32, 2338, 1232, 2834, 2991, 2879, 444, 1657, 2246, 296, 245,
    2661, 1202, 1714, 251, 1095, 1828, 311, 2732, 947, 2115, 2738, 2525, 2194, 634, 740, 2682, 2020, 1156, 1036,
    1295, 1181, 3037, 1614, 736, 893, 2047, 1274, 1361, 3036, 2606, 2797, 2022, 2876, 2758, 472, 3028, 882, 1189,
    743, 3122, 2401, 468, 1061, 1523, 3059, 2843, 2853, 1529, 214, 3032, 3071, 277, 813, 426, 1039, 727, 1508, 2490,
    2299, 768, 1172, 537, 1847, 1664, 1110, 1014, 662, 121, 227, 2410, 2165, 2696, 3005, 1231, 635, 292, 2690, 65,
    2607, 2574, 1188, 456, 2913, 459, 1955, 827, 1111, 2412, 2997, 528, 366, 1863, 500, 1001, 1958, 1441, 809, 210,
    435, 718, 1674, 388, 1572, 1584, 1944, 674, 99, 2352, 1019, 1763, 185, 554, 1066, 2508, 951, 2822, 415, 297,
    1914, 2619, 1338, 2505, 955, 2786, 238, 3000, 2763, 299, 822, 1288, 3101, 2894, 992, 489, 2157, 2309, 1576,
    1810, 2964, 2662, 2087, 1569, 503, 1505, 1468, 1613, 1138, 1256, 2715, 2846, 477, 2576, 108, 2245, 1162, 2149,
    2183, 858, 1324, 1055, 1741, 149, 615, 825, 2143, 304, 283, 2322, 3017, 2510, 1960, 265, 2282, 2184, 1461, 3113,
    2372, 2166, 232, 693, 1945, 3039, 2494, 1908, 2827, 280, 2950, 1044, 288, 2863, 1342, 2409, 1258, 2249, 2862,
    920, 1607, 2802, 610, 3129, 1108, 2823, 476, 2641, 2788, 2070, 1368, 2903, 699, 2844, 942, 2663, 457, 2701,
    2540, 2231, 2746, 1738, 2350, 2808, 2025, 2541, 2156, 126, 2512, 831, 2503, 2039, 2774, 886, 919, 2240, 2636,
    963, 1218, 1406, 1420, 526, 2639, 975, 1921, 2305, 1193, 2517, 2809, 1647, 314, 2560, 545, 1345, 775, 603, 1163,
    1641, 1678, 2450, 2915, 42, 2242, 2741, 1143, 862, 1654, 1826, 1689, 3124, 2710, 152, 549, 360, 1982, 1478,
    2203, 2612, 2956, 2681, 437, 2171, 1933, 3110, 1824, 2803, 234, 764, 177, 817, 3145, 1262, 864, 2359, 2992,
    1725, 2667, 2484, 1133, 1667, 2847, 932, 1392, 2573, 2140, 1046, 264, 2927, 2752, 679, 2493, 1658, 2466, 1057,
    2444, 2093, 2248, 2432, 726, 816, 1171, 2766, 2900, 2313, 488, 2265, 2043, 332, 1771, 2320, 2646, 1089, 2826,
    3148,
)  # fmt: skip

_LUT = np.full(256 * 256, IGNORE, dtype=np.uint16)
_LUT[list(ADE847_OBJECT_IDS)] = np.arange(len(ADE847_OBJECT_IDS))


def ade847_labels(seg: np.ndarray) -> np.ndarray:
    """An ADE ``*_seg.png`` array (H, W, 3) -> (H, W) uint16 A-847 labels."""
    if seg.ndim != 3 or seg.shape[2] < 3:
        raise ValueError(f"expected an RGB *_seg.png, got an array of shape {seg.shape}")
    classes = (seg[..., 0].astype(np.int64) // 10) * 256 + seg[..., 1].astype(np.int64)
    return _LUT[classes]


def target_size(height: int, width: int, max_size: int = MAX_SIZE) -> tuple[int, int] | None:
    """(height, width) after the reference's shorter-side cap, or ``None`` when no resize is needed."""
    if width >= height > max_size:
        return max_size, round(width / height * max_size)
    if height >= width > max_size:
        return round(height / width * max_size), max_size
    return None


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's ``INTER_NEAREST``: destination pixel i takes source pixel floor(i * src / dst)."""
    (h, w), (nh, nw) = labels.shape[:2], size
    rows = np.minimum((np.arange(nh) * (h / nh)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(nw) * (w / nw)).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _axis_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
    lo = np.floor(x).astype(np.int64)
    return lo, np.minimum(lo + 1, src - 1), x - lo


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's ``INTER_LINEAR`` (half-pixel centres, no antialiasing) on a uint8 (H, W[, C]) image."""
    (h, w), (nh, nw) = image.shape[:2], size
    r0, r1, fy = _axis_weights(h, nh)
    c0, c1, fx = _axis_weights(w, nw)
    img = image.astype(np.float64)
    fx = fx.reshape((1, nw) + (1,) * (img.ndim - 2))
    top = img[r0][:, c0] * (1 - fx) + img[r0][:, c1] * fx
    bottom = img[r1][:, c0] * (1 - fx) + img[r1][:, c1] * fx
    fy = fy.reshape((nh, 1) + (1,) * (img.ndim - 2))
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def _split_of(name: str) -> str | None:
    """``ADE_val_00000001`` -> validation, ``ADE_train_...`` -> training (the reference's rule)."""
    parts = name.split("_")
    return {"val": "validation", "train": "training"}.get(parts[1]) if len(parts) > 2 else None


def convert_ade847(
    ade_root: str | os.PathLike, splits: tuple[str, ...] = ("validation",), max_size: int = MAX_SIZE
) -> int:
    """Write the A-847 images and labels of ``splits`` under ``ade_root`` (``ADE20K_2021_17_01``);
    returns the number of images converted. Pairs already written are skipped, so an interrupted run
    resumes."""
    ade_root = Path(ade_root)
    source = ade_root / "images" / "ADE"
    if not source.is_dir():
        raise DatasetLayoutError(
            f"ADE20K-full images not found: expected {source}/<split>/<scene>/ADE_*.jpg with *_seg.png next to "
            "them (the ADE20K_2021_17_01 release)."
        )
    written = 0
    for split in splits:
        images = sorted(
            (p for p in (source / split).rglob("ADE_*.jpg") if _split_of(p.stem) == split),
            key=lambda p: p.name,
        )
        if not images:
            raise DatasetLayoutError(f"No ADE_*.jpg images of split {split!r} under {source / split}.")
        image_dir = ade_root / "images_detectron2" / split
        label_dir = ade_root / "annotations_detectron2" / split
        for src in tqdm(images, desc=f"ade847 {split}"):
            dst_image, dst_label = image_dir / src.name, label_dir / f"{src.stem}.tif"
            if dst_image.is_file() and dst_label.is_file():
                continue
            seg_path = src.with_name(f"{src.stem}_seg.png")
            if not seg_path.is_file():
                raise DatasetLayoutError(f"{src}: its segmentation {seg_path.name} is missing.")
            image = np.asarray(Image.open(src).convert("RGB"))
            try:
                labels = ade847_labels(np.asarray(Image.open(seg_path).convert("RGB")))
            except ValueError as exc:
                raise DatasetLayoutError(f"{seg_path}: {exc}") from None
            if labels.shape != image.shape[:2]:
                raise DatasetLayoutError(f"{seg_path}: size {labels.shape} differs from the image {image.shape[:2]}.")
            size = target_size(*image.shape[:2], max_size)
            if size is not None:
                image, labels = resize_bilinear(image, size), resize_nearest(labels, size)
            atomic_write(dst_image, lambda f, im=image: Image.fromarray(im).save(f, format="JPEG"))
            atomic_write(dst_label, lambda f, lb=labels: Image.fromarray(lb).save(f, format="TIFF"))
            written += 1
    return written
