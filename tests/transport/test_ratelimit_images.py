"""Images and tokens per minute: a request for n images counts n, a hidden images limit is learned from the 429s
that name it (not mistaken for a request limit) and shared through Redis, and an announced tokens limit is
enforced as the images per minute it allows."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from imagegen_gateway import GatewayConfig
from imagegen_provider.transport import ImageGenClient, RateLimiter, RateLimits, RetryPolicy

from .conftest import KEY, small_request


async def test_refusals_naming_images_teach_the_images_rate_not_the_request_rate():
    limiter = RateLimiter(RateLimits(probe_first=False))
    for _ in range(10):
        await limiter.acquire(images=4)
    for _ in range(4):
        await limiter.on_rate_limited(0.0, limit="images")
    assert limiter.requests_per_minute is None
    learned = limiter.images_per_minute
    assert learned is not None and learned > 0
    # A tokens limit is learned in images too.
    await asyncio.sleep(1.05)
    await limiter.on_accepted(sent_at=time.time(), images=4)
    await limiter.on_rate_limited(0.0, limit="tokens")
    assert limiter.images_per_minute == pytest.approx(learned * 0.9)
    assert limiter.requests_per_minute is None


async def test_a_configured_images_limit_is_not_learned_over():
    limiter = RateLimiter(RateLimits(images_per_minute=100, probe_first=False))
    await limiter.acquire(images=2)
    await limiter.on_rate_limited(0.0, limit="images")
    assert limiter.images_per_minute == 100


async def test_an_announced_tokens_limit_is_enforced_as_images_per_minute():
    limiter = RateLimiter(RateLimits(probe_first=False))
    limiter.observe_headers({"x-ratelimit-limit-tokens": "6000"})
    assert limiter.images_per_minute is None  # what an image costs is not known yet
    await limiter.on_accepted(sent_at=time.time(), images=2, tokens=400)
    assert limiter.images_per_minute == pytest.approx(30.0)  # 6000 tokens/min at 200 tokens per image
    limiter.observe_headers({"x-ratelimit-limit-images": "20"})
    assert limiter.images_per_minute == pytest.approx(20.0)  # the stricter of the two
    # Absurd usage is not believed.
    await limiter.on_accepted(sent_at=time.time(), images=1, tokens=10**9)
    assert limiter.images_per_minute == pytest.approx(20.0)


async def test_hidden_images_limit_with_n_4_is_learned_from_the_gateway(gateway_factory):
    """The bundled gateway with a hidden 1200 images/min (a token bucket of 20 images, Retry-After, no
    x-ratelimit headers) and requests for 4 images: every image arrives, the limit learned is the images one."""
    gw = gateway_factory(GatewayConfig(api_key=KEY, ipm=1200, rate_limit_headers=False))
    async with httpx.AsyncClient() as raw:
        answer = await raw.post(gw.base_url + "/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                                json={"prompt": "x", "model": "dall-e-2", "size": "256x256", "n": 4,
                                      "response_format": "b64_json"})
    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.lower().startswith("x-ratelimit")]
    async with ImageGenClient(base_url=gw.base_url + "/v1", api_key=KEY, limits=RateLimits(max_in_flight=8),
                              retry=RetryPolicy(max_attempts=10)) as client:
        results = await asyncio.gather(*(client.generate(small_request(prompt=f"p{i}", n=4)) for i in range(25)))
        learned = client.limiter.images_per_minute
        assert client.limiter.requests_per_minute is None
    assert all(len(result.images) == 4 for result in results)
    assert client.limiter.rate_limited_count > 0
    assert learned is not None and 1200 / 4 <= learned <= 1200 * 4


async def test_a_learned_images_rate_is_shared_through_redis(redis_url):
    limits = RateLimits(backend=redis_url.rsplit("/", 1)[0] + "/6", namespace=f"ipm-{uuid.uuid4().hex[:8]}",
                        probe_first=False)
    first, second = RateLimiter(limits), RateLimiter(limits)
    try:
        for _ in range(6):
            await first.acquire(images=4)
        await first.on_rate_limited(0.0, limit="images")
        assert first.images_per_minute is not None and second.images_per_minute is None
        await second.acquire(images=4)  # takes up what the other learned
        assert second.images_per_minute == pytest.approx(first.images_per_minute)
        assert second.requests_per_minute is None
    finally:
        await first.aclose()
        await second.aclose()
