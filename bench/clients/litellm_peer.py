"""Peer (c): LiteLLM's ``Router``, configured to enforce the limit itself when it is known.

``Router(model_list=[{"model_name": "img", "litellm_params": {"model": "openai/dall-e-2", "api_base": ...,
"api_key": ..., "rpm": R}}], num_retries=..., routing_strategy="usage-based-routing-v2")`` and
``await router.aimage_generation(model="img", prompt=..., ...)`` under ``asyncio.Semaphore(C)``.

Why ``usage-based-routing-v2``: in LiteLLM a deployment's ``rpm`` is only *enforced* by that strategy
(``LowestTPMLoggingHandler_v2.async_pre_call_check`` counts requests per calendar minute, inside the
deployment slot, and refuses a call over the limit with a local RateLimitError that the Router retries
after a backoff); with the default ``simple-shuffle`` the rpm is only a routing weight. When the limit is
unknown (hidden-limit case) no rpm is given and the default strategy is used: LiteLLM then relies on the
gateway's 429 + Retry-After and its own retries. The Router's underlying OpenAI client has
``max_retries=0`` (LiteLLM's default for Routers), so every retry is the Router's.

Spec keys: base_url, prompts, output, request, concurrency, num_retries, rpm (or null), model, result_path.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter

from bench.clients.common import Window, load_spec, peer_result, read_prompts, save_b64_image, write_result


async def run(spec: dict) -> dict:
    import litellm
    from litellm import Router

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    logging.getLogger("LiteLLM Router").setLevel(logging.WARNING)

    prompts = read_prompts(spec["prompts"])
    out = spec["output"]
    os.makedirs(out, exist_ok=True)
    request = dict(spec["request"])
    model = request.pop("model")
    if "response_format" in request:
        # LiteLLM 1.110.2 refuses response_format for dall-e-2 ("not supported by openai, dall-e-2", although
        # OpenAI documents it); in the body it reaches the gateway as any other client would send it.
        request["extra_body"] = {"response_format": request.pop("response_format")}
    params = {"model": f"openai/{model}", "api_base": spec["base_url"], "api_key": "bench"}
    router_kwargs: dict = {"num_retries": spec["num_retries"], "timeout": 300}
    if spec.get("rpm"):
        params["rpm"] = int(spec["rpm"])
        router_kwargs["routing_strategy"] = "usage-based-routing-v2"
    router = Router(model_list=[{"model_name": "img", "litellm_params": params}], **router_kwargs)
    failures: Counter[str] = Counter()
    window = Window()
    semaphore = asyncio.Semaphore(spec["concurrency"])

    async def one(prompt_id: str, prompt: str) -> bool:
        async with semaphore:
            try:
                response = await router.aimage_generation(model="img", prompt=prompt, **request)
                save_b64_image(out, prompt_id, response.data[0].b64_json)
                return True
            except Exception as exc:
                failures[type(exc).__name__] += 1
                return False

    results = await asyncio.gather(*(one(pid, prompt) for pid, prompt in prompts))
    return peer_result(window, out, results, failures,
                       routing_strategy=router_kwargs.get("routing_strategy", "simple-shuffle"))


def main() -> None:
    spec = load_spec()
    write_result(spec, asyncio.run(run(spec)))
    # LiteLLM leaves logging workers behind; do not wait for them.
    os._exit(0)


if __name__ == "__main__":
    main()
