#!/usr/bin/env bash
# Set up a virtual environment in .venv with lora_ft and its test tools (CPU machine).
# torch is pinned to the 2.13.0 CPU wheel first: a bare "torch" requirement can pull a multi-GB CUDA build.
# On a GPU machine, install the torch build you need first and skip the pin: TORCH_SPEC=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
spec=${TORCH_SPEC:-torch==2.13.0}
if [ "$spec" != skip ] && ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check "$spec"
fi
python -m pip install -q --disable-pip-version-check -e ".[dev]"
python -c "import lora_ft, torch, transformers, peft, bitsandbytes; print('lora_ft ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
