#!/usr/bin/env bash
# The CUDA tests (tests/test_gpu.py, marker gpu) on a machine with a CUDA GPU and no package index.
#   bash scripts/gpu-check.sh [PYTEST ARGS]
# Needs python3 with torch (CUDA build), transformers and peft. svd-serve itself is not installed: the
# checkout is put on the path as the package (svd_serve + converters as svd_serve.converters).
# Anything else the machine lacks comes from wheels/ (optional, git-ignored); prepare it anywhere with
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels \
#     pytest pluggy iniconfig packaging click tqdm pyyaml safetensors scipy \
#     matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
# (60.4 MiB on 2026-12-07, scipy 33.7 MiB of it: leave out what the machine has). Only the wheels of
# distributions missing there are installed, into a scratch folder, never into the machine's Python.
# Env: PYTHON (default python3), OUT (where gpu-check.log and gpu-junit.xml go), GPU_CHECK_TIMEOUT
# (seconds for pytest, default 450). Exit status: pytest's; 1 when there is no CUDA device.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || true)}
if [ -z "$PY" ]; then
    echo "error: no python3 on PATH (set PYTHON)" >&2
    exit 1
fi
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # (absolute: pytest runs elsewhere)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
    "$PY" -c "import torch; print(f'error: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}):'
                                  ' the GPU tests did not run')" >&2 2>/dev/null \
        || echo "error: $PY cannot import torch: the GPU tests did not run" >&2
    exit 1
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/svd-serve-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/svd-serve-gpu-check-out.XXXXXX")}
mkdir -p "$SITE/svd_serve" "$OUT"

# the checkout as the package svd_serve, with converters/ as svd_serve.converters (as pyproject maps it)
ln -s "$REPO"/svd_serve/* "$SITE/svd_serve/"
ln -s "$REPO/converters" "$SITE/svd_serve/converters"

wheels=()
for whl in "$REPO"/wheels/*.whl; do
    [ -e "$whl" ] || continue
    dist=$(basename "$whl" | cut -d- -f1)
    "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || wheels+=("$whl")
done
if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing ${#wheels[@]} wheel(s) from wheels/ into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" || exit 1
fi

"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
start=$SECONDS
# (run outside the checkout, so that its svd_serve/ folder does not shadow the package put together above)
cd "$WORK" && PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    timeout "${GPU_CHECK_TIMEOUT:-450}" "$PY" -m pytest -m gpu -p no:cacheprovider -rs -c "$REPO/pyproject.toml" \
    --rootdir "$REPO" --junitxml "$OUT/gpu-junit.xml" "$REPO/tests/test_gpu.py" "$@" 2>&1 | tee "$OUT/gpu-check.log"
code=${PIPESTATUS[0]}
if [ "$code" -eq 124 ]; then
    echo "error: the GPU tests ran past ${GPU_CHECK_TIMEOUT:-450} s" >&2
fi
echo "gpu-check: exit status $code after $((SECONDS - start)) s; output in $OUT/gpu-check.log"
exit "$code"
