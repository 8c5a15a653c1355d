"""The provider as Airflow sees it: get_provider_info() against Airflow's own schemas and pyproject.toml, and
a real ``airflow`` process discovering the package, its hook and its connection form."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import airflow
import jsonschema
import pytest

import imagegen_provider
from imagegen_provider import get_provider_info
from imagegen_provider.transport import options
from imagegen_provider.transport.settings import declared_options
from imagegen_provider.wire.dialects import DIALECTS

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
AIRFLOW_PACKAGE = Path(airflow.__file__).parent
#: The JSON type a connection-form field must allow for each reader of a declared setting.
JSON_TYPES = {
    options.read_str: "string", options.read_url: "string", options.read_float: "number",
    options.read_int: "integer", options.read_bool: "boolean", options.read_json_object: "object",
}
EXTRA_READERS = {opt.extra: opt.reader for _, opt in declared_options() if opt.extra}

PROBE = """
import json
from airflow.providers_manager import ProvidersManager

# The UI's form first: Airflow < 3.2 builds it with mocked wtforms classes, and only if no one initialised the
# ProvidersManager's widgets with the real ones before (as the API server does).
try:
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
    [form] = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "imagegen"]
    form = {"extra_fields": form.extra_fields, "standard_fields": form.standard_fields.model_dump()}
except ImportError:
    form = None
pm = ProvidersManager()
try:
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime
    hook = ProvidersManagerTaskRuntime().hooks.get("imagegen")
except ImportError:  # Airflow < 3.2: the hooks are the core ProvidersManager's
    hook = pm.hooks.get("imagegen")
