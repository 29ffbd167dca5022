#!/usr/bin/env bash
# Set up .venv (with test tools and the real models), lint, type-check, build the docs and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long real-model checks.
# The vLLM suite lives in its own venv: `bash scripts/test_vllm.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check cdlm tests benchmarks examples
.venv/bin/ruff format --check --quiet cdlm tests benchmarks examples
.venv/bin/mypy
# The docs site, strictly (a broken link, page or API reference fails), into a temporary folder, not the repo.
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site"  # no --quiet: it turns --strict off
# --durations=15: the slowest tests are named at the end of every run, so a test that grows slow is seen.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
