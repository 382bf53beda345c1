"""The Gradio page: upload an image, type the classes, see the segmentation.

Every action goes through the same :class:`Engine` as the REST API (same models, same queue). Errors a
person can cause (no image, empty classes, an unreadable or too large file, an unavailable method) are
shown as a message on the page; the server carries on.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..errors import VocabsegError
from ..methods import get_method_spec
from ..result import SegmentationResult
from .api import labels_png
from .engine import Engine, ServiceError

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
DISPLAY_MAX_SIDE = 1600  # the annotated image is drawn at most this large (downloads keep full size)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Hovering the annotated image shows the class under the pointer: the mask images gradio draws are read
# back once into canvases, and the mask whose pixel is opaque names the class (masks are exclusive).
HEAD = """<script>
(() => {
  const cache = new Map();
  function alphaAt(img, fx, fy) {
    if (!img.complete || !img.naturalWidth) return 0;
    let data = cache.get(img.src);
    if (!data) {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0);
      data = ctx.getImageData(0, 0, canvas.width, canvas.height);
      cache.set(img.src, data);
      if (cache.size > 64) cache.delete(cache.keys().next().value);
    }
    const x = Math.min(data.width - 1, Math.floor(fx * data.width));
    const y = Math.min(data.height - 1, Math.floor(fy * data.height));
    return data.data[(y * data.width + x) * 4 + 3];
  }
  document.addEventListener("mousemove", (event) => {
    let tip = document.getElementById("vs-tooltip");
    if (!tip) {
      tip = document.createElement("div"); tip.id = "vs-tooltip"; tip.setAttribute("role", "tooltip");
      document.body.appendChild(tip);
    }
    const box = event.target.closest && event.target.closest("#vs-result .image-container");
    const base = box && box.querySelector("img.base-image");
    let text = null;
    if (base) {
      const r = base.getBoundingClientRect();
      const fx = (event.clientX - r.left) / r.width, fy = (event.clientY - r.top) / r.height;
      if (fx >= 0 && fy >= 0 && fx < 1 && fy < 1) {
        const names = [...document.querySelectorAll("#vs-result .legend-item")].map((b) => b.textContent.trim());
        box.querySelectorAll("img.mask").forEach((mask, i) => {
          if (text === null && alphaAt(mask, fx, fy) > 0) text = names[i] || null;
        });
        const rows = [...document.querySelectorAll("#vs-legend tr[data-class]")];
        const row = text && rows.find((tr) => tr.dataset.class === text);
        if (row) text += "  " + row.dataset.area;
      }
    }
    tip.style.display = text ? "block" : "none";
    if (text) {
      tip.textContent = text;
      tip.style.left = event.pageX + 14 + "px"; tip.style.top = event.pageY + 14 + "px";
    }
  });
})();
</script>"""

CSS = """
#vs-tooltip { position: absolute; z-index: 1000; display: none; pointer-events: none; padding: 2px 8px;
  border-radius: 4px; background: rgba(20, 20, 20, 0.85); color: white; font-size: 14px; }