provider = pm.providers.get("airflow-provider-imagegen")
print(json.dumps({
    "form": form,
    "provider_version": provider.version if provider else None,
    "hook": None if hook is None else {
        "class": hook.hook_class_name, "conn_attr": hook.connection_id_attribute_name,
        "package": hook.package_name, "name": hook.hook_name, "testable": hook.connection_testable,
    },
    "widget_names": sorted(k for k in pm.connection_form_widgets if k.startswith("extra__imagegen__")),
    "behaviour": pm.field_behaviours.get("imagegen"),
}))
"""


@pytest.fixture(scope="module")
def info() -> dict:
    return get_provider_info()


def test_matches_airflow_provider_schema(info):
    schema = json.loads((AIRFLOW_PACKAGE / "provider_info.schema.json").read_text())
    jsonschema.validate(info, schema)
    behaviour_schema = json.loads((AIRFLOW_PACKAGE / "customized_form_field_behaviours.schema.json").read_text())
    for connection_type in info["connection-types"]:
        # Provider metadata spells the keys with dashes; the form schema (and the UI) with underscores.
        behaviour = {key.replace("-", "_"): value for key, value in connection_type["ui-field-behaviour"].items()}
        jsonschema.validate(behaviour, behaviour_schema)


def test_matches_pyproject(info):
    assert info["package-name"] == PYPROJECT["name"]
    assert info["versions"][0] == PYPROJECT["version"] == imagegen_provider.__version__
    assert info["name"].strip() and info["description"].strip()


def test_entry_point_is_registered():
    entry_points = importlib.metadata.entry_points(group="apache_airflow_provider")
    ours = [ep for ep in entry_points if ep.dist is not None and ep.dist.name == PYPROJECT["name"]]
    assert len(ours) == 1
    assert ours[0].load() is get_provider_info


def test_connection_types_point_at_importable_hooks(info):
    assert [c["connection-type"] for c in info["connection-types"]] == ["imagegen"]
    for connection_type in info["connection-types"]:
        module_name, _, class_name = connection_type["hook-class-name"].rpartition(".")
        hook_class = getattr(importlib.import_module(module_name), class_name)
        assert hook_class.conn_type == connection_type["connection-type"]
        assert hook_class.hook_name == connection_type["hook-name"]


def test_listed_modules_import(info):
    for section in ("hooks", "operators"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                importlib.import_module(module)
    integrations = {i["integration-name"] for i in info["integrations"]}
    assert {e["integration-name"] for e in info["hooks"] + info["operators"]} <= integrations


def test_form_fields_are_extras_the_hook_reads(info):
    """A field in the connection form that the hook ignored would be a setting that silently does nothing."""
    [connection_type] = info["connection-types"]
    fields = connection_type["conn-fields"]
    assert set(fields) <= set(EXTRA_READERS)
    for name, field in fields.items():
        types = field["schema"]["type"]
        assert JSON_TYPES.get(EXTRA_READERS[name], "string") in types, name
    assert fields["dialect"]["schema"]["enum"] == list(DIALECTS)
    hidden = connection_type["ui-field-behaviour"]["hidden-fields"]
    assert "password" not in hidden and "host" not in hidden


def test_airflow_discovers_the_provider():
    bin_dir = Path(sys.executable).parent
    airflow_bin = bin_dir / "airflow"
    if not airflow_bin.exists():
        pytest.skip("no airflow executable next to the interpreter")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    listing = subprocess.Popen(
        [str(airflow_bin), "providers", "list", "--output", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    listed_out, listed_err = listing.communicate(timeout=120)
    probe_out, probe_err = probe.communicate(timeout=120)
    assert listing.returncode == 0, listed_err[-2000:]
    assert probe.returncode == 0, probe_err[-2000:]

    # Airflow 3.0 prints log lines (starting with "[<timestamp>]") to stdout before the JSON array.
    listing_json = next(line for line in listed_out.splitlines() if line.startswith("[{"))
    providers = {p["package_name"]: p for p in json.loads(listing_json)}
    assert providers[PYPROJECT["name"]]["version"] == PYPROJECT["version"]

    found = json.loads(probe_out.strip().splitlines()[-1])
    assert found["provider_version"] == PYPROJECT["version"]
    assert found["hook"] == {
        "class": "imagegen_provider.hooks.image_generation.ImageGenerationHook",
        "conn_attr": "imagegen_conn_id",
        "package": PYPROJECT["name"],
        "name": "Image Generation",
        "testable": True,
    }
    [connection_type] = get_provider_info()["connection-types"]
    assert set(found["widget_names"]) == {f"extra__imagegen__{name}" for name in connection_type["conn-fields"]}
    # The form the UI renders (Airflow 3.2+: from conn-fields; 3.0/3.1: from the hook's wtforms widgets).
    fields = found["form"]["extra_fields"]
    assert set(fields) == set(connection_type["conn-fields"])
    assert fields["dialect"]["value"] == "openai"
    assert fields["dialect"]["schema"]["enum"] == list(DIALECTS)
    assert fields["rpm"]["schema"]["title"] == "Requests per minute"
    assert "integer" in fields["max_attempts"]["schema"]["type"]
    assert "boolean" in fields["accepts_seed"]["schema"]["type"]
    assert found["form"]["standard_fields"]["password"]["title"] == "API key"
    assert found["form"]["standard_fields"]["login"]["hidden"] is True
    behaviour = found["behaviour"]
    assert behaviour["hidden_fields"] == ["login"]
    assert behaviour["relabeling"] == {"password": "API key", "schema": "Path prefix"}


def test_extra_links_are_registered(info):
    from airflow.sdk import BaseOperatorLink

    from imagegen_provider.operators.image_generation import ImageGenerationOperator

    for path in info["extra-links"]:
        module_name, _, class_name = path.rpartition(".")
        link = getattr(importlib.import_module(module_name), class_name)
        assert issubclass(link, BaseOperatorLink)
    links = ImageGenerationOperator.operator_extra_links
    declared = {f"{type(link).__module__}.{type(link).__name__}" for link in links}
    assert declared == set(info["extra-links"])


def _source_copy(destination: Path) -> Path:
    """The repository's tracked files (what a release is built from), away from build leftovers and venvs."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    for name in filter(None, listing.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return destination


def test_release_artifacts(tmp_path):
    """``python -m build`` (isolated: setuptools from the index) then ``twine check``: the wheel is a typed
    Airflow provider with its licence, the sdist carries no tests at all (rather than half of them)."""
    import tarfile
    import zipfile
    from email.parser import Parser

    pytest.importorskip("build")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to list the release's files")
    source = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)], capture_output=True, text=True
    )
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        [license_name] = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert "Apache License" in archive.read(license_name).decode()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "imagegen_provider:get_provider_info" in archive.read(entry_points).decode()
    assert "imagegen_provider/py.typed" in names
    assert "imagegen_provider/data/prices.json" in names
    assert "Framework :: Apache Airflow :: Provider" in metadata.get_all("Classifier")
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Name"] == PYPROJECT["name"] and metadata["Version"] == PYPROJECT["version"]
    assert metadata.get_all("Project-URL")
    assert not any(n.startswith("tests/") for n in names)

    with tarfile.open(sdist) as archive:
        members = [m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name]
    assert "LICENSE" in members and "imagegen_provider/py.typed" in members
    assert not [m for m in members if m.startswith("tests")], "the sdist must not carry part of the tests"
