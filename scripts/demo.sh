#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run `kvpeer demo` with its embedded defaults.
# Extra arguments go to `kvpeer demo` (see `kvpeer demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvpeer demo "$@"
