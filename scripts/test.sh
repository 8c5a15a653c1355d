#!/usr/bin/env bash
# Set up and run the whole test suite (unit, loopback gateway, S3 via moto, Azure Blob via Azurite, Redis, a LiteLLM
# proxy, real Airflow).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo ">> installing redis-server (Debian package) for the shared rate-limit tests"
        (apt-get install -y -qq redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server; }) >/dev/null
    else
        echo ">> redis-server not found and cannot be installed here: the Redis tests will be skipped" >&2
    fi
fi
# Azurite (npm) for the az:// tests; they skip with a reason where Node.js is missing.
./scripts/install-azurite.sh || echo ">> Azurite could not be installed: the az:// tests will be skipped" >&2
# litellm-proxy: a real LiteLLM proxy for tests/scale/test_litellm_proxy.py (adds ~25 s and ~450 MB to the install;
# it holds huggingface_hub < 2 through litellm's own pin, which datasets accepts).
source scripts/bootstrap.sh test,stores,litellm-proxy
source scripts/env.sh
# Tests get their own Airflow home so they never touch the demo's.
export AIRFLOW_HOME="$IMAGEGEN_REPO/.airflow-test"
export IMAGEGEN_OUTPUT_ROOT="$IMAGEGEN_REPO/.airflow-test/output"
exec python -m pytest -q -p no:cacheprovider "$@"
