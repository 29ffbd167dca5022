#!/usr/bin/env bash
# The vLLM suite: creates .venv-vllm when missing (scripts/setup_vllm.sh, several minutes), then runs
# the vLLM tests in it (the processor core against transformers, the in-process engine against
# transformers, and the OpenAI-compatible server on 127.0.0.1). Extra arguments go to pytest.
#   bash scripts/test_vllm.sh            # everything (~10 min on an idle 2-core CPU)
#   bash scripts/test_vllm.sh -k server  # one part
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv-vllm/bin/python -c "import vllm, cdlm.decoding.vllm" >/dev/null 2>&1; then
  bash scripts/setup_vllm.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec timeout "${CDLM_VLLM_TEST_TIMEOUT:-3600}" .venv-vllm/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_vllm_state.py tests/test_vllm_backend.py tests/test_vllm_server.py "$@"
