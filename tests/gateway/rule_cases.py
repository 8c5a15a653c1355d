"""One table of generation requests with OpenAI's documented verdict, shared by the gateway's rule tests, the
official-SDK tests and the client/gateway agreement test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, Any]
    #: ``None``: OpenAI accepts the request; otherwise the parameter its 400 names.
    refused_param: str | None = None
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def valid(self) -> bool:
        return self.refused_param is None


def _p(model: str, **params: Any) -> dict[str, Any]:
    return {"model": model, "prompt": params.pop("prompt", "a lighthouse at dusk"), **params}


CASES: tuple[Case, ...] = (
    # accepted
    Case("dall-e-2 smallest size, ten images", _p("dall-e-2", size="256x256", n=10)),
    Case("dall-e-2 1000-char prompt", _p("dall-e-2", prompt="p" * 1000, size="256x256")),
    Case("dall-e-3 wide hd vivid", _p("dall-e-3", size="1792x1024", quality="hd", style="vivid")),
    Case("dall-e-3 natural as url", _p("dall-e-3", style="natural", response_format="url")),
    Case("dall-e-3 4000-char prompt", _p("dall-e-3", prompt="p" * 4000)),
    Case("provider-prefixed dall-e-3", _p("openai/dall-e-3", size="1024x1792")),
    Case("gpt-image-1 landscape high jpeg 50", _p("gpt-image-1", size="1536x1024", quality="high",
                                                  output_format="jpeg", output_compression=50)),
    Case("gpt-image-1 transparent png", _p("gpt-image-1", background="transparent", output_format="png")),
    Case("gpt-image-1 auto everything, moderation low", _p("gpt-image-1", size="auto", quality="auto",
                                                           background="auto", moderation="low")),
    Case("gpt-image-1.5 webp compression 0", _p("gpt-image-1.5", output_format="webp", output_compression=0)),
    Case("gpt-image-1 32000-char prompt", _p("gpt-image-1", prompt="p" * 32000, quality="low")),
    # refused
    Case("dall-e-3 at 512x512", _p("dall-e-3", size="512x512"), "size"),
    Case("dall-e-3 style bogus", _p("dall-e-3", style="bogus"), "style"),
    Case("dall-e-3 two images", _p("dall-e-3", n=2), "n"),
    Case("dall-e-3 4001-char prompt", _p("dall-e-3", prompt="p" * 4001), "prompt"),
    Case("dall-e-3 transparent background", _p("dall-e-3", background="transparent"), "background"),
    Case("prefixed dall-e-3 at 512x512", _p("openai/dall-e-3", size="512x512"), "size"),
    Case("dall-e-2 at 1792x1024", _p("dall-e-2", size="1792x1024"), "size"),
    Case("dall-e-2 with style", _p("dall-e-2", style="vivid"), "style"),
    Case("dall-e-2 hd", _p("dall-e-2", quality="hd"), "quality"),
    Case("dall-e-2 1001-char prompt", _p("dall-e-2", prompt="p" * 1001), "prompt"),
    Case("dall-e-2 output_format", _p("dall-e-2", output_format="png"), "output_format"),
    Case("gpt-image-1 compression with png", _p("gpt-image-1", output_format="png", output_compression=80),
         "output_compression"),
    Case("gpt-image-1 compression with default png", _p("gpt-image-1", output_compression=80), "output_compression"),
    Case("gpt-image-1 quality hd", _p("gpt-image-1", quality="hd"), "quality"),
    Case("gpt-image-1 response_format url", _p("gpt-image-1", response_format="url"), "response_format"),
    Case("gpt-image-1 response_format b64_json", _p("gpt-image-1", response_format="b64_json"), "response_format"),
    Case("gpt-image-1 transparent jpeg", _p("gpt-image-1", background="transparent", output_format="jpeg"),
         "background"),
    Case("gpt-image-1 at 512x512", _p("gpt-image-1", size="512x512"), "size"),
    Case("gpt-image-1 with style", _p("gpt-image-1", style="vivid"), "style"),
    Case("gpt-image-1 eleven images", _p("gpt-image-1", n=11), "n"),
    Case("gpt-image-1 32001-char prompt", _p("gpt-image-1", prompt="p" * 32001), "prompt"),
    Case("gpt-image-1 moderation high", _p("gpt-image-1", moderation="high"), "moderation"),
    Case("gpt-image-1 partial images without stream", _p("gpt-image-1", partial_images=2), "partial_images"),
)

VALID = tuple(case for case in CASES if case.valid)
INVALID = tuple(case for case in CASES if not case.valid)


def ids(cases: tuple[Case, ...]) -> list[str]:
    return [case.name for case in cases]
