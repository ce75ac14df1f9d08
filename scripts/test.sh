#!/usr/bin/env bash
# The test command (README): installs what the tests need (only when requirements changed), then
# runs the whole suite, offline, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --test
export HF_HUB_OFFLINE=1 SDNQ_USE_TORCH_COMPILE=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
