#!/usr/bin/env bash
# Install Azurite (Microsoft's Azure Storage emulator, npm) into the project-local .tools/ folder, for the az://
# output tests. The tests start its blob service on a free loopback port and skip (with a reason) without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .tools/node_modules/.bin/azurite-blob ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo ">> npm not found: skipping Azurite (the az:// tests will be skipped); install Node.js >= 18 to run them" >&2
    exit 0
fi
echo ">> npm install azurite into .tools/"
npm install --prefix .tools --no-audit --no-fund --loglevel=error azurite >/dev/null
