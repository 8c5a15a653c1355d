#!/usr/bin/env bash
# Airflow-scale proof (issue 11): the sharded example DAG on a real CeleryExecutor (Redis broker, scheduler,
# dag-processor, API server, two `airflow celery worker` processes) whose shards share one hidden gateway limit
# through Redis. About three minutes; prints a table of the figures. Everything it starts (redis-server, the
# bundled gateway, the Airflow processes) listens on 127.0.0.1 only and is stopped on any outcome, also on
# Ctrl-C or SIGTERM (tests/scale/test_celery_executor.py). Extra arguments go to pytest.
# Knobs: IMAGEGEN_CELERY_RPM (the gateway's limit R, default 240), IMAGEGEN_CELERY_LIMITER (token-bucket |
# sliding-window), IMAGEGEN_CELERY_CONNECTION_RPM (give the connection the limit instead of
# letting the shards learn it), IMAGEGEN_CELERY_SHARED=0 (the control: no rate_limit_backend).
# Own venv (.venv-celery; first run: about 2 minutes of installs): the celery extra resolves redis-py and
# packaging lower than the development venv has, and the test suite should not run against those.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo ">> installing redis-server (Debian package): the Celery broker and the shared rate limit"
        (apt-get install -y -qq redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server; }) >/dev/null
    else
        echo "redis-server is needed (apt-get install redis-server)" >&2
        exit 1
    fi
fi
venv="$repo/.venv-celery"
python="${PYTHON:-python3}"
stamp="$venv/.installed"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    echo ">> installing airflow-provider-imagegen[test,celery] into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check -e "$repo[test,celery]" \
        2>&1 | { grep -v "^WARNING: Location" || true; }
    touch "$stamp"
fi
# The test runs its deployment in an Airflow home of its own (a temporary directory); this one, the test suite's,
# only keeps pytest's imports off ~/airflow. exec: a SIGTERM to this script reaches pytest, which stops everything.
export PATH="$venv/bin:$PATH" PYTHONPATH="$repo" IMAGEGEN_CELERY_PROOF=1
export AIRFLOW_HOME="$repo/.airflow-test" AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__UNIT_TEST_MODE=False
exec python -m pytest -q -s -p no:cacheprovider tests/scale/test_celery_executor.py "$@"
