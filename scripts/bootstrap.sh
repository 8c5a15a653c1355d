# Source me: create .venv and install the project with the given extras, once per change of pyproject.toml.
# shellcheck shell=bash
set -euo pipefail
_extras="${1:-}"
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_python="${PYTHON:-python3}"
if ! "$_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
[ -x "$_repo/.venv/bin/python" ] || "$_python" -m venv "$_repo/.venv"
_stamp="$_repo/.venv/.installed-${_extras:-base}"
if [ ! -f "$_stamp" ] || [ "$_repo/pyproject.toml" -nt "$_stamp" ]; then
    echo ">> installing airflow-provider-imagegen${_extras:+[$_extras]} into .venv (about 2 minutes the first time)"
    "$_repo/.venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
    "$_repo/.venv/bin/pip" install --quiet --disable-pip-version-check -e "$_repo${_extras:+[$_extras]}"
    touch "$_stamp"
fi
