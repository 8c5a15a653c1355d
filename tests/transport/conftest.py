from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from imagegen_gateway import GatewayConfig, GatewayHandle, run_gateway_in_thread
from imagegen_provider.transport import GenerationFailed, ImageGenClient, RetryPolicy
from imagegen_provider.wire.dialects import DIALECTS
from imagegen_provider.wire.errors import ImageGenError
from imagegen_provider.wire.request import ImageRequest
from imagegen_provider.wire.result import GenerationResult

from ._scripted import Scripted, serve

#: Deliberately not shaped like a provider key ("sk-..."): only redaction by value can hide it.
KEY = "TOPSECRET-gw-key-7f3a9c"
#: Fast retries for tests that count attempts, not waits.
FAST_RETRY = RetryPolicy(max_attempts=3, backoff_initial=0.01, backoff_max=0.05)
DIALECT_PREFIX = {name: dialect.prefix for name, dialect in DIALECTS.items()}


@dataclass
class Failure:
    """What ``generate`` raised: the error, the attempts, the paid responses (filled in when the block ends)."""

    value: Any = None
    attempts: int = 0
    paid: tuple[GenerationResult, ...] = ()


@contextmanager
def generation_fails(error_type: type[ImageGenError] = ImageGenError) -> Iterator[Failure]:
    """``pytest.raises`` for ``generate``: a :class:`GenerationFailed` whose error is an ``error_type``."""
    failure = Failure()
    with pytest.raises(GenerationFailed) as caught:
        yield failure
    assert isinstance(caught.value.error, error_type), repr(caught.value.error)
    failure.value, failure.attempts, failure.paid = caught.value.error, caught.value.attempts, caught.value.paid


def small_request(**overrides: Any) -> ImageRequest:
    params: dict[str, Any] = {
        "prompt": "a red kite over a green hill",
        "model": "dall-e-2",
        "size": "256x256",
        "response_format": "b64_json",
    }
    params.update(overrides)
    return ImageRequest.build(**params)


@pytest.fixture(scope="session")
def _scripted_server() -> Iterator[Scripted]:
    with serve(Scripted()) as app:
        yield app


@pytest.fixture
def scripted(_scripted_server: Scripted) -> Scripted:
    """A scripted HTTP server on a loopback port (see ``_scripted.py``), with no script and no history.

    One server for the session, reset for each test: starting and stopping uvicorn costs more than most tests.
    """
    _scripted_server.reset()
    return _scripted_server


@pytest.fixture(scope="session")
def _keyed_gateway_session() -> Iterator[GatewayHandle]:
    with run_gateway_in_thread(GatewayConfig(api_key=KEY)) as handle:
        yield handle


@pytest.fixture
def keyed_gateway(_keyed_gateway_session: GatewayHandle) -> GatewayHandle:
    """The well-behaved bundled gateway accepting only ``KEY``, with fresh stats for each test (shared by the
    tests that need no other configuration)."""
    _keyed_gateway_session.state.reset()
    return _keyed_gateway_session


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., ImageGenClient]]:
    """``client_for(gateway_handle_or_url, dialect="openai", **kwargs)``; every client is closed afterwards."""
    clients: list[ImageGenClient] = []

    def make(target: Any, dialect: str = "openai", **kwargs: Any) -> ImageGenClient:
        base = target if isinstance(target, str) else target.base_url + DIALECT_PREFIX[dialect]
        kwargs.setdefault("api_key", KEY)
        kwargs.setdefault("retry", FAST_RETRY)
        client = ImageGenClient(base_url=base, dialect=dialect, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def wait_for_stats(handle: Any, predicate: Callable[[dict], bool], timeout: float = 2.0) -> dict:
    """The gateway finishes its bookkeeping just after the client has read the response: poll briefly."""
    deadline = time.monotonic() + timeout
    stats = handle.stats()
    while not predicate(stats) and time.monotonic() < deadline:
        time.sleep(0.01)
        stats = handle.stats()
    return stats
