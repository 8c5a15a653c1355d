"""The connection form for Airflow releases that build it from the hook (3.0, 3.1), derived from the one
declaration in :func:`imagegen_provider.get_provider_info` (``conn-fields``, ``ui-field-behaviour``) that
Airflow 3.2+ reads directly."""

from __future__ import annotations

from typing import Any

from imagegen_provider import get_provider_info


def _connection_type() -> dict[str, Any]:
    [connection_type] = get_provider_info()["connection-types"]
    return dict(connection_type)


def _field_class(types: list[str]) -> Any:
    # Only these four field classes are accepted by Airflow. Numbers travel as text: the hook reads "60" as 60.
    from wtforms import BooleanField, IntegerField, StringField

    if "boolean" in types:
        return BooleanField
    if "integer" in types:
        return IntegerField
    return StringField


def connection_form_widgets() -> dict[str, Any]:
    """``conn-fields`` as wtforms fields (imported here: only the webserver of those releases has wtforms)."""
    from wtforms.validators import Optional, any_of

    widgets: dict[str, Any] = {}
    for name, spec in _connection_type()["conn-fields"].items():
        schema = spec["schema"]
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        validators = [Optional()]
        if "enum" in schema:
            validators.append(any_of(schema["enum"]))
        widgets[name] = _field_class(types)(
            spec["label"],
            validators=validators,
            description=spec.get("description", ""),
            default=schema.get("default"),
        )
    return widgets


def ui_field_behaviour() -> dict[str, Any]:
    """``ui-field-behaviour`` spelled as the hook method returns it (underscores, not dashes)."""
    behaviour = _connection_type()["ui-field-behaviour"]
    return {key.replace("-", "_"): value for key, value in behaviour.items()}
