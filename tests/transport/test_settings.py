"""ClientSettings.from_connection: host forms, the extras allow-list, typed extras, and no secret in a repr."""

from __future__ import annotations

import json

import pytest

from imagegen_provider.connect import local_gateway_config
from imagegen_provider.transport import RateLimits
from imagegen_provider.transport.settings import ClientSettings, build_client

KEY = "conn-secret-key-31337"


@pytest.mark.parametrize(
    ("host", "port", "schema", "expected"),
    [
        ("local", None, None, None),
        ("LOCAL", 8000, "v1", None),
        ("", None, None, None),
        (None, None, None, None),
        ("https://api.openai.com/v1", None, None, "https://api.openai.com/v1"),
        ("https://api.indoxhub.com/api/v1/", 443, "ignored", "https://api.indoxhub.com/api/v1"),
        ("http://10.0.0.5:8080/router/v1", None, None, "http://10.0.0.5:8080/router/v1"),
        ("api.openai.com", None, None, "https://api.openai.com/v1"),
        ("api.indoxhub.com", None, "api/v1", "https://api.indoxhub.com/api/v1"),
        ("gateway.internal", 8443, "/router/v1/", "https://gateway.internal:8443/router/v1"),
        ("localhost", 8000, None, "http://localhost:8000/v1"),
        ("127.0.0.1", 9000, "api/v1", "http://127.0.0.1:9000/api/v1"),
        ("::1", 8000, None, "http://[::1]:8000/v1"),
        ("[::1]", 8000, None, "http://[::1]:8000/v1"),
        ("2001:db8::5", 443, None, "https://[2001:db8::5]:443/v1"),
    ],
)
def test_host_forms(host, port, schema, expected):
    settings = ClientSettings.from_connection(host=host, port=port, schema=schema, password=KEY)
    assert settings.base_url == expected
    assert settings.is_local is (expected is None)
    if expected is None:
        assert settings.describe().startswith("bundled local gateway")
    else:
        assert settings.describe().startswith(expected)


def test_base_url_extra_wins_over_host():
    settings = ClientSettings.from_connection(
        host="api.openai.com", port=1, schema="nope", extra={"base_url": "http://127.0.0.1:1234/api/v1/"}
    )
    assert settings.base_url == "http://127.0.0.1:1234/api/v1"


@pytest.mark.parametrize("host", ["ftp://files.example.com", "file:///etc/passwd"])
def test_non_http_host_is_refused(host):
    with pytest.raises(ValueError, match="host"):
        ClientSettings.from_connection(host=host)


def test_non_http_base_url_extra_is_refused():
    with pytest.raises(ValueError, match="base_url"):
        ClientSettings.from_connection(host="local", extra={"base_url": "ftp://example.com/v1"})


def test_extras_are_read_and_typed():
    extra = {
        "dialect": "IndoxHub",
        "model": "openai/dall-e-3",
        "provider": "openai",
        "rpm": "90",
        "images_per_minute": 30,
        "max_in_flight": "4",
        "rate_limit_backend": "redis://127.0.0.1:6379/0",
        "timeout": "120.5",
        "connect_timeout": 3,
        "max_attempts": 7.0,
        "accepts_seed": "yes",
        "max_image_bytes": "1048576",
        "prices": json.dumps({"dall-e-3": 0.04}),
        "local_gateway": {"rpm": 600},
    }
    settings = ClientSettings.from_connection(host="local", password=KEY, extra=extra, namespace="my_conn")
    assert settings.dialect == "indoxhub"
    assert (settings.model, settings.provider) == ("openai/dall-e-3", "openai")
    assert settings.limits == RateLimits(
        requests_per_minute=90.0, images_per_minute=30.0, max_in_flight=4,
        backend="redis://127.0.0.1:6379/0", namespace="my_conn",
    )
    assert (settings.read_timeout, settings.connect_timeout) == (120.5, 3.0)
    assert settings.max_attempts == 7 and isinstance(settings.max_attempts, int)
    assert settings.retry.max_attempts == 7
    assert settings.accepts_seed is True
    assert settings.max_response_bytes == 1048576  # the old extra name is an alias
    assert settings.prices == {"dall-e-3": 0.04}
    assert settings.local_gateway == {"rpm": 600}
    assert settings.local_path() == "/api/v1"


def test_defaults_without_extras():
    settings = ClientSettings.from_connection(host="api.openai.com", password=KEY)
    assert settings.dialect == "openai"
    assert settings.limits == RateLimits(namespace="default")
    assert (settings.read_timeout, settings.connect_timeout, settings.max_attempts) == (300.0, 10.0, 5)
    assert settings.accepts_seed is None and settings.local_gateway == {}


