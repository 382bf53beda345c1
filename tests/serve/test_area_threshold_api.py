"""The REST API passes ``area_threshold`` on: a class below it is gone from the returned labels."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'vocabseg[web]'")

from fastapi.testclient import TestClient  # noqa: E402

from vocabseg.serve import ServeConfig, create_app  # noqa: E402

from .helpers import encode_png, make_image  # noqa: E402

URL = "/api/v1/segment"
CLASSES = "cat, dog, car"


@pytest.fixture(scope="module")
def client(make_segmenter):
    with TestClient(create_app(make_segmenter, ServeConfig(default_method="sclip"), methods=["sclip"])) as client:
        yield client


def test_area_threshold_drops_the_smallest_class(client, reference):
    image = make_image(1)
    plain = reference.segment(image, CLASSES)
    areas = np.bincount(plain.labels.ravel(), minlength=3) / plain.labels.size
    smallest = int(np.argmin(np.where(areas > 0, areas, np.inf)))
    threshold = round(float(areas[smallest]) + 0.01, 4)  # just above the smallest class's share
    assert 0 < threshold < np.sort(areas)[-2], "the image must have a small class and two larger ones"
    expected = reference.segment(image, CLASSES, area_threshold=threshold)
    assert (plain.labels == smallest).any() and not (expected.labels == smallest).any()

    response = client.post(
        URL,
        files={"image": ("in.png", encode_png(image), "image/png")},
        data={"classes": CLASSES, "area_threshold": str(threshold)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["labels_png"]))))
    np.testing.assert_array_equal(labels, expected.labels)
    assert body["classes"][smallest]["pixels"] == 0
    assert body["settings"]["area_threshold"] == threshold
