"""The page's actions, called directly (the browser test drives them through a real page)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'vocabseg[web]'")
pytest.importorskip("gradio", reason="the web extra is not installed: pip install 'vocabseg[web]'")

from fastapi.testclient import TestClient  # noqa: E402

from vocabseg.serve import ServeConfig, create_app  # noqa: E402
from vocabseg.serve.engine import Engine, SegmenterPool  # noqa: E402
from vocabseg.serve.page import PageActions, ResultView, ScratchDir, legend_html, load_examples  # noqa: E402

from .helpers import make_image  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:gradio.helpers")  # gr.Warning outside an event


@pytest.fixture()
def actions(make_segmenter, tmp_path):
    config = ServeConfig(default_method="sclip", max_pixels=10_000)
    scratch = ScratchDir(keep_seconds=60)
    yield PageActions(Engine(SegmenterPool(make_segmenter, ["sclip", "proxyclip"]), config), scratch)
    scratch.cleanup()


def segment(actions: PageActions, *args):
    """The page's Segment action, run as gradio runs it (a coroutine on an event loop)."""
    return asyncio.run(actions.segment(*args))


def image_file(tmp_path: Path, array: np.ndarray, name: str = "in.png") -> str:
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return str(path)


def test_segment_shows_masks_legend_and_downloads(actions, reference, tmp_path):
    image = make_image(20)
    annotated, legend, files, view, status, picker, note = segment(
        actions, image_file(tmp_path, image), "cat, dog; puppy, car", "sclip", 0.0, "", 0.5
    )
    expected = reference.segment(image, "cat, dog; puppy, car")
    assert status == "Segmented 70x50 with sclip."
    np.testing.assert_array_equal(view.labels, expected.labels)

    base, masks = annotated["value"]
    np.testing.assert_array_equal(base, image)
    present = [s for s in expected.class_stats() if s["pixels"]]
    assert [name for _, name in masks] == [s["name"] for s in present]
    for (mask, _), s in zip(masks, present):
        np.testing.assert_array_equal(mask, (expected.labels == s["index"]) * np.float32(0.5))
    assert annotated["color_map"] == {s["name"]: "#{:02x}{:02x}{:02x}".format(*s["color"]) for s in present}

    for s in expected.class_stats():  # every typed class is listed, with its area, even at 0 pixels
        assert f'data-class="{s["name"]}" data-area="{100 * s["area"]:.1f}%"' in legend

    labels_png, overlay_png, json_file = map(Path, files)
    assert [p.name for p in (labels_png, overlay_png, json_file)] == ["labels.png", "overlay.png", "segmentation.json"]
    np.testing.assert_array_equal(np.asarray(Image.open(labels_png)), expected.labels)
    np.testing.assert_array_equal(np.asarray(Image.open(overlay_png)), np.asarray(expected.overlay_image()))
    stats = json.loads(json_file.read_text())["classes"]
    assert [c["pixels"] for c in stats] == [s["pixels"] for s in expected.class_stats()]
    assert picker["choices"] == [("sclip", "sclip"), ("proxyclip", "proxyclip")]
    assert note.endswith("(model custom)")  # the tiny model object has no name


@pytest.mark.parametrize(
    ("case", "classes", "phrase"),
    [
        ("none", "cat", "Upload an image first"),
        ("ok", "", "The class list is empty"),
        ("ok", "cat,, dog", "Empty class name"),
        ("text", "cat", "not an image"),
        ("large", "cat", "above the limit of 10,000 pixels"),
    ],
)
def test_errors_are_messages_on_the_page(actions, tmp_path, case, classes, phrase):
    paths = {
        "none": None,
        "ok": image_file(tmp_path, make_image(21)),
        "large": image_file(tmp_path, make_image(21, 120, 100)),
        "text": str(tmp_path / "notes.png"),
    }
    (tmp_path / "notes.png").write_text("not an image")
    annotated, legend, files, view, status, _, _ = segment(actions, paths[case], classes, "sclip", 0.0, "", 0.6)
    assert status.startswith("**Error:**") and phrase in status
    assert str(tmp_path) not in status  # server-side paths are not shown, only the file's name
    assert (annotated, legend, files, view) == (None, "", None, None)