.vs-legend { border-collapse: collapse; width: 100%; }
.vs-legend td, .vs-legend th { padding: 3px 8px; text-align: left; }
.vs-swatch { display: inline-block; width: 16px; height: 16px; border: 1px solid #444; vertical-align: middle; }
"""


@dataclass
class ResultView:
    """What the page keeps per visitor to redraw at another opacity (no probabilities: they are big)."""

    image: np.ndarray
    labels: np.ndarray
    stats: list[dict[str, Any]]

    @classmethod
    def of(cls, result: SegmentationResult, max_side: int = DISPLAY_MAX_SIDE) -> ResultView:
        """Shrunk to ``max_side`` for display (one mask per class is sent to the browser); the stats
        and the downloads stay at full resolution."""
        image, labels = result.image, result.labels.astype(np.uint16)
        h, w = labels.shape
        if max(h, w) > max_side:
            scale = max_side / max(h, w)
            size = (max(round(w * scale), 1), max(round(h * scale), 1))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
            rows = (np.arange(size[1]) * h // size[1]).clip(0, h - 1)
            cols = (np.arange(size[0]) * w // size[0]).clip(0, w - 1)
            labels = labels[rows][:, cols]
        return cls(image, labels, result.class_stats())


def _hex(color: list[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def annotated_value(view: ResultView, opacity: float) -> dict[str, Any]:
    """An update of the annotated image: one mask per class present, drawn at ``opacity``.

    (``gr.update`` and not a component: a component would encode every mask twice.)
    """
    present = [s for s in view.stats if s["pixels"] > 0]
    masks = [((view.labels == s["index"]).astype(np.float32) * opacity, s["name"]) for s in present]
    return gr.update(value=(view.image, masks), color_map={s["name"]: _hex(s["color"]) for s in present})


def legend_html(view: ResultView) -> str:
    """Every class typed, with its colour, area and mean score (largest first)."""
    rows = []
    for s in sorted(view.stats, key=lambda s: -s["pixels"]):
        name, area = html.escape(s["name"]), f"{100 * s['area']:.1f}%"
        rows.append(
            f'<tr data-class="{name}" data-area="{area}"><td><span class="vs-swatch" '
            f'style="background:{_hex(s["color"])}"></span></td><td>{name}</td><td>{area}</td>'
            f"<td>{s['mean_score']:.2f}</td></tr>"
        )
    head = "<tr><th></th><th>class</th><th>area</th><th>mean score</th></tr>"
    return f'<table class="vs-legend">{head}{"".join(rows)}</table>'


class ScratchDir:
    """The page's result files (downloads), one folder per request, removed after ``keep_seconds``."""

    def __init__(self, keep_seconds: int):
        self.keep_seconds = keep_seconds
        self.root: Path | None = None

    def new_folder(self) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="vocabseg-serve-"))
        cutoff = time.time() - self.keep_seconds
        for old in self.root.iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def write_downloads(result: SegmentationResult, folder: Path) -> list[str]:
    """labels.png (class indices), overlay.png and segmentation.json, for the Downloads box."""
    paths = [folder / "labels.png", folder / "overlay.png", folder / "segmentation.json"]
    paths[0].write_bytes(labels_png(result))
    result.overlay_image().save(paths[1], format="PNG")
    paths[2].write_text(json.dumps(result.to_json(), indent=2))
    return [str(p) for p in paths]


def load_examples(folder: Path | None) -> list[list[str]]:
    """[image path, classes] pairs: the images in ``folder`` and their classes from ``examples.json``."""
    folder = Path(folder) if folder is not None else EXAMPLES_DIR
    if not folder.is_dir():
        return []
    index = folder / "examples.json"
    classes = json.loads(index.read_text()) if index.is_file() else {}
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [[str(p), classes.get(p.name, "")] for p in images]


def method_choices(engine: Engine) -> list[tuple[str, str]]:
    return [(f"{m} (unavailable)" if engine.pool.status(m)[0] == "unavailable" else m, m) for m in engine.pool.methods]


def method_note(engine: Engine, method: str | None) -> str:
    method = method or engine.default_method
    status, message = engine.pool.status(method)
    summary = get_method_spec(method).summary
    if status == "unavailable":
        return f"**{method} is unavailable on this server:** {html.escape(message or '')}"
    loaded = engine.pool.loaded(method)
    return f"{summary} ({f'model {loaded.clip.name}' if loaded is not None else 'loads on first use'})"


