"""A real browser against a real ``vocabseg serve`` process: upload, type, click, read the result.

Uses Debian's chromium (``apt-get install chromium``) driven by the playwright package; skipped when
either is missing, except on CI (the ``CI`` environment variable set, as ``.ci/run`` does), where a
missing browser fails the tests instead of hiding them behind a skip. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from PIL import Image

from .helpers import SETTINGS, make_image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CLASSES = ["cat", "dog", "car"]
MASK_ALPHA_IS = """alpha => [...document.querySelectorAll('#vs-result img.mask')].every(m => {
  if (!m.complete || !m.naturalWidth) return false;
  const c = document.createElement('canvas'); c.width = m.naturalWidth; c.height = m.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(m, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let top = 0; for (let i = 3; i < d.length; i += 4) top = Math.max(top, d[i]);
  return top === alpha;
})"""
WAIT_MS = 60_000

pytest.importorskip("gradio", reason="the web extra is not installed: pip install 'vocabseg[web]'")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the `browser` fixture: a skip, or a failure on CI
    expect = sync_playwright = None

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_clip_dir, tmp_path_factory):
    """``vocabseg serve`` on a free loopback port with the tiny model; yields its base URL."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(folder / "gradio"),
        "VOCABSEG_CACHE": str(folder / "cache"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    command = [sys.executable, "-m", "vocabseg", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--method", "sclip", "--methods", "sclip", "proxyclip", "--model", f"local-dir:{tiny_clip_dir}"]
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(command + settings, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{(folder / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server did not start:\n{(folder / 'server.log').read_text()}")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip where the browser is optional; on CI fail, so a broken install cannot pass as green."""
    if on_ci():
        pytest.fail(f"{reason}; CI={os.environ['CI']!r} requires the browser test to run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page per test, so that no test sees what another one selected or typed."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server + "/", wait_until="load")  # not "networkidle": gradio keeps a heartbeat open
    page.wait_for_selector("#vs-segment")
    yield page
    context.close()


def uniform_pixels(labels: np.ndarray, radius: int = 3) -> dict[int, tuple[int, int]]:
    """For each label, a pixel whose (2r+1)^2 neighbourhood has only that label (hovering it cannot hit a border)."""
    found: dict[int, tuple[int, int]] = {}
    h, w = labels.shape
    for y in range(radius, h - radius):
        for x in range(radius, w - radius):
            label = int(labels[y, x])
            if label not in found and (labels[y - radius : y + radius + 1, x - radius : x + radius + 1] == label).all():
                found[label] = (y, x)
    return found


def test_upload_type_segment_and_read_the_legend(page, server, tmp_path):
    image = np.kron(make_image(30, 30, 40), np.ones((4, 4, 1), np.uint8))  # 120 x 160, large flat blocks
    upload = tmp_path / "upload.png"
    Image.fromarray(image).save(upload)

    page.locator('#vs-image input[type="file"]').set_input_files(str(upload))
    page.locator("#vs-classes textarea").fill("cat, dog; puppy, car")
    page.get_by_role("button", name="Segment").click()
    page.wait_for_selector("#vs-result img.mask")
    page.wait_for_selector('#vs-files a[download="labels.png"]')

    rows = page.locator("#vs-legend tr[data-class]")
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.class)")) == sorted(CLASSES)
    areas = rows.evaluate_all("rows => rows.map(r => parseFloat(r.dataset.area))")
    assert sum(areas) == pytest.approx(100, abs=0.3)
    chips = page.locator("#vs-result .legend-item").all_inner_texts()
    assert chips and set(chips) <= set(CLASSES)
    assert "Segmented 160x120 with sclip" in page.locator("#vs-status").inner_text()

    href = page.locator('#vs-files a[download="labels.png"]').get_attribute("href")
    labels = np.asarray(Image.open(io.BytesIO(page.request.get(href).body())))
    assert labels.shape == (120, 160)
    shown = [CLASSES[i] for i in np.unique(labels)]
    assert sorted(chips) == sorted(shown)

    box = page.locator("#vs-result img.base-image").bounding_box()
    tooltip = page.locator("#vs-tooltip")
    targets = uniform_pixels(labels)
    assert targets
    for label, (y, x) in targets.items():  # hovering a region names its class
        page.mouse.move(box["x"] + (x + 0.5) * box["width"] / 160, box["y"] + (y + 0.5) * box["height"] / 120)
        expect(tooltip).to_have_text(re.compile(rf"^{CLASSES[label]}\s+\d+\.\d%$"))

    page.wait_for_function(MASK_ALPHA_IS, arg=round(0.6 * 255))  # the default opacity
    page.locator('#vs-opacity input[type="number"]').fill("0.3")
    page.locator('#vs-opacity input[type="number"]').press("Enter")
    page.wait_for_function(MASK_ALPHA_IS, arg=round(0.3 * 255))  # every mask redrawn at the new opacity

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    if os.environ.get("VOCABSEG_SCREENSHOT"):  # docs/images/web_page.png is made this way
        shutil.copy(tmp_path / "page.png", os.environ["VOCABSEG_SCREENSHOT"])


def test_errors_show_on_the_page_and_the_server_stays_up(page, server, tmp_path):
    upload = tmp_path / "upload.png"
    Image.fromarray(make_image(31)).save(upload)
    page.locator('#vs-image input[type="file"]').set_input_files(str(upload))
    page.locator("#vs-classes textarea").fill("")
    page.get_by_role("button", name="Segment").click()
    page.wait_for_selector('#vs-status :text("Error")')
    assert "The class list is empty" in page.locator("#vs-status").inner_text()

    page.locator("#vs-method input").click()
    page.get_by_role("option", name="proxyclip", exact=True).click()
    page.locator("#vs-classes textarea").fill("cat, dog")
    page.get_by_role("button", name="Segment").click()
    page.wait_for_selector('#vs-status :text("unavailable")')
    assert "dino_vitb8" in page.locator("#vs-status").inner_text()
    page.locator("#vs-method input").click()
    assert "proxyclip (unavailable)" in page.get_by_role("option").all_inner_texts()[-1]
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert response.status == 200