def test_unavailable_method_is_marked_in_the_picker(actions, tmp_path):
    path = image_file(tmp_path, make_image(22))
    *_, status, picker, note = segment(actions, path, "cat", "proxyclip", 0.0, "", 0.6)
    assert "proxyclip" in status and "unavailable" in status
    assert ("proxyclip (unavailable)", "proxyclip") in picker["choices"]
    assert "unavailable on this server" in note and "dino_vitb8" in note
    assert actions.refresh()[0]["choices"] == picker["choices"]
    assert segment(actions, path, "cat, dog", "sclip", 0.0, "", 0.6)[4].startswith("Segmented")


def test_background_options_and_opacity(actions, reference, tmp_path):
    image = make_image(23)
    outputs = segment(actions, image_file(tmp_path, image), "cat, dog", "sclip", 0.8, "sky; wall", 0.6)
    view = outputs[3]
    expected = reference.segment(image, "cat, dog", background="sky; wall", prob_threshold=0.8)
    np.testing.assert_array_equal(view.labels, expected.labels)
    assert [s["name"] for s in view.stats] == ["cat", "dog", "background"]

    redrawn = actions.redraw(view, 0.25)
    for mask, name in redrawn["value"][1]:
        index = [s["name"] for s in view.stats].index(name)
        np.testing.assert_array_equal(mask, (view.labels == index) * np.float32(0.25))
    assert actions.redraw(None, 0.25) == {"__type__": "update"}  # nothing to redraw: leave the output as is
    note, threshold = actions.pick_method("maskclip")
    assert threshold["value"] == 0.0 and "loads on first use" in note


def test_large_results_are_shrunk_for_display_only(reference):
    result = reference.segment(make_image(25, 60, 90), "cat, dog")
    view = ResultView.of(result, max_side=30)
    assert view.labels.shape == (20, 30) and view.image.shape == (20, 30, 3)
    np.testing.assert_array_equal(view.labels, result.labels[::3, ::3])  # nearest: every third pixel
    assert view.stats == result.class_stats()  # areas are those of the full-size label map


def test_legend_escapes_class_names():
    view = ResultView(
        np.zeros((2, 2, 3), np.uint8),
        np.zeros((2, 2), np.uint16),
        [{"index": 0, "name": "<b>x</b>", "color": [1, 2, 3], "pixels": 4, "area": 1.0, "mean_score": 0.5}],
    )
    html = legend_html(view)
    assert "<b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html and "#010203" in html and "100.0%" in html


def test_scratch_folders_expire(tmp_path):
    scratch = ScratchDir(keep_seconds=60)
    old = scratch.new_folder()
    (old / "labels.png").write_bytes(b"x")
    past = time.time() - 120
    os.utime(old, (past, past))
    new = scratch.new_folder()
    assert not old.exists() and new.is_dir() and new.parent == old.parent
    scratch.cleanup()
    assert not new.parent.exists()


def test_examples(tmp_path):
    bundled = load_examples(None)
    assert len(bundled) >= 2 and all(Path(p).is_file() and classes for p, classes in bundled)
    Image.fromarray(make_image(24)).save(tmp_path / "a.png")
    (tmp_path / "b.txt").write_text("not an example")
    (tmp_path / "examples.json").write_text(json.dumps({"a.png": "cat, dog"}))
    assert load_examples(tmp_path) == [[str(tmp_path / "a.png"), "cat, dog"]]
    assert load_examples(tmp_path / "missing") == []


def test_page_is_served_at_the_root(make_segmenter):
    app = create_app(make_segmenter, ServeConfig(default_method="sclip"), methods=["sclip", "maskclip"])
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "vs-tooltip" in page.text  # the hover script is in the page head
        config = client.get("/config").json()
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"vs-image", "vs-classes", "vs-method", "vs-segment", "vs-result", "vs-legend", "vs-files"} <= ids
        dropdown = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "vs-method")
        assert [choice[1] for choice in dropdown["props"]["choices"]] == ["sclip", "maskclip"]
        assert client.get("/api/v1/methods").status_code == 200  # the API is not shadowed by the page
