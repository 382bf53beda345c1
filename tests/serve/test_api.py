"""The REST API on a tiny random-weight model: results checked against direct segmentation, every error."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'vocabseg[web]'")
pytest.importorskip("gradio", reason="the web extra is not installed: pip install 'vocabseg[web]'")

from fastapi.testclient import TestClient  # noqa: E402

from vocabseg.io import rle  # noqa: E402
from vocabseg.serve import ServeConfig, create_app  # noqa: E402

from .helpers import Gate, encode_png, make_image  # noqa: E402

URL = "/api/v1/segment"
METHODS = ["sclip", "maskclip", "proxyclip"]


@pytest.fixture(scope="module")
def client(make_segmenter):
    app = create_app(make_segmenter, ServeConfig(default_method="sclip", max_classes=6), methods=METHODS)
    app.state.engine.pool.get("sclip")  # loaded before the first request, as `vocabseg serve` does
    with TestClient(app) as client:
        yield client


def post(client, image: bytes, classes: str, **fields):
    return client.post(URL, files={"image": ("in.png", image, "image/png")}, data={"classes": classes, **fields})


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_segment_json_matches_direct_segmentation(client, reference):
    image = make_image(0)
    response = post(client, encode_png(image), "cat, dog; puppy, car")
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.segment(image, "cat, dog; puppy, car")

    assert (body["height"], body["width"]) == image.shape[:2]
    assert body["method"] == "sclip" and body["background_index"] is None
    assert (body["model"], body["templates"], body["surgery"]) == ("custom", "openai80", False)
    assert body["settings"] == reference.config.to_dict()
    assert [c["name"] for c in body["classes"]] == ["cat", "dog", "car"]
    assert body["classes"][1]["names"] == ["dog", "puppy"]

    labels = decode_png(base64.b64decode(body["labels_png"]))
    np.testing.assert_array_equal(labels, expected.labels)
    counts = np.bincount(labels.ravel(), minlength=3)
    for i, cls in enumerate(body["classes"]):
        mask = rle.decode(cls["rle"])
        np.testing.assert_array_equal(mask, labels == i)
        assert cls["pixels"] == counts[i] == rle.area(cls["rle"])
        assert cls["area"] == pytest.approx(counts[i] / labels.size)
        expected_score = expected.probs[i][labels == i].mean() if counts[i] else 0.0
        assert cls["mean_score"] == pytest.approx(expected_score, rel=1e-5)
        assert cls["color"] == expected.colors[i].tolist()
    assert sum(c["area"] for c in body["classes"]) == pytest.approx(1.0)


def test_accept_png_returns_the_label_png(client, reference):
    image = make_image(1)
    response = client.post(
        URL,
        files={"image": ("in.png", encode_png(image), "image/png")},
        data={"classes": "sky, tree", "background": "wall; floor"},
        headers={"Accept": "image/png"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert json.loads(response.headers["x-classes"]) == ["sky", "tree", "background"]
    expected = reference.segment(image, "sky, tree", background="wall; floor")
    np.testing.assert_array_equal(decode_png(response.content), expected.labels)


def test_threshold_adds_a_background_class(client, reference):
    image = make_image(2)
    body = post(client, encode_png(image), "cat, dog", prob_threshold="0.9").json()
    assert [c["name"] for c in body["classes"]] == ["cat", "dog", "background"]
    assert body["background_index"] == 2 and body["settings"]["prob_threshold"] == 0.9
    expected = reference.segment(image, "cat, dog", prob_threshold=0.9)
    np.testing.assert_array_equal(decode_png(base64.b64decode(body["labels_png"])), expected.labels)


def test_other_method_is_loaded_on_demand(client):
    body = post(client, encode_png(make_image(3)), "cat, dog", method="maskclip").json()
    assert body["method"] == "maskclip"
    methods = {m["name"]: m for m in client.get("/api/v1/methods").json()["methods"]}
    assert methods["maskclip"]["status"] == "loaded"
    assert methods["maskclip"]["settings"]["short_side"] == 64  # the server's settings, not the defaults


def test_methods_and_health(client):
    body = client.get("/api/v1/methods").json()
    assert body["default"] == "sclip"
    assert [m["name"] for m in body["methods"]] == METHODS
    assert all(m["summary"] and "crop" in m["defaults"] for m in body["methods"])
    health = client.get("/health").json()
    assert health["status"] == "ok" and "sclip" in health["loaded_methods"]
    assert health["limits"]["max_classes"] == 6
    assert health["queue"]["capacity"] == 1 + 8 and health["queue"]["running"] == 0


def test_unavailable_method_is_a_422_and_the_server_stays_up(client):
    image = encode_png(make_image(4))
    for _ in range(2):  # the failure is remembered, not retried on every request
        response = post(client, image, "cat", method="proxyclip")
        assert response.status_code == 422
        assert "proxyclip" in response.json()["detail"] and "unavailable" in response.json()["detail"]
    methods = {m["name"]: m for m in client.get("/api/v1/methods").json()["methods"]}
    assert methods["proxyclip"]["status"] == "unavailable"
    assert "dino_vitb8" in methods["proxyclip"]["message"]
    assert post(client, image, "cat, dog").status_code == 200


@pytest.mark.parametrize(
    ("fields", "files", "status", "phrase"),
    [
        ({"classes": "cat"}, None, 422, "image: Field required"),
        ({}, "png", 422, "classes: Field required"),
        ({"classes": " , "}, "png", 422, "Empty class name"),
        ({"classes": "a, b, c, d, e, f, g"}, "png", 422, "at most 6"),
        ({"classes": "cat, cat"}, "png", 422, "Duplicate class name"),
        ({"classes": "cat", "method": "nope"}, "png", 422, "Unknown method 'nope'"),
        ({"classes": "cat", "prob_threshold": "1.5"}, "png", 422, "prob_threshold"),
        ({"classes": "cat", "prob_threshold": "high"}, "png", 422, "prob_threshold"),
        ({"classes": "cat"}, "text", 415, "not an image"),
        ({"classes": "cat"}, "empty", 415, "not an image"),
        ({"classes": "cat"}, "truncated", 415, "truncated"),
    ],
)
def test_bad_requests_get_a_4xx_saying_what_to_fix(client, fields, files, status, phrase):
    png = encode_png(make_image(5))
    payload = {"png": png, "text": b"hello, not an image", "empty": b"", "truncated": png[: len(png) // 2]}
    upload = {"image": ("x.png", payload[files], "image/png")} if files else None
    response = client.post(URL, data=fields, files=upload)
    assert response.status_code == status, response.text
    assert phrase in response.json()["detail"]


def test_json_body_is_told_to_use_multipart(client):
    response = client.post(URL, json={"classes": "cat"})
    assert response.status_code == 422 and "multipart/form-data" in response.json()["detail"]


def test_upload_and_pixel_limits_are_413(make_segmenter):
    small = encode_png(make_image(6))
    app = create_app(make_segmenter, ServeConfig(max_upload_bytes=len(small) + 400, max_pixels=3000), methods=["sclip"])
    big = encode_png(make_image(6, 80, 80))
    assert len(big) > len(small) + 400
    with TestClient(app) as client:
        declared = post(client, big, "cat")  # refused from Content-Length, before the body is read
        assert declared.status_code == 413
        assert f"at most {len(small) + 400:,} bytes" in declared.json()["detail"]

        boundary = "vocabseg-test-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="classes"\r\n\r\ncat\r\n--{boundary}\r\n'
                'Content-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + big
            + f"\r\n--{boundary}--\r\n".encode()
        )
        chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))  # chunked: no Content-Length
        streamed = client.post(
            URL, content=chunks, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert streamed.status_code == 413 and "Upload too large" in streamed.json()["detail"]

        pixels = post(client, small, "cat")  # 50 x 70 = 3,500 pixels > 3,000
        assert pixels.status_code == 413
        assert "3,500 pixels is above the limit of 3,000" in pixels.json()["detail"]
        assert post(client, encode_png(make_image(6, 40, 60)), "cat").status_code == 200


def test_full_queue_answers_503_with_retry_after(make_segmenter):
    gate = Gate(make_segmenter("sclip"))
    app = create_app(lambda method: gate, ServeConfig(workers=1, queue_size=1), methods=["sclip"])
    image = encode_png(make_image(7))
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, client, image, "cat, dog")
        assert gate.entered.wait(30)
        second = pool.submit(post, client, image, "cat, dog")  # waits in the queue
        engine = app.state.engine
        deadline = time.monotonic() + 30
        while engine.queue.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        expected = {"workers": 1, "capacity": 2, "running": 1, "waiting": 1, "completed": 0, "dropped": 0}
        assert engine.queue.stats() == expected

        refused = post(client, image, "cat, dog")
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "busy" in refused.json()["detail"]

        gate.release.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
        assert post(client, image, "cat").status_code == 200
        assert engine.queue.stats()["completed"] == 3


def test_concurrent_requests_are_all_answered_correctly(make_segmenter, reference):
    app = create_app(make_segmenter, ServeConfig(workers=2, queue_size=16), methods=["sclip"])
    jobs = [
        (make_image(10 + i, 40 + 4 * i, 50 + 3 * i), ["cat, dog", "sky, tree, road", "a; b, c"][i % 3])
        for i in range(8)
    ]
    with TestClient(app) as client, ThreadPoolExecutor(8) as pool:
        start = threading.Barrier(8)

        def run(job):
            start.wait()
            return post(client, encode_png(job[0]), job[1])

        responses = list(pool.map(run, jobs))
    for (image, classes), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        expected = reference.segment(image, classes)
        labels = decode_png(base64.b64decode(response.json()["labels_png"]))
        np.testing.assert_array_equal(labels, expected.labels)
        assert [c["name"] for c in response.json()["classes"]] == expected.classes


def test_openapi_schema_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    post_op = schema["paths"]["/api/v1/segment"]["post"]
    assert {"413", "415", "422", "500", "503", "504"} <= set(post_op["responses"])
    assert "image/png" in post_op["responses"]["200"]["content"]
    form_ref = post_op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    fields = schema["components"]["schemas"][form_ref]["properties"]
    assert {"image", "classes", "method", "background", "prob_threshold"} <= set(fields)
    assert "/api/v1/methods" in schema["paths"] and "/health" in schema["paths"]
