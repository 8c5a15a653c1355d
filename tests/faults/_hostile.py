"""A hostile OpenAI-compatible gateway on a loopback socket: slow, over-delivering, reporting garbage costs.

It counts what a real provider would bill: every request that reached generation is charged (whether or not
the client stayed to read the answer), for every image it returned.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_MISSING = object()


def noisy_png(width: int = 256, height: int = 256) -> bytes:
    """A PNG that does not compress (random pixels): about 200 KB at 256x256, to fill a small disk."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Hostility:
    """How the gateway misbehaves; change fields while it runs.

    :param latency: seconds before answering each request.
    :param images: images per response, whatever ``n`` asked for.
    :param cost: ``usage.cost`` to report (any JSON value); omitted when left unset.
    """

    latency: float = 0.0
    images: int = 1
    cost: Any = _MISSING
    png: bytes = field(default_factory=noisy_png, repr=False)


@dataclass
class Ledger:
    """What the gateway saw and billed."""

    #: (monotonic arrival time, prompt, seed) of every generation request.
    received: list[tuple[float, str, Any]] = field(default_factory=list)
    #: (prompt, seed, images) of every request that was billed.
    charged: list[tuple[str, Any, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def charged_requests(self) -> int:
        with self.lock:
            return len(self.charged)

    @property
    def charged_images(self) -> int:
        with self.lock:
            return sum(images for _prompt, _seed, images in self.charged)

    def received_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for arrived, _p, _s in self.received if arrived > moment)

    def charged_twice(self) -> list[tuple[str, Any]]:
        with self.lock:
            keys = [(prompt, seed) for prompt, seed, _n in self.charged]
        return sorted({key for key in keys if keys.count(key) > 1})


def _app(hostility: Hostility, ledger: Ledger) -> Starlette:
    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        with ledger.lock:
            ledger.received.append((time.monotonic(), body.get("prompt"), body.get("seed")))
        if hostility.latency:
            await asyncio.sleep(hostility.latency)
        count = hostility.images
        # Billed once generated, like a real provider: a client that hung up still pays.
        with ledger.lock:
            ledger.charged.append((body.get("prompt"), body.get("seed"), count))
        data = [{"b64_json": base64.b64encode(hostility.png).decode()} for _ in range(count)]
        payload: dict[str, Any] = {"created": int(time.time()), "data": data}
        if hostility.cost is not _MISSING:
            payload["usage"] = {"cost": hostility.cost}
        return JSONResponse(payload)

    return Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])


@dataclass
class HostileGateway:
    base_url: str
    hostility: Hostility
    ledger: Ledger


@contextmanager
def hostile_gateway(hostility: Hostility | None = None) -> Iterator[HostileGateway]:
    hostility = hostility or Hostility()
    ledger = Ledger()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(hostility, ledger), log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("hostile gateway did not start")
        time.sleep(0.01)
    try:
        yield HostileGateway(f"http://127.0.0.1:{port}/v1", hostility, ledger)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
