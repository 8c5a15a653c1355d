"""Serving the gateway over real sockets: blocking (the CLI) or in a background thread (tests, the example
DAG, benchmarks).

We bind the listening socket ourselves before handing it to uvicorn, so port 0 works (the OS picks a free
port and we know which) and "listening" means exactly that: the socket accepts connections.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette

from imagegen_gateway.app import create_app
from imagegen_gateway.config import DEFAULT_HOST, DEFAULT_PORT, GatewayConfig
from imagegen_gateway.responses import DroppedConnection
from imagegen_gateway.state import GatewayState

_SHUTDOWN_TIMEOUT = 10.0
logger = logging.getLogger(__name__)


class _QuietDrops(logging.Filter):
    """Deliberately dropped connections are a feature, not an error worth a traceback in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection)


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDrops) for f in logger.filters):
        logger.addFilter(_QuietDrops())


def format_base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with a hook that runs once the sockets accept connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()


def _uvicorn_config(app: Starlette, log_level: str, *, configure_logging: bool) -> uvicorn.Config:
    extra: dict[str, Any] = {} if configure_logging else {"log_config": None}
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=log_level in ("info", "debug"),
        lifespan="off",
        timeout_graceful_shutdown=2,
        # Benchmarks open many keep-alive connections; do not cap them below what a client pool uses.
        limit_concurrency=None,
        **extra,
    )


def run_gateway(
    config: GatewayConfig | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    log_level: str = "warning",
    announce: bool = True,
) -> None:
    """Serve until interrupted (Ctrl+C / SIGTERM). With ``announce``, print
    ``imagegen gateway listening on http://HOST:PORT`` to stdout once the socket accepts connections."""
    app = create_app(config)
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    _install_log_filter()

    def started() -> None:
        if announce:
            print(f"imagegen gateway listening on {format_base_url(host, actual_port)}", flush=True)

    _Server(_uvicorn_config(app, log_level, configure_logging=True), on_started=started).run(sockets=[sock])


@dataclass
class GatewayHandle:
    """A gateway running in a background thread."""

    base_url: str
    host: str
    port: int
    app: Starlette

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state.gateway
        return state

    def url(self, path: str) -> str:
        return self.base_url + path

    def stats(self) -> dict[str, Any]:
        """The same counters as ``GET /_gateway/stats``, without an HTTP round trip.

        Read from the caller's thread while the server thread may be updating them: a snapshot that races
        with an update is simply taken again.
        """
        for _ in range(10):
            try:
                return self.state.snapshot()
            except RuntimeError:  # "dictionary changed size during iteration"
                time.sleep(0.001)
        return self.state.snapshot()


@contextmanager
def run_gateway_in_thread(
    config: GatewayConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    startup_timeout: float = 10.0,
) -> Iterator[GatewayHandle]:
    """Run the gateway on a (by default free) port in a daemon thread; yields once it is listening and
    shuts it down on exit. It does not reconfigure the process's logging (it may run inside Airflow)."""
    app = create_app(config)
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    _install_log_filter()
    server = _Server(_uvicorn_config(app, log_level, configure_logging=False))
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit on startup failure included: report it, do not lose it
            failure.append(exc)

    thread = threading.Thread(target=serve, name=f"imagegen-gateway-{actual_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(1.0)
            sock.close()
            reason = f": {failure[0]!r}" if failure else ""
            raise RuntimeError(f"imagegen gateway did not start on {host}:{actual_port}{reason}")
        time.sleep(0.005)
    try:
        yield GatewayHandle(base_url=format_base_url(host, actual_port), host=host, port=actual_port, app=app)
    finally:
        server.should_exit = True
        thread.join(_SHUTDOWN_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(_SHUTDOWN_TIMEOUT)
        sock.close()
        if thread.is_alive():
            logger.warning("imagegen gateway thread on port %d did not stop", actual_port)
