"""Run one ``generate`` in this (fresh) process and print its outcome and this process's peak RSS as JSON.

Used by test_body_caps: measuring in a child process keeps pytest's own memory out of the figure.
usage: python _memory_client.py BASE_URL [stream|url]
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

from imagegen_provider.transport import GenerationFailed, ImageGenClient, RetryPolicy, Timeouts
from imagegen_provider.wire.request import ImageRequest


async def main(base_url: str, kind: str) -> dict[str, object]:
    params: dict[str, object] = {"prompt": "p", "model": "dall-e-2", "size": "256x256", "response_format": "b64_json"}
    if kind == "stream":
        params = {"prompt": "p", "model": "gpt-image-1", "size": "1024x1024", "stream": True}
    elif kind == "url":
        params["response_format"] = "url"
    client = ImageGenClient(base_url=base_url, api_key="k", retry=RetryPolicy(max_attempts=1),
                            timeouts=Timeouts(attempt=60.0), allow_private_image_urls=True)
    started = time.monotonic()
    try:
        await client.generate(ImageRequest.build(**params))
        outcome: dict[str, object] = {"error": None}
    except GenerationFailed as failed:
        outcome = {"error": type(failed.error).__name__, "message": str(failed.error), "attempts": failed.attempts,
                   "paid": len(failed.paid)}
    finally:
        await client.aclose()
    outcome["elapsed_s"] = time.monotonic() - started
    outcome["peak_rss_mb"] = _peak_rss_mb()
    return outcome


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries it across ``execve``, so a child forked from a
    700 MB pytest process would report 700 MB before it did anything. ``VmHWM`` belongs to the new address space."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "plain"))))
