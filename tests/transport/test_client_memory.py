"""A finished request must not keep its body alive: at 2-3 MB per response, bodies waiting for the cyclic
garbage collector held over a gigabyte in a 2,000-image run (bench overhead case) before the client read
bodies into locals."""

from __future__ import annotations

import gc
import tracemalloc

from imagegen_gateway import GatewayConfig

from .conftest import KEY, small_request


async def test_response_bodies_are_freed_without_the_cyclic_gc(gateway_factory, client_for):
    # repeat_unseeded: the gateway (in this process, so in tracemalloc's totals) serves one cached render.
    gateway = gateway_factory(GatewayConfig(api_key=KEY, image_detail="photo", repeat_unseeded=True))
    client = client_for(gateway, "openai")
    request = small_request(model="gpt-image-1", size="1024x1024", quality="low", response_format=None)

    first = await client.generate(request)  # warm up: connection pool, lazy imports, first allocations
    body_size = len(first.images[0].data)
    assert body_size > 500_000, "photo detail should give a body large enough to see in the totals"
    del first

    rounds = 8
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for _ in range(rounds):
            generation = await client.generate(request)
            assert generation.images[0].data
            del generation
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    # With bodies stuck in Response<->stream cycles this grows by about rounds x (b64 body + image).
    assert retained - baseline < 2 * body_size, (
        f"{(retained - baseline) / 1e6:.1f} MB still allocated after {rounds} finished requests "
        f"(image {body_size / 1e6:.1f} MB)"
    )
