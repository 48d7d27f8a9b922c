#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine for kvpeer:
# a virtualenv in .venv with kvpeer, vLLM 0.33.0, the test tools and NIXL (for the
# benchmark against vLLM's p2p tier), and redis-server.
# Used by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# bench: NIXL for vLLM's p2p tier in `kvpeer bench` (about 130 MB download, 240 MB installed).
.venv/bin/python -m pip install --quiet -e ".[vllm,dev,bench]"

# Debian packages: redis-server backs the directory's shared store (its tests start
# a real one); docker-compose (1.29, no Docker engine needed) validates compose/.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends redis-server docker-compose >/dev/null
fi
