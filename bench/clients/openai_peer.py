"""Peer (b): the script a user would write by hand with the OpenAI SDK.

``AsyncOpenAI(base_url, api_key, max_retries)`` + ``asyncio.Semaphore(C)`` around
``client.images.generate(...)``; the SDK's own retries (it honours ``retry-after-ms``/``Retry-After``);
decode the b64 and write the file. No rate limiter: the SDK has none.

Spec keys: base_url, prompts, output, request, concurrency, max_retries, result_path.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

from bench.clients.common import Window, load_spec, peer_result, read_prompts, save_b64_image, write_result


async def run(spec: dict) -> dict:
    from openai import AsyncOpenAI

    prompts = read_prompts(spec["prompts"])
    out = spec["output"]
    os.makedirs(out, exist_ok=True)
    request = dict(spec["request"])
    failures: Counter[str] = Counter()
    window = Window()
    client = AsyncOpenAI(base_url=spec["base_url"], api_key="bench", max_retries=spec["max_retries"], timeout=300.0)
    semaphore = asyncio.Semaphore(spec["concurrency"])

    async def one(prompt_id: str, prompt: str) -> bool:
        async with semaphore:
            try:
                response = await client.images.generate(prompt=prompt, **request)
                save_b64_image(out, prompt_id, response.data[0].b64_json)
                return True
            except Exception as exc:
                failures[type(exc).__name__] += 1
                return False

    async with client:
        results = await asyncio.gather(*(one(pid, prompt) for pid, prompt in prompts))
    return peer_result(window, out, results, failures)


def main() -> None:
    spec = load_spec()
    write_result(spec, asyncio.run(run(spec)))


if __name__ == "__main__":
    main()