@pytest.mark.parametrize("value, expected", [("true", True), ("off", False), (False, False), (1, True), ("0", False)])
def test_boolean_extra_spellings(value, expected):
    assert ClientSettings.from_connection(host="local", extra={"accepts_seed": value}).accepts_seed is expected


def test_unknown_extras_are_ignored_and_never_shown():
    secretish = "unknown-extra-value-4b1d"
    settings = ClientSettings.from_connection(
        host="api.openai.com", password=KEY,
        extra={"api_token": secretish, "headers": {"X-Secret": secretish}, "rpm": 60},
    )
    assert settings.limits.requests_per_minute == 60
    for text in (repr(settings), str(settings), settings.describe()):
        assert secretish not in text
        assert "api_token" not in text


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("rpm", "fast"),
        ("rpm", [60]),
        ("rpm", -5),
        ("rpm", "nan"),
        ("images_per_minute", {"n": 1}),
        ("max_in_flight", "four"),
        ("max_in_flight", 2.5),
        ("max_in_flight", True),
        ("timeout", "soon"),
        ("max_attempts", "many"),
        ("max_attempts", -1),
        ("accepts_seed", "maybe"),
        ("accepts_seed", 7),
        ("max_image_bytes", "1MB"),
        ("prices", "{not json"),
        ("prices", "[1, 2]"),
        ("prices", 3),
        ("local_gateway", "rpm=5"),
        ("dialect", {"name": "openai"}),
        ("model", ["a", "b"]),
    ],
)
def test_bad_extra_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError) as caught:
        ClientSettings.from_connection(host="local", password=KEY, extra={name: value})
    message = str(caught.value)
    assert repr(name) in message or name in message
    assert KEY not in message


def test_unknown_dialect_is_named():
    with pytest.raises(ValueError, match="dialect"):
        ClientSettings.from_connection(host="local", extra={"dialect": "soap"})


def test_api_key_never_in_repr():
    settings = ClientSettings.from_connection(
        host="local", password=KEY, extra={"local_gateway": {"api_key": KEY}, "rate_limit_backend":
                                           "redis://:redis-pass-9@127.0.0.1:6379/0"}
    )
    assert settings.api_key == KEY
    for text in (repr(settings), str(settings), settings.describe(), repr(settings.limits)):
        assert KEY not in text
        assert "redis-pass-9" not in text
    # The backend still works: only its display hides the password.
    assert settings.limits.backend == "redis://:redis-pass-9@127.0.0.1:6379/0"
    assert "127.0.0.1:6379" in repr(settings.limits)


def test_empty_password_means_no_key():
    assert ClientSettings.from_connection(host="local", password="").api_key is None


def test_with_overrides_splits_limits_and_ignores_none():
    settings = ClientSettings.from_connection(host="api.openai.com", password=KEY, extra={"rpm": 60, "model": "a"})
    changed = settings.with_overrides(requests_per_minute=30, max_in_flight=2, model="b", provider=None,
                                      images_per_minute=None)
    assert changed.limits.requests_per_minute == 30 and changed.limits.max_in_flight == 2
    assert changed.limits.images_per_minute is None
    assert (changed.model, changed.provider) == ("b", None)
    assert settings.limits.requests_per_minute == 60 and settings.model == "a"  # frozen: a copy


async def test_build_client_uses_the_settings():
    settings = ClientSettings.from_connection(
        host="https://gw.example/router/v1", password=KEY,
        extra={"dialect": "router", "rpm": 120, "max_attempts": 2, "timeout": 42, "max_image_bytes": 1000},
    )
    client = build_client(settings)
    try:
        assert client.endpoint == "https://gw.example/router/v1/images/generations"
        assert client.dialect.name == "router"
        assert client.limiter.requests_per_minute == 120
        assert client.retry.max_attempts == 2
        assert client.api_key_for_redaction == KEY
        assert KEY not in repr(client.__dict__.get("limiter"))
    finally:
        await client.aclose()


def test_build_client_refuses_local_settings():
    with pytest.raises(ValueError, match="local"):
        build_client(ClientSettings.from_connection(host="local"))


def test_local_gateway_options_are_allow_listed():
    assert local_gateway_config({"rpm": 60, "latency": [0.1, 0.2]}).latency == (0.1, 0.2)
    with pytest.raises(ValueError, match="unknown local_gateway option"):
        local_gateway_config({"rpm": 60, "evil": 1})


# --- declared once: extras, CLI options, dataclass ---------------------------------------------------------


