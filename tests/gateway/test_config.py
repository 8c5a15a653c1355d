"""Gateway settings are declared once (GatewayConfig fields with Option metadata); the CLI options, the
parsed config and the ``local_gateway`` connection extra are derived from that declaration."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields

import pytest

from imagegen_gateway.config import GatewayConfig, add_gateway_arguments, config_from_args, config_from_mapping, options
from imagegen_provider.connect import local_gateway_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser)
    return parser


def test_every_declared_option_is_a_flag_with_the_fields_default() -> None:
    actions = {action.dest: action for action in _parser()._actions}
    declared = options()
    assert len(declared) == len(fields(GatewayConfig)) - 1  # every field but ``models``
    for item, spec in declared:
        action = actions[item.name]
        assert action.default == item.default and action.help == spec.help
        assert action.option_strings == [spec.flag or "--" + item.name.replace("_", "-")]


def test_defaults_round_trip_and_switches() -> None:
    parser = _parser()
    assert config_from_args(parser.parse_args([])) == GatewayConfig()
    config = config_from_args(parser.parse_args(["--no-retry-after", "--image-detail", "photo", "--ipm", "6"]))
    assert (config.retry_after_header, config.rate_limit_headers, config.image_detail, config.ipm) == (
        False, True, "photo", 6.0,
    )


@pytest.mark.parametrize(
    "argv", [["--fail-503-rate", "1.5"], ["--rpm", "0"], ["--latency", "3-1"], ["--image-detail", "sharp"]]
)
def test_parsers_refuse_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)


@pytest.mark.parametrize(
    ("values", "field"),
    [({"drop_rate": -0.1}, "drop_rate"), ({"url_cache_size": 0}, "url_cache_size"), ({"api_key": ""}, "api_key"),
     ({"default_response_format": "png"}, "default_response_format"), ({"latency": (2, 1)}, "latency")],
)
def test_declared_checks_run_for_every_source(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GatewayConfig(**values)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        config_from_mapping(values)


def test_connection_extra_uses_the_same_declaration() -> None:
    config = local_gateway_config({"rpm": 60, "latency": [0.1, 0.2], "models": ["m1"]})
    assert config == GatewayConfig(rpm=60, latency=(0.1, 0.2), models=("m1",))
    with pytest.raises(ValueError, match="unknown local_gateway option"):
        local_gateway_config({"rpm": 60, "evil": 1})


def test_reading_the_options_loads_no_server_module() -> None:
    code = (
        "import sys\n"
        "from imagegen_provider.cli import build_parser\n"
        "build_parser().parse_args(['gateway', '--rpm', '5'])\n"
        "print(sorted(m for m in ('starlette', 'uvicorn', 'PIL', 'imagegen_gateway.app') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
