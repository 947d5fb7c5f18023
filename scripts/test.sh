#!/usr/bin/env bash
# The whole test suite (run inside the environment scripts/setup.sh made).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider "$@"
