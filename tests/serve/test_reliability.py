"""The server under abuse and failure: name limits, the time limit, clients that leave, shutdown on
SIGTERM, wrong methods, bad flags and unexpected errors: every answer is JSON saying what happened."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'vocabseg[web]'")
pytest.importorskip("gradio", reason="the web extra is not installed: pip install 'vocabseg[web]'")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from vocabseg.cli.main import main  # noqa: E402
from vocabseg.errors import SegmentationFailedError, SettingsError  # noqa: E402
from vocabseg.serve import ServeConfig, create_app  # noqa: E402
from vocabseg.serve.engine import Engine, SegmenterPool  # noqa: E402
from vocabseg.serve.page import PageActions, ScratchDir  # noqa: E402

from .helpers import SETTINGS, Gate, encode_png, make_image  # noqa: E402

URL = "/api/v1/segment"
IMAGE = encode_png(make_image(30))


def post(client, classes: str, **fields):
    return client.post(URL, files={"image": ("in.png", IMAGE, "image/png")}, data={"classes": classes, **fields})


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Failing:
    """A segmenter whose segmentation raises ``error`` (everything else is the real one's)."""

    def __init__(self, segmenter, error: Exception):
        self._segmenter, self.error = segmenter, error

    def __getattr__(self, name: str):
        return getattr(self._segmenter, name)

    def segment_many(self, *args, **kwargs):
        raise self.error


# -- limits on the names --------------------------------------------------------------------------------


def test_total_names_are_limited_synonyms_and_background_included(make_segmenter):
    app = create_app(make_segmenter, ServeConfig(max_classes=100, max_names=5), methods=["sclip"])
    with TestClient(app) as client:
        assert client.get("/health").json()["limits"]["max_names"] == 5
        for classes, background in [("a; b; c, d; e; f", None), ("cat, dog, car", "sky; wall; floor")]:
            response = post(client, classes, **({"background": background} if background else {}))
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert detail == (
                "6 names given (classes, their ';' synonyms and background names); "
                "this server accepts at most 5 per request."
            )
        body = post(client, "cat; kitten, dog", background="sky; wall").json()  # exactly 5 names
        assert [c["name"] for c in body["classes"]] == ["cat", "dog", "background"]


def test_long_names_are_refused(make_segmenter):
    app = create_app(make_segmenter, ServeConfig(max_name_chars=10), methods=["sclip"])
    with TestClient(app) as client:
        assert client.get("/health").json()["limits"]["max_name_chars"] == 10
        response = post(client, "cat, dog; abcdefghijk")
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert (
            detail
            == "The name 'abcdefghijk' is 11 characters long; this server accepts names of at most 10 characters."
        )
        assert post(client, "cat", background="x" * 45).json()["detail"].startswith(f"The name '{'x' * 40}...' is 45")
        assert post(client, "cat, abcdefghij").status_code == 200


def test_default_limits_refuse_the_many_synonyms_case(make_segmenter):
    """100 classes of 50 synonyms each passed --max-classes but meant 5,000 names to encode."""
    app = create_app(make_segmenter, ServeConfig(), methods=["sclip"])
    classes = ", ".join("; ".join(f"c{i}s{j}" for j in range(50)) for i in range(100))
    with TestClient(app) as client:
        response = post(client, classes)
    assert response.status_code == 422
    assert (
        response.json()["detail"].startswith("5000 names given")
        and "at most 200 per request" in response.json()["detail"]
    )


# -- the time limit and the queue ---------------------------------------------------------------------------


def test_time_limit_answers_504_and_keeps_the_queue_accounting(make_segmenter):
    gate = Gate(make_segmenter("sclip"))
    app = create_app(lambda method: gate, ServeConfig(workers=1, queue_size=1, request_timeout=2), methods=["sclip"])
    engine = app.state.engine
    with TestClient(app) as client:
        running = post(client, "cat, dog")  # reaches the worker, which blocks in the gate
        assert running.status_code == 504
        assert running.json()["detail"] == (
            "The segmentation did not finish within this server's limit of 2 s per request "
            "(fewer classes or synonyms, or a smaller image, take less time)."
        )
        waiting = post(client, "cat, dog")  # waits for the worker the first one still holds
        assert waiting.status_code == 504
        assert waiting.json()["detail"] == (
            "The request waited 2 s (this server's limit per request) without reaching a worker: "
            "the server is busy; retry later."
        )
        # both still hold their queue place: the computation goes on, the second is still queued
        assert engine.queue.stats() == {
            "workers": 1,
            "capacity": 2,
            "running": 1,
            "waiting": 1,
            "completed": 0,
            "dropped": 0,
        }
        assert post(client, "cat").status_code == 503  # so the queue is full

        gate.release.set()
        wait_for(lambda: engine.queue.stats()["completed"] + engine.queue.stats()["dropped"] == 2, "the queue to drain")
        stats = engine.queue.stats()
        assert (stats["running"], stats["waiting"], stats["completed"], stats["dropped"]) == (0, 0, 1, 1)
        assert gate.calls == 1  # the request that timed out while waiting never ran
        assert post(client, "cat, dog").status_code == 200
        assert gate.calls == 2


def test_disconnected_client_is_dropped_before_its_turn(make_segmenter, caplog):
    """A real uvicorn server and a real socket that closes while its request waits for the worker."""
    caplog.set_level(logging.INFO, logger="vocabseg.serve.engine")
    gate = Gate(make_segmenter("sclip"))
    app = create_app(lambda method: gate, ServeConfig(workers=1, queue_size=2), methods=["sclip"])
    engine = app.state.engine
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started, "the server to start", 60)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                httpx.post, base + URL, files={"image": ("a.png", IMAGE)}, data={"classes": "cat"}, timeout=60
            )
            assert gate.entered.wait(30)

            request = httpx.Request("POST", base + URL, files={"image": ("b.png", IMAGE)}, data={"classes": "dog"})
            body = request.read()
            head = f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host"
            )
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(head.encode() + b"\r\n" + body)
                wait_for(lambda: engine.queue.stats()["waiting"] == 1, "the second request to wait")
            # the client is gone; the server notices while the request still waits for the worker
            wait_for(lambda: "client disconnected; its request is dropped" in caplog.text, "the disconnect")

            gate.release.set()
            assert first.result(60).status_code == 200
        wait_for(lambda: engine.queue.stats()["dropped"] == 1, "the second request to be dropped")
        assert gate.calls == 1
        stats = engine.queue.stats()
        assert (stats["running"], stats["waiting"], stats["completed"]) == (0, 0, 1)
    finally:
        gate.release.set()
        server.should_exit = True
        thread.join(30)