class PageActions:
    """What the page's events do; plain methods, so tests can call them without a browser."""

    def __init__(self, engine: Engine, scratch: ScratchDir):
        self.engine = engine
        self.scratch = scratch

    def method_update(self) -> dict[str, Any]:
        return gr.update(choices=method_choices(self.engine))

    async def segment(
        self, path: str | None, classes: str, method: str | None, prob: float, names: str, opacity: float
    ) -> tuple[Any, ...]:
        """-> annotated image, legend, downloads, state, status message, method picker, method note."""
        method = method or self.engine.default_method
        if not path:
            message = "Upload an image first (drag and drop, paste, or pick an example)."
        else:
            try:
                result = await self.engine.run(path, classes, method=method, background=names, prob_threshold=prob)
                return await run_in_threadpool(self._show, result, method, opacity)
            except (VocabsegError, ServiceError) as exc:
                message = str(exc).replace(str(path), Path(path).name)  # gradio's cache path means nothing to users
            except Exception as exc:
                log.exception("segmentation from the page failed")
                message = f"Internal server error ({type(exc).__name__}); the server log has the details."
        gr.Warning(message)
        error = f"**Error:** {html.escape(message)}"
        return None, "", None, None, error, self.method_update(), method_note(self.engine, method)

    def _show(self, result: SegmentationResult, method: str, opacity: float) -> tuple[Any, ...]:
        view = ResultView.of(result)
        height, width = result.labels.shape
        return (
            annotated_value(view, opacity),
            legend_html(view),
            write_downloads(result, self.scratch.new_folder()),
            view,
            f"Segmented {width}x{height} with {method}.",
            self.method_update(),
            method_note(self.engine, method),
        )

    def redraw(self, view: ResultView | None, opacity: float) -> Any:
        return annotated_value(view, opacity) if view is not None else gr.skip()

    def pick_method(self, method: str | None) -> tuple[str, dict[str, Any]]:
        """Describe the chosen method and reset the threshold to its published default."""
        method = method or self.engine.default_method
        return method_note(self.engine, method), gr.update(value=get_method_spec(method).defaults.prob_threshold)

    def refresh(self) -> tuple[dict[str, Any], str]:
        """On page load: mark methods that failed to load since the server started."""
        return self.method_update(), method_note(self.engine, self.engine.default_method)


def build_page(engine: Engine, scratch: ScratchDir) -> gr.Blocks:
    """The Blocks of the page, bound to ``engine``."""
    config = engine.config
    actions = PageActions(engine, scratch)
    examples = load_examples(config.examples_dir)
    default_threshold = get_method_spec(engine.default_method).defaults.prob_threshold

    with gr.Blocks(title=config.title, delete_cache=(config.keep_seconds, config.keep_seconds)) as demo:
        gr.Markdown(
            f"## {html.escape(config.title)}\nUpload, drop or paste an image, type the classes to find, "
            "press **Segment**. Classes are separated by `,` and synonyms of one class by `;` "
            "(`person; man, car, road`). REST API: [`/openapi.json`](/openapi.json)."
        )
        view = gr.State(None, time_to_live=config.keep_seconds)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image", elem_id="vs-image")
                classes = gr.Textbox(
                    label="Classes", placeholder="person; man, car, road", elem_id="vs-classes", max_lines=3
                )
                method = gr.Dropdown(
                    method_choices(engine), value=engine.default_method, label="Method", elem_id="vs-method"
                )
                note = gr.Markdown(method_note(engine, engine.default_method), elem_id="vs-method-note")
                with gr.Accordion("Background", open=False):
                    threshold = gr.Slider(
                        0.0,
                        1.0,
                        value=default_threshold,
                        step=0.05,
                        label="Probability threshold",
                        info="pixels whose best class probability is below it become background (0: off)",
                    )
                    background = gr.Textbox(label="Background names", placeholder="sky; wall; floor")
                button = gr.Button("Segment", variant="primary", elem_id="vs-segment")
                if examples:
                    gr.Examples(examples, inputs=[image, classes], label="Examples")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="vs-status")
                annotated = gr.AnnotatedImage(label="Segmentation", elem_id="vs-result")
                opacity = gr.Slider(0.1, 1.0, value=0.6, step=0.05, label="Opacity", elem_id="vs-opacity")
                legend = gr.HTML(elem_id="vs-legend")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="vs-files")

        inputs = [image, classes, method, threshold, background, opacity]
        outputs = [annotated, legend, files, view, status, method, note]
        for trigger in (button.click, classes.submit):
            trigger(actions.segment, inputs, outputs, api_visibility="private", concurrency_limit=config.workers)
        opacity.change(actions.redraw, [view, opacity], annotated, api_visibility="private", trigger_mode="always_last")
        method.input(actions.pick_method, method, [note, threshold], api_visibility="private")
        demo.load(actions.refresh, None, [method, note], api_visibility="private")
    demo.queue(max_size=config.queue_size + config.workers)
    return demo
