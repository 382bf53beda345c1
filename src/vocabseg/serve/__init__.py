"""Serving vocabseg over HTTP: a Gradio page at ``/`` and a REST API under ``/api/v1``, on one FastAPI app.

>>> from vocabseg.serve import ServeConfig, create_app, run_server   # doctest: +SKIP
>>> app = create_app(lambda method: Segmenter(method=method), ServeConfig(workers=1))  # doctest: +SKIP
>>> run_server(app)  # on the config's host and port, until SIGINT/SIGTERM  # doctest: +SKIP

Needs the ``web`` extra (``pip install 'vocabseg[web]'``); ``vocabseg`` itself imports without it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .config import ServeConfig

WEB_PACKAGES = {"fastapi": "fastapi", "gradio": "gradio", "uvicorn": "uvicorn", "multipart": "python-multipart"}

__all__ = ["ServeConfig", "create_app", "require_web", "run_server"]


def require_web() -> None:
    """Raise an ImportError naming the install command when a package of the ``web`` extra is missing."""
    missing = [pip for module, pip in WEB_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"The web server needs {', '.join(missing)}, which is not installed: pip install 'vocabseg[web]'"
        )


def __getattr__(name: str) -> Any:  # the app imports fastapi and gradio: only when asked for
    if name in ("create_app", "run_server"):
        require_web()
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
