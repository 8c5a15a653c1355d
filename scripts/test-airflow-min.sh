#!/usr/bin/env bash
# The Airflow-facing tests on the OLDEST supported Airflow (3.0.6), in their own venv (.venv-airflow-min):
# operators, hooks, the example DAGs under `airflow dags test`, and the provider's registration.
# Airflow is installed with the pins of scripts/airflow-min-constraints.txt, as Airflow's docs prescribe.
# usage: scripts/test-airflow-min.sh [pytest args]     (first run: about 2 minutes of installs)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
venv="$repo/.venv-airflow-min"
python="${PYTHON:-python3}"
constraints="$repo/scripts/airflow-min-constraints.txt"
stamp="$venv/.installed"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ] || [ "$constraints" -nt "$stamp" ]; then
    echo ">> installing Airflow $(grep -m1 '^apache-airflow==' "$constraints" | cut -d= -f3) and the provider into $venv"
    # wtforms: Airflow < 3.2 builds the connection form from the hook's wtforms fields (tested here).
    "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints" "apache-airflow" wtforms \
        2>&1 | { grep -v "^WARNING: Location" || true; }
    # The project's own dependencies (and test tools) on top, keeping Airflow's pins.
    "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$constraints" -e "$repo[test]" \
        2>&1 | { grep -v "^WARNING: Location" || true; }
    touch "$stamp"
fi
home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
export PATH="$venv/bin:$PATH" PYTHONPATH="$repo"
export AIRFLOW_HOME="$home" IMAGEGEN_OUTPUT_ROOT="$home/output"
export AIRFLOW__CORE__DAGS_FOLDER="$repo/dags" AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__UNIT_TEST_MODE=False
python -c 'import airflow; print(">> Airflow", airflow.__version__)'
exec python -m pytest -q -p no:cacheprovider \
    tests/operators tests/hooks tests/dags tests/test_provider_info.py "$@"