def _cli_parser():
    import argparse

    from imagegen_provider.transport.settings import add_client_arguments

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_client_arguments(parser.add_argument_group("gateway"))
    return parser


def test_every_extra_has_a_cli_option_and_every_option_an_extra():
    from imagegen_provider.transport.settings import declared_options

    declared = list(declared_options())
    extras = {opt.extra for _, opt in declared if opt.extra}
    flags = {opt.flag for _, opt in declared if opt.flag}
    parser_flags = {s for action in _cli_parser()._actions for s in action.option_strings} - {"-h", "--help"}
    assert parser_flags == flags
    for name, opt in declared:
        # The key is the connection's password, never an extra; everything else is both.
        assert opt.flag, name
        assert opt.extra or opt.secret, name
    # The ones the hook's docs and the issue name are all there.
    assert {"rpm", "images_per_minute", "max_in_flight", "rate_limit_backend", "timeout", "connect_timeout",
            "max_attempts", "attempt_timeout", "breaker_seconds", "max_retry_after", "max_response_bytes",
            "allow_private_image_urls", "accepts_seed", "dialect", "base_url", "model", "provider", "prices",
            "local_gateway"} <= extras


def test_connection_extras_and_cli_options_mean_the_same_settings():
    from imagegen_provider.transport.settings import declared_options

    extra = {
        "base_url": "https://gw.example/api/v1", "dialect": "indoxhub", "model": "m", "provider": "p", "rpm": 90,
        "images_per_minute": 30, "max_in_flight": 4, "rate_limit_backend": "redis://127.0.0.1:6379/0",
        "timeout": 120, "connect_timeout": 3, "attempt_timeout": 200, "max_attempts": 7, "max_retry_after": 60,
        "breaker_seconds": 90, "accepts_seed": True, "max_response_bytes": 1000, "allow_private_image_urls": True,
        "prices": {"m": 0.1}, "price_as": {"alias": "dall-e-3"}, "local_gateway": {"rpm": 5},
    }
    from_connection = ClientSettings.from_connection(host="ignored", password=KEY, extra=extra, namespace="cli")
    argv = []
    for _, opt in declared_options():
        if opt.extra is None:
            continue
        value = extra[opt.extra]
        if opt.is_switch:
            argv.append(opt.flag)
        else:
            argv += [opt.flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    from_cli = ClientSettings.from_cli_args(_cli_parser().parse_args(argv), api_key=KEY)
    assert from_cli == from_connection
    assert from_cli.limits.requests_per_minute == 90 and from_cli.max_response_bytes == 1000
    assert from_cli.retry.max_retry_after == 60 and from_cli.timeouts.attempt == 200


def test_cli_defaults_are_the_settings_defaults():
    settings = ClientSettings.from_cli_args(_cli_parser().parse_args([]), api_key=None, namespace="default")
    assert settings == ClientSettings()
    assert (settings.max_response_bytes, settings.attempt_timeout, settings.breaker_seconds,
            settings.max_retry_after, settings.allow_private_image_urls) == (64 * 1024 * 1024, 360.0, 600.0, 300.0,
                                                                           False)


def test_bad_cli_value_is_an_argparse_error_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        _cli_parser().parse_args(["--rpm", "fast"])
    assert "--rpm" in capsys.readouterr().err


def test_old_max_image_bytes_extra_is_an_alias_and_the_new_name_wins():
    old = ClientSettings.from_connection(host="local", extra={"max_image_bytes": 5000})
    both = ClientSettings.from_connection(host="local", extra={"max_image_bytes": 5000, "max_response_bytes": 7000})
    assert (old.max_response_bytes, both.max_response_bytes) == (5000, 7000)


async def test_build_client_carries_the_new_settings():
    settings = ClientSettings.from_connection(
        host="https://gw.example/v1", password=KEY,
        extra={"attempt_timeout": 12, "breaker_seconds": 34, "max_retry_after": 56, "max_response_bytes": 789,
               "allow_private_image_urls": "yes"},
    )
    client = build_client(settings)
    try:
        assert client.timeouts.attempt == 12 and client.breaker.seconds == 34
        assert client.retry.max_retry_after == 56 and client.limiter.max_wait == 56
        assert client.max_response_bytes == 789
        assert client._downloader.policy.allow_private is True
    finally:
        await client.aclose()


def test_local_path_comes_from_the_dialect():
    from imagegen_provider.wire.dialects import DIALECTS

    for name, dialect in DIALECTS.items():
        assert ClientSettings(base_url=None, dialect=name).local_path() == dialect.prefix
