#!/usr/bin/env bash
# Set everything up and run the example DAG on the bundled local gateway (no key, no cost, no server).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh examples
source scripts/env.sh

echo ">> Airflow home: $AIRFLOW_HOME (SQLite)"
airflow db migrate >/dev/null
# The connection points at the bundled gateway, in-process: host 'local'.
airflow connections delete imagegen_default >/dev/null 2>&1 || true
airflow connections add imagegen_default \
    --conn-type imagegen --conn-host local --conn-password local-demo-key \
    --conn-extra '{"dialect": "openai", "model": "gpt-image-1", "rpm": 600, "max_in_flight": 8}' >/dev/null
airflow pools set imagegen 4 "Concurrent image-generation shards" >/dev/null

echo ">> airflow dags test synthetic_dataset"
airflow dags test synthetic_dataset 2>&1 | grep -E "progress:|Finalized|ERROR|Traceback|Error|state=|Marking" || true

python - <<'PY'
import json, os, sys
import pandas as pd
out = os.path.join(os.environ["IMAGEGEN_OUTPUT_ROOT"], "synthetic_dataset")
summary_path = os.path.join(out, "run_summary.json")
if not os.path.exists(summary_path):
    sys.exit(f"no run summary at {summary_path}: the DAG run failed (see the log above)")
summary = json.load(open(summary_path))
table = pd.read_parquet(os.path.join(out, "metadata.parquet"))
print()
print(f"images:        {out}/images  ({summary['succeeded']} succeeded, {summary['failed']} failed, "
      f"{summary['missing']} missing)")
print(f"metadata:      {out}/metadata/  (all attempts, Parquet dataset)")
print(f"dataset table: {out}/metadata.parquet  ({len(table)} rows, {len(table.columns)} columns)")
print(f"summary:       {summary_path}  (simulated cost ${summary['total_cost_usd']:.4f}: the bundled gateway)")
sheets = summary.get("contact_sheets") or []
print(f"contact sheet: {sheets[0] if sheets else 'none written'}")
sys.exit(0 if summary["succeeded"] >= 50 else 1)
PY
