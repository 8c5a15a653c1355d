"""Requests for ``n`` images each through this package's client (``ImageGenClient``, no configured limit), for the
images-per-minute row of the limiter_shapes case: the engine sends one image per request (each with its own
seed), so a request for ``n`` images is the transport's to send.

``python -m bench.clients.transport_n BASE_URL REQUESTS N IN_FLIGHT`` prints ``{"run": {...}}`` like
``imagegen run --json`` (succeeded counts requests, all of whose ``n`` images arrived).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import Counter


async def run(base_url: str, requests: int, n: int, in_flight: int) -> dict:
    from imagegen_provider.transport.client import GenerationFailed, ImageGenClient
    from imagegen_provider.transport.ratelimit import RateLimits
    from imagegen_provider.transport.retry import RetryPolicy
    from imagegen_provider.wire.request import ImageRequest

    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    succeeded, images, failures = 0, 0, Counter[str]()
    started = time.monotonic()
    async with ImageGenClient(base_url=base_url, api_key="bench", limits=RateLimits(max_in_flight=in_flight),
                              retry=RetryPolicy(max_attempts=8)) as client:

        async def worker() -> None:
            nonlocal succeeded, images
            while not queue.empty():
                index = queue.get_nowait()
                request = ImageRequest(prompt=f"n{n} request {index}: a lighthouse at dusk", model="dall-e-2",
                                       size="256x256", response_format="b64_json", n=n)
                try:
                    generation = await client.generate(request)
                except GenerationFailed as failed:
                    failures[type(failed.error).__name__] += 1
                    continue
                succeeded += len(generation.images) >= n
                images += len(generation.images)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        learned = client.limiter.images_per_minute
        seen = client.limiter.rate_limited_count
    return {"run": {"succeeded": succeeded, "failed": requests - succeeded, "images": images,
                    "failures_by_type": dict(failures), "duration_s": round(time.monotonic() - started, 2),
                    "client_429_seen": seen, "learned_images_per_minute": learned}}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    base_url, requests, n, in_flight = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(asyncio.run(run(base_url, requests, n, in_flight))))


if __name__ == "__main__":
    main()
