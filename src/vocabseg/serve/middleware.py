"""A body-size limit for the API, enforced while the body streams in (not after it is buffered)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    """Answers 413 to requests under ``prefix`` whose body exceeds ``max_bytes``.

    A declared ``Content-Length`` above the limit is refused before anything is read; a chunked body
    is counted as it arrives and cut off at the limit, so no request holds more than ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, prefix: str = "/api/"):
        self.app = app
        self.max_bytes = max_bytes
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, declared)
            return

        state: dict[str, Any] = {"received": 0, "tripped": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["tripped"] = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer below
            return message

        async def guarded_send(message: Message) -> None:
            if state["tripped"]:
                return  # the app's reaction to the cut-off body is replaced by the 413
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["tripped"]:
                raise
        if state["tripped"] and not state["started"]:
            await self._refuse(send, None)

    async def _refuse(self, send: Send, declared: int | None) -> None:
        size = f" ({declared:,} bytes)" if declared is not None else ""
        detail = f"Upload too large{size}: this server accepts at most {self.max_bytes:,} bytes per request."
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the unread rest of the body is not worth draining
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
