"""A real LiteLLM proxy in front of the bundled gateway, enforcing a deployment ``rpm`` under an aliased model name.

LiteLLM's proxy enforces a deployment's ``rpm`` only with ``router_settings.optional_pre_call_checks:
["enforce_model_rate_limits"]``: a calendar-minute window that counts refused requests too and answers 429 with
neither Retry-After nor rate-limit headers. The benchmark's ``limiter_shapes`` case (its ``proxy`` row) and
``tests/scale/test_litellm_proxy.py`` both start it from here, so the configuration is written once.

Needs ``pip install 'litellm[proxy]'`` (the ``litellm-proxy`` extra). No database and no network:
``LITELLM_LOCAL_MODEL_COST_MAP=True`` keeps the proxy from downloading its cost map at start-up.
"""

from __future__ import annotations

import importlib.util
import re
import secrets
import shutil
from pathlib import Path

#: The model name clients ask the proxy for; it has no list price of its own (``--price-as`` prices it).
ALIAS = "house-images"
#: The model the alias routes to on the bundled gateway.
UPSTREAM_MODEL = "dall-e-2"
#: Environment of the proxy process: LiteLLM's bundled cost map, no telemetry.
PROXY_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}

_CONFIG = """\
model_list:
  - model_name: {alias}
    litellm_params:
      model: openai/{upstream}
      api_base: {api_base}
      api_key: k
      rpm: {rpm}
router_settings:
  optional_pre_call_checks: ["enforce_model_rate_limits"]
general_settings:
  master_key: {master_key}
litellm_settings:
  telemetry: false
  drop_params: true
"""

#: A refused generation in the proxy's (uvicorn's) access log: ``"POST /v1/images/generations HTTP/1.1" 429``.
_REFUSED = re.compile(r'"POST [^"]*/images/generations[^"]*" 429\b')


def litellm_binary() -> str | None:
    """The ``litellm`` command when the proxy's extra dependencies are installed too (None otherwise)."""
    binary = shutil.which("litellm")
    # apscheduler is one of the proxy extra's packages that plain ``litellm`` does not pull in.
    return binary if binary and importlib.util.find_spec("apscheduler") is not None else None


def new_master_key() -> str:
    """A fresh master key: the proxy refuses requests without one (no database is needed for it)."""
    return "sk-" + secrets.token_hex(16)


def write_config(path: Path, *, api_base: str, rpm: int, master_key: str, alias: str = ALIAS) -> Path:
    """Write the proxy's YAML config: one deployment of ``alias`` → ``openai/dall-e-2`` at ``api_base``, limited
    to ``rpm`` requests per calendar minute by ``enforce_model_rate_limits``.

    :param path: where to write it.
    :param api_base: the upstream gateway's OpenAI-compatible base URL (``…/v1``).
    :param rpm: the deployment's limit, requests per minute.
    :param master_key: the key clients must send as their API key.
    :param alias: the model name clients ask for.
    """
    path.write_text(_CONFIG.format(alias=alias, upstream=UPSTREAM_MODEL, api_base=api_base, rpm=int(rpm),
                                   master_key=master_key))
    return path


def proxy_argv(binary: str, config: Path, port: int) -> list[str]:
    """The command line of a proxy listening on loopback only."""
    return [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]


def count_refusals(log_text: str) -> int:
    """Generation requests the proxy answered 429, from its access log (they never reach the gateway)."""
    return len(_REFUSED.findall(log_text))
