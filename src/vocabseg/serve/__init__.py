"""Serving vocabseg over HTTP: a Gradio page at ``/`` and a REST API under ``/api/v1``, on one FastAPI app.

>>> from vocabseg.serve import ServeConfig, create_app   # doctest: +SKIP
>>> app = create_app(lambda method: Segmenter(method=method), ServeConfig(workers=1))  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=7860)  # doctest: +SKIP

Needs the ``web`` extra (``pip install 'vocabseg[web]'``); ``vocabseg`` itself imports without it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .config import ServeConfig

WEB_PACKAGES = {"fastapi": "fastapi", "gradio": "gradio", "uvicorn": "uvicorn", "multipart": "python-multipart"}

__all__ = ["ServeConfig", "create_app", "require_web"]


def require_web() -> None:
    """Raise an ImportError naming the install command when a package of the ``web`` extra is missing."""
    missing = [pip for module, pip in WEB_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"The web server needs {', '.join(missing)}, which is not installed: pip install 'vocabseg[web]'"
        )


def __getattr__(name: str) -> Any:  # create_app imports fastapi and gradio: only when asked for
    if name == "create_app":
        require_web()
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
