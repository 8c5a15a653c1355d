# Source me: the project's virtualenv and a self-contained Airflow home on SQLite.
# shellcheck shell=bash
IMAGEGEN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export IMAGEGEN_REPO
export PATH="$IMAGEGEN_REPO/.venv/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$IMAGEGEN_REPO/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$IMAGEGEN_REPO/dags}"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export IMAGEGEN_OUTPUT_ROOT="${IMAGEGEN_OUTPUT_ROOT:-$IMAGEGEN_REPO/output}"
