#!/usr/bin/env bash
# Airflow-scale proof (issue 11): the sharded example DAG on a real CeleryExecutor (Redis broker, scheduler,
# dag-processor, API server, two `airflow celery worker` processes) whose shards share one hidden gateway limit
# through Redis. About three minutes after the first install; prints a table of the figures. Everything it
# starts (redis-server, the bundled gateway, the Airflow processes) listens on 127.0.0.1 only and is stopped on
# any outcome, also on Ctrl-C or SIGTERM (tests/scale/test_celery_executor.py). Extra arguments go to pytest.
# Knobs: IMAGEGEN_CELERY_RPM (the gateway's limit R, default 240), IMAGEGEN_CELERY_LIMITER (token-bucket |
# sliding-window | fixed-window), IMAGEGEN_CELERY_CONNECTION_RPM (give the connection the limit instead of
# letting the shards learn it), IMAGEGEN_CELERY_SHARED=0 (the control: no rate_limit_backend).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo ">> installing redis-server (Debian package): the Celery broker and the shared rate limit"
        (apt-get install -y -qq redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server; }) >/dev/null
    else
        echo "redis-server is needed (apt-get install redis-server)" >&2
        exit 1
    fi
fi
source scripts/bootstrap.sh test,celery
source scripts/env.sh
export AIRFLOW_HOME="$IMAGEGEN_REPO/.airflow-test"   # the test runs its deployment in a home of its own
export IMAGEGEN_CELERY_PROOF=1
exec python -m pytest -q -s -p no:cacheprovider tests/scale/test_celery_executor.py "$@"
