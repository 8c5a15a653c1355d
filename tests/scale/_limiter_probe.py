"""A process that uses one :class:`RateLimiter` over a shared Redis backend, for the cross-process tests.

Every mode prints ``ready`` once its Redis connection works, then reads a start time AT (epoch seconds)
from stdin, so that the test can line the processes up however long Python takes to start:

``python -m tests.scale._limiter_probe watch --backend URL --namespace NS --seconds S``
    acquire() in a loop (50 ms apart) from AT until AT + S; prints the time of every acquisition (JSON).
``… pause --backend URL --namespace NS --seconds S``
    at AT, ``pause(S)``; prints when, and until when (JSON).
``… hit429 --backend URL --namespace NS --base-url URL``
    at AT, send two requests through an ``ImageGenClient`` to a gateway whose bucket holds one request:
    the second is a real 429 with Retry-After; prints what the client saw (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import redis.asyncio as aioredis

from imagegen_provider.transport.client import GenerationFailed, ImageGenClient
from imagegen_provider.transport.ratelimit import RateLimiter, RateLimits
from imagegen_provider.transport.retry import RetryPolicy
from imagegen_provider.wire.errors import RateLimitError
from imagegen_provider.wire.request import ImageRequest


async def _sleep_until(epoch: float) -> None:
    await asyncio.sleep(max(0.0, epoch - time.time()))


def _ready() -> float:
    print("ready", flush=True)
    return float(sys.stdin.readline())


async def watch(args: argparse.Namespace) -> dict:
    limiter = RateLimiter(RateLimits(backend=args.backend, namespace=args.namespace, probe_first=False))
    await limiter.acquire()
    until = _ready() + args.seconds
    times = []
    while time.time() < until:
        await limiter.acquire()
        times.append(time.time())
        await asyncio.sleep(0.05)
    await limiter.aclose()
    return {"acquired": times}


async def pause(args: argparse.Namespace) -> dict:
    limiter = RateLimiter(RateLimits(backend=args.backend, namespace=args.namespace, probe_first=False))
    await limiter.acquire()
    await _sleep_until(_ready())
    paused_at = time.time()
    await limiter.pause(args.seconds)
    await limiter.aclose()
    return {"paused_at": paused_at, "until": paused_at + args.seconds}


async def hit429(args: argparse.Namespace) -> dict:
    client = ImageGenClient(
        base_url=args.base_url,
        api_key="k",
        limits=RateLimits(backend=args.backend, namespace=args.namespace, probe_first=False),
        retry=RetryPolicy(max_attempts=1, rate_limited_attempts=0),
    )
    async with client:
        await client.limiter.acquire()
        await _sleep_until(_ready())
        request = ImageRequest(prompt="a red fox", model="dall-e-2", size="256x256", response_format="b64_json")
        await client.generate(request)
        first_ok = time.time()
        try:
            await client.generate(request)
        except GenerationFailed as failed:
            if not isinstance(failed.error, RateLimitError):
                raise
            exc = failed.error
            rate_limited_at = time.time()
            # The shared pause as every other process sees it: the Redis key the limiter wrote.
            redis = aioredis.from_url(args.backend)
            until = await redis.zscore(f"imagegen:{args.namespace}:pause_until", "until")
            await redis.aclose()
            return {
                "first_ok": first_ok,
                "rate_limited_at": rate_limited_at,
                "retry_after": exc.retry_after,
                "pause_until": float(until) if until is not None else None,
                "limiter_429s": client.limiter.rate_limited_count,
            }
    raise SystemExit("the second request was not rate limited")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["watch", "pause", "hit429"])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--base-url")
    args = parser.parse_args()
    result = asyncio.run({"watch": watch, "pause": pause, "hit429": hit429}[args.mode](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