# -- shutdown ------------------------------------------------------------------------------------------------

SLOW_SERVE = """
import sys, time
from vocabseg.segmenter import Segmenter

def segment_many(self, *args, **kwargs):  # a segmentation far longer than the grace period
    time.sleep(600)

Segmenter.segment_many = segment_many
from vocabseg.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_the_server_within_the_grace_period(tiny_clip_dir, tmp_path):
    """A real ``vocabseg serve`` whose one running request would take 10 minutes."""
    grace, port = 2, free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
        "VOCABSEG_CACHE": str(tmp_path / "cache"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    command = [sys.executable, "-c", SLOW_SERVE, "serve", "--method", "sclip", "--methods", "sclip"]
    command += ["--model", f"local-dir:{tiny_clip_dir}", "--port", str(port), "--shutdown-grace", str(grace)]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def health():
        try:
            return httpx.get(base + "/health", timeout=5).json()
        except httpx.HTTPError:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()}"
            return None

    try:
        wait_for(lambda: health() is not None, "the server to start", 120)
        with ThreadPoolExecutor(2) as pool:

            def send(name: str):
                return httpx.post(base + URL, files={"image": (name, IMAGE)}, data={"classes": "cat"}, timeout=60)

            running = pool.submit(send, "a.png")
            wait_for(lambda: health()["queue"]["running"] == 1, "the first request to run")
            waiting = pool.submit(send, "b.png")
            wait_for(lambda: health()["queue"]["waiting"] == 1, "the second request to wait")

            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answer = waiting.result(30)  # answered at once: it had not started
            assert time.monotonic() - start < grace
            assert answer.status_code == 503
            assert answer.json() == {"detail": "The server is shutting down; the request was not started."}

            answer = running.result(30)  # answered at the end of the grace period
            assert answer.status_code == 503
            assert answer.json()["detail"] == (
                f"The server is shutting down; the segmentation did not finish within its {grace} s grace period."
            )
            process.wait(grace + 5)
            elapsed = time.monotonic() - start
        assert grace <= elapsed < grace + 5
        assert process.returncode == -signal.SIGTERM  # uvicorn ends by re-raising the signal
        assert "exiting now" not in log.read_text()  # stopped by itself, not by the watchdog
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- HTTP details --------------------------------------------------------------------------------------------


def test_wrong_method_is_405_with_allow(make_segmenter):
    app = create_app(make_segmenter, ServeConfig(), methods=["sclip"])
    with TestClient(app) as client:
        response = client.get(URL)
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert response.json() == {"detail": "Method GET is not allowed on /api/v1/segment; use POST."}
        response = client.delete("/health")
        assert response.status_code == 405 and response.headers["allow"] == "GET"
        response = client.put("/api/v1/methods")
        assert response.status_code == 405 and response.headers["allow"] == "GET"
        assert client.get("/api/v1/nothing-here").status_code == 404
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_empty_classes_say_the_list_is_empty(make_segmenter):
    app = create_app(make_segmenter, ServeConfig(), methods=["sclip"])
    with TestClient(app) as client:
        response = post(client, "")
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert detail == "Invalid request: classes: the class list is empty; give class names like 'cat, dog; puppy'."
        missing = client.post(URL, files={"image": ("in.png", IMAGE, "image/png")})
        assert missing.json()["detail"] == "Invalid request: classes: Field required."
        blank = post(client, "   ")  # not empty to FastAPI: the vocabulary says it
        assert blank.status_code == 422 and blank.json()["detail"].startswith("The class list is empty")


def test_unexpected_errors_are_a_json_500_and_user_errors_a_json_4xx(make_segmenter, tmp_path, caplog):
    boom = Failing(make_segmenter("sclip"), RuntimeError("boom in /secret/path"))
    app = create_app(lambda method: boom, ServeConfig(), methods=["sclip"])
    with TestClient(app) as client:
        response = post(client, "cat")
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        assert response.json() == {"detail": "Internal server error (RuntimeError); the server log has the details."}
        assert "boom in /secret/path" in caplog.text  # the details are in the log only

        boom.error = SegmentationFailedError("in.png: segmentation failed (ZeroDivisionError: x)")
        boom.error.__cause__ = ZeroDivisionError("x")
        response = post(client, "cat")  # a user-error type, but it stands for an unexpected failure
        assert response.status_code == 500
        assert response.json() == {
            "detail": "Internal server error (ZeroDivisionError); the server log has the details."
        }

        boom.error = SettingsError("crop (--crop) must be at least 1, got 0")
        response = post(client, "cat")
        assert response.status_code == 422
        assert response.json() == {"detail": "crop (--crop) must be at least 1, got 0"}
        assert client.get("/health").json()["queue"]["running"] == 0

    app.state.engine.methods_info = lambda: 1 / 0  # any other route: the app's handler answers JSON too
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/api/v1/methods")
        assert response.status_code == 500
        assert response.json() == {
            "detail": "Internal server error (ZeroDivisionError); the server log has the details."
        }

    boom.error = RuntimeError("boom")
    actions = PageActions(Engine(SegmenterPool(lambda method: boom, ["sclip"]), ServeConfig()), ScratchDir(60))
    path = tmp_path / "in.png"
    path.write_bytes(IMAGE)
    with pytest.warns(UserWarning):  # gr.Warning outside an event
        outputs = asyncio.run(actions.segment(str(path), "cat", "sclip", 0.0, "", 0.6))
    assert outputs[4] == "**Error:** Internal server error (RuntimeError); the server log has the details."


# -- the command line ------------------------------------------------------------------------------------


def test_missing_examples_folder_is_an_error(tmp_path, capsys):
    assert main(["serve", "--method", "sclip", "--examples", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"vocabseg: error: examples_dir (--examples) {tmp_path / 'missing'} is not a folder of example images.\n"
    )


def test_port_in_use_fails_before_loading_and_printing_the_url(tiny_clip_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--method", "sclip", "--model", f"local-dir:{tiny_clip_dir}", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        f"vocabseg: error: Cannot listen on 127.0.0.1:{port}: Address already in use; "
        "is another server running there? Choose another --port.\n"
    )


def test_server_flags_reach_the_running_server(tiny_clip_dir, monkeypatch, capsys):
    import vocabseg.serve.app

    served = {}
    monkeypatch.setattr(
        vocabseg.serve.app, "run_server", lambda app, sock: served.update(app=app, sock=sock.getsockname())
    )
    argv = ["serve", "--method", "sclip", "--methods", "sclip", "--model", f"local-dir:{tiny_clip_dir}", "--port", "0"]
    argv += ["--max-names", "7", "--request-timeout", "9.5", "--shutdown-grace", "3"]
    assert main(argv) == 0
    config = served["app"].state.engine.config
    assert (config.max_names, config.request_timeout, config.shutdown_grace) == (7, 9.5, 3.0)
    port = served["sock"][1]
    assert port != 0 and config.port == port  # --port 0: the port picked is the one printed
    err = capsys.readouterr().err
    assert f"page http://127.0.0.1:{port}/" in err
    assert "at most 100 classes and 7 names (200 characters each), 9.5 s per request" in err
