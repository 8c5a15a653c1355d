"""This package's product path: ``BatchRunner`` with a client from ``ClientSettings`` + ``connect.open_client``,
configured the way ``imagegen run`` configures it (same logging, no finalize step: that is a separate,
once-per-dataset pass and not part of generating images).

Spec keys: base_url, prompts, output, request (request defaults), concurrency, rpm (or null),
max_attempts, backend (or null), result_path.
"""

from __future__ import annotations

import asyncio
import logging

from bench.clients.common import Window, count_files, load_spec, write_result


async def run(spec: dict) -> dict:
    from imagegen_provider.connect import open_client
    from imagegen_provider.engine.runner import BatchRunner, RunConfig
    from imagegen_provider.transport.ratelimit import RateLimits
    from imagegen_provider.transport.settings import ClientSettings

    settings = ClientSettings(
        base_url=spec["base_url"],
        api_key="bench",
        dialect="openai",
        limits=RateLimits(
            requests_per_minute=spec.get("rpm"),
            max_in_flight=spec["concurrency"],
            backend=spec.get("backend"),
            namespace="bench",
        ),
        max_attempts=spec["max_attempts"],
    )
    config = RunConfig(
        prompts=spec["prompts"],
        output=spec["output"],
        request_defaults=spec["request"],
        progress_interval=10.0,
    )
    window = Window()
    async with open_client(settings) as client:
        summary = await BatchRunner(config, client=client).run()
        rate_limited_seen = client.limiter.rate_limited_count
        learned_rpm = client.limiter.requests_per_minute
    window.stop()
    files, size = count_files(f"{spec['output']}/images")
    return window.result(
        n=summary.total_images,
        succeeded=summary.succeeded,
        failed=summary.failed,
        not_attempted=summary.not_attempted,
        failures=summary.failures_by_type,
        images_kept=files,
        bytes_kept=size,
        client_429_seen=rate_limited_seen,
        limiter_rpm_at_end=learned_rpm,
        summary=summary.to_dict(),
    )


def main() -> None:
    spec = load_spec()
    from imagegen_provider.transport.client import quiet_request_logs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with quiet_request_logs():
        write_result(spec, asyncio.run(run(spec)))


if __name__ == "__main__":
    main()
