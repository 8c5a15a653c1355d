#!/usr/bin/env bash
# Set up and run the project's static checks: ruff (lint + import order) and mypy (strict for wire/ and transport/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh "test,stores,lint"
.venv/bin/ruff check imagegen_provider imagegen_gateway tests bench dags
.venv/bin/mypy
