"""A scripted HTTP server on a real loopback socket, for what the bundled gateway cannot produce: 403, 404,
408, 504, exact Retry-After headers, HTML error pages, bodies that echo the key, chunked image downloads.

Each path answers with its scripted replies in order; the last one repeats. Every request is recorded with
its arrival time, headers and body.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from imagegen_gateway.server import bind_socket


@dataclass
class Reply:
    status: int = 200
    #: JSON body (serialised) — or ``body`` for raw bytes/text.
    json: Any = None
    body: bytes | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str | None = None
    #: Sent as a chunked stream without Content-Length.
    chunks: list[bytes] | None = None
    #: Seconds between two chunks (a dripping body).
    chunk_delay: float = 0.0
    #: A generator of chunks, made when the reply is sent: bodies too large (or endless) to hold in the test.
    stream: Callable[[], AsyncIterator[bytes]] | None = None
    #: Seconds to wait before answering.
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


ReplySource = Reply | Callable[["Scripted", Seen], Reply]


class Scripted:
    """The ASGI app. ``server.on("/v1/images/generations", Reply(429, ...), Reply(200, ...))``."""

    def __init__(self) -> None:
        self.routes: dict[str, list[ReplySource]] = {}
        self.seen: list[Seen] = []
        self.base_url = ""
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.routes.clear()
            self.seen.clear()

    def on(self, path: str, *replies: ReplySource) -> None:
        self.routes[path] = list(replies)

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def _next(self, path: str) -> ReplySource | None:
        with self._lock:
            replies = self.routes.get(path)
            if not replies:
                return None
            return replies.pop(0) if len(replies) > 1 else replies[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        seen = Seen(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        self.seen.append(seen)
        source = self._next(seen.path)
        if source is None:
            await Response("no script for this path", status_code=599)(scope, receive, send)
            return
        reply = source(self, seen) if callable(source) else source
        if reply.delay:
            import anyio

            await anyio.sleep(reply.delay)
        response: Response
        if reply.stream is not None:
            response = StreamingResponse(
                reply.stream(), status_code=reply.status, headers=reply.headers,
                media_type=reply.media_type or "application/octet-stream",
            )
        elif reply.chunks is not None:
            chunks, pause = list(reply.chunks), reply.chunk_delay

            async def stream() -> Any:
                import anyio

                for index, chunk in enumerate(chunks):
                    if index and pause:
                        await anyio.sleep(pause)
                    yield chunk

            response = StreamingResponse(
                stream(), status_code=reply.status, headers=reply.headers,
                media_type=reply.media_type or "application/octet-stream",
            )
        elif reply.json is not None:
            response = Response(
                json.dumps(reply.json), status_code=reply.status, headers=reply.headers,
                media_type=reply.media_type or "application/json",
            )
        else:
            response = Response(
                reply.body or b"", status_code=reply.status, headers=reply.headers, media_type=reply.media_type
            )
        await response(scope, receive, send)


@contextmanager
def serve(app: Scripted) -> Iterator[Scripted]:
    """Serve ``app`` on a free loopback port in a daemon thread; ``app.base_url`` says where."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("scripted server did not start")
        time.sleep(0.005)
    app.base_url = f"http://127.0.0.1:{port}"
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --- bodies ------------------------------------------------------------------------------------------------


def png_bytes(width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def openai_image_body(*, b64_json: str | None = None, url: str | None = None) -> dict[str, Any]:
    item = {"b64_json": b64_json} if b64_json is not None else {"url": url}
    return {"created": 1700000000, "data": [item]}


def ok_image(width: int = 8, height: int = 6) -> Reply:
    return Reply(200, json=openai_image_body(b64_json=b64(png_bytes(width, height))))
