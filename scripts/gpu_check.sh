#!/usr/bin/env bash
# The checks that need a CUDA machine, in one run, with one results file.
#
#   bash scripts/gpu_check.sh                 # on a CUDA machine: set up, run everything, write the results
#   bash scripts/gpu_check.sh --dry-run       # anywhere: the same plumbing on CPU with tiny settings
#   bash scripts/gpu_check.sh --only trainers # one group: decoding, hellaswag, trainers, parallel, sharded, vllm
#
# Results: benchmarks/results/gpu_check.json (override with GPU_CHECK_OUT=...): the machine, and per check its
# command, exit status, seconds and numbers (or the tail of its output when it failed). Work files go to
# GPU_CHECK_WORK (default /tmp/cdlm-gpu-check). Checks:
#   decoding   greedy, cd (early-exit amateur), cid and contrastive search on CUDA in float32 and bfloat16:
#              tokens compared with the CPU float32 path (float32 must match; bfloat16 reports the agreement)
#   hellaswag  `cdlm eval --task hellaswag` on CUDA float32/bfloat16 vs CPU float32 (accuracy, per-example picks)
#   trainers   one short run of every trainer on CUDA (tiny models; tests/test_distributed.py's worker) and one
#              step of `cdlm train` (DPO, SparsePO), `cdlm distill train` and `cdlm rl` on the real SmolLM2 in bf16
#   parallel   with >= 2 GPUs: the same trainer runs with `torchrun --nproc_per_node 2` (NCCL DDP), compared with
#              the 1-GPU run (losses, grad-norms, weights), and 2-process `cdlm eval`
#   sharded    with >= 1 GPU and deepspeed installed: DPO / reward model under DeepSpeed ZeRO-2 and ZeRO-3 and FSDP
#              (configs/accelerate/*.yaml); SparsePO / DistiLLM-2 under ZeRO-2; the refusals under ZeRO-3 / FSDP
#   vllm       the vLLM backend on CUDA: tests/test_vllm_backend.py in the vLLM venv and `cdlm generate --backend vllm`
# Set-up (not in --dry-run): scripts/setup.sh --dev (pip's index gives the CUDA torch build), deepspeed, and a
# CUDA vLLM in .venv-vllm (GPU_CHECK_VLLM="vllm==..." to pin it). GPU_CHECK_SKIP_SETUP=1 uses what is there.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

dry_run=0
only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="${GPU_CHECK_OUT:-$root/benchmarks/results/gpu_check.json}"
[[ $dry_run == 1 ]] && out="${GPU_CHECK_OUT:-${GPU_CHECK_WORK:-/tmp/cdlm-gpu-check}/gpu_check.dry_run.json}"
work="${GPU_CHECK_WORK:-/tmp/cdlm-gpu-check}"
rm -rf "$work/runs"; mkdir -p "$work/runs" "$(dirname "$out")"
records="$work/records.jsonl"; : > "$records"
py="$root/.venv/bin/python"

if [[ $dry_run == 0 && "${GPU_CHECK_SKIP_SETUP:-0}" != 1 ]]; then
  bash scripts/setup.sh --dev || { echo "gpu_check.sh: scripts/setup.sh failed" >&2; exit 1; }
  "$py" -m pip install --quiet deepspeed || echo "gpu_check.sh: deepspeed did not install; the sharded checks will say so"
  if [[ ! -x .venv-vllm/bin/python ]]; then
    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install --quiet "${GPU_CHECK_VLLM:-vllm}" \
      && .venv-vllm/bin/pip install --quiet --no-deps -e . || echo "gpu_check.sh: the CUDA vLLM venv failed"
  fi
fi
if [[ ! -x "$py" ]]; then echo "gpu_check.sh: no .venv; run scripts/setup.sh --dev first" >&2; exit 1; fi

gpus=$("$py" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ $dry_run == 0 && "$gpus" == 0 ]]; then
  echo "gpu_check.sh: torch sees no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU" >&2
  exit 1
fi
if [[ $dry_run == 1 ]]; then
  device=cpu; bf16=float32; model="$work/tiny-model"; limit=4; max_new=8; export OMP_NUM_THREADS=1
  "$py" -c "
from cdlm import testing
testing.tiny_llama(0).save_pretrained('$model'); testing.tiny_tokenizer().save_pretrained('$model')"
else
  device=cuda; bf16=bfloat16; model=smollm2-135m-instruct; limit=200; max_new=64
fi

wanted() { [[ -z "$only" || "$only" == "$1" ]]; }

# check NAME GROUP COMMAND...: run it, time it, record status + numbers (a JSON file the command may write to
# $CHECK_NUMBERS) + the output tail on failure.
check() {
  local name="$1"; shift
  local log="$work/runs/$name.log" numbers="$work/runs/$name.numbers.json" start end rc
  echo "== $name: $*"
  start=$(date +%s.%N)
  CHECK_NUMBERS="$numbers" "$@" > "$log" 2>&1; rc=$?
  end=$(date +%s.%N)
  "$py" - "$name" "$rc" "$start" "$end" "$log" "$numbers" "$*" >> "$records" <<'EOF'
import json, os, sys
name, rc, start, end, log, numbers, command = sys.argv[1:]
record = {"check": name, "command": command, "rc": int(rc), "seconds": round(float(end) - float(start), 1)}
if os.path.exists(numbers):
    record["numbers"] = json.load(open(numbers))
if int(rc) != 0:
    record["output_tail"] = open(log, errors="replace").read()[-4000:]
print(json.dumps(record))
EOF
  echo "   rc=$rc ($(tail -c 300 "$log" | tr '\n' ' ' | cut -c1-200))"
}

# ---------------------------------------------------------------------------------------------- decoding
decoding_compare() {  # generate with each method on CPU float32 and on $device in float32 / bf16; compare tokens
  "$py" - "$model" "$device" "$bf16" "$max_new" <<'EOF'
import json, os, subprocess, sys
model, device, bf16, max_new = sys.argv[1:]
methods = {"greedy": [], "cd": ["--amateur", "early-exit:1"], "cid": ["--contrastive-prompt", "Answer wrongly."] * 3,
           "cs": ["--penalty-alpha", "0.6", "--top-k", "4"]}
prompts = ["What is 12 + 30?", "Describe a fox in one sentence.", "Name three colours."]
def run(method, extra, dev, dtype):
    command = [sys.executable, "-m", "cdlm", "generate", "--model", model, "--device", dev, "--dtype", dtype,
               "--method", method, "--max-new-tokens", max_new, "--json", *extra]
    for p in prompts:
        command += ["--prompt", p]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
def tokens(rows):
    return [r.get("token_ids") or r.get("text") for r in rows]
numbers, failed = {}, []
for method, extra in methods.items():
    reference = tokens(run(method, extra, "cpu", "float32"))
    for dtype in ("float32", bf16):
        got = tokens(run(method, extra, device, dtype))
        same = sum(a == b for a, b in zip(reference, got))
        numbers[f"{method}/{device}/{dtype}"] = {"identical_outputs": same, "prompts": len(prompts)}
        if dtype == "float32" and same != len(prompts):
            failed.append(f"{method} {device} float32 differs from CPU float32")
json.dump({"results": numbers, "failed": failed}, open(os.environ["CHECK_NUMBERS"], "w"), indent=1)
raise SystemExit("; ".join(failed) if failed else 0)
EOF
}
wanted decoding && check decoding decoding_compare

# --------------------------------------------------------------------------------------------- hellaswag
hellaswag_compare() {
  "$py" - "$model" "$device" "$bf16" "$limit" "$work/runs/hellaswag" <<'EOF'
import json, os, subprocess, sys
model, device, bf16, limit, folder = sys.argv[1:]
def run(dev, dtype):
    out = f"{folder}/{dev}-{dtype}"
    command = [sys.executable, "-m", "cdlm", "eval", "--task", "hellaswag", "--model", model, "--device", dev,
               "--dtype", dtype, "--limit", limit, "--output-dir", out, "--json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    samples = [json.loads(l) for l in open(f"{out}/samples.jsonl")]
    return json.load(open(f"{out}/results.json")), {s["index"]: s for s in samples}
cpu_results, cpu_samples = run("cpu", "float32")
numbers, failed = {"cpu/float32": cpu_results.get("results")}, []
for dtype in ("float32", bf16):
    results, samples = run(device, dtype)
    picks = [k for k in cpu_samples if samples[k].get("pred", samples[k].get("prediction")) ==
             cpu_samples[k].get("pred", cpu_samples[k].get("prediction"))]
    numbers[f"{device}/{dtype}"] = {"results": results.get("results"), "same_pick": len(picks), "examples": len(cpu_samples)}
    if dtype == "float32" and len(picks) != len(cpu_samples):
        failed.append(f"hellaswag {device} float32 picks differ from CPU float32 on {len(cpu_samples) - len(picks)} examples")
json.dump({"results": numbers, "failed": failed}, open(os.environ["CHECK_NUMBERS"], "w"), indent=1, default=str)
raise SystemExit("; ".join(failed) if failed else 0)
EOF
}
wanted hellaswag && check hellaswag hellaswag_compare

# ---------------------------------------------------------------------------------------------- trainers
# tests/test_distributed.py's worker runs every trainer (DPO, APO-zero/down, CPO, SparsePO learned/activation,
# DistiLLM-2, reward model, PPO + resume) for a few steps on tiny models, on whatever device torch picks.
tiny="$work/tiny"
"$py" -c "
from cdlm import testing
testing.tiny_llama(0).save_pretrained('$tiny'); testing.tiny_tokenizer().save_pretrained('$tiny')"
if wanted trainers; then
  check trainers_tiny_1gpu "$py" tests/test_distributed.py --worker "$work/runs/one" --model-dir "$tiny"
  "$py" - "$work/runs/pairs.jsonl" <<'EOF'
import json, sys
sys.path.insert(0, "tests")
from test_distributed import PAIRS
with open(sys.argv[1], "w") as handle:
    handle.writelines(json.dumps(row) + "\n" for row in PAIRS * 4)
EOF
  for method in dpo sparsepo; do
    check "train_${method}_real" "$py" -m cdlm train --model "$model" --device "$device" --dtype "$bf16" --method "$method" \
      --dataset "$work/runs/pairs.jsonl" --max-steps 2 --per-device-train-batch-size 2 --max-length 128 \
      --output-dir "$work/runs/train_$method"
  done
  check distill_real "$py" -m cdlm distill train --student "$model" --teacher "$model" --device "$device" --dtype "$bf16" \
    --pairs "$work/runs/pairs.jsonl" --max-steps 2 --per-device-train-batch-size 2 --max-length 128 \
    --output-dir "$work/runs/distill"
  check rl_real "$py" -m cdlm rl --model "$model" --device "$device" --dtype "$bf16" --reward rule:gsm8k --num-prompts 8 \
    --num-iterations 1 --rollout-batch-size 8 --mini-batch-size 4 --max-new-tokens 32 --contrastive-k 2 \
    --output-dir "$work/runs/rl"
fi

# ---------------------------------------------------------------------------------------------- parallel
compare_runs() {  # compare_runs ONE_DIR TWO_DIR: tests/test_distributed.py's comparison on two worker folders
  "$py" - "$1" "$2" <<'EOF'
import json, os, sys, torch
sys.path.insert(0, "tests")
from test_distributed import CASES
one, two = sys.argv[1:]
numbers, failed = {}, []
for case in CASES:
    a, b = (json.load(open(f"{d}/{case}.json")) for d in (one, two))
    key = "loss/policy" if case == "ppo" else "loss"
    la, lb = ([e[key] for e in r["log"] if key in e] for r in (a, b))
    ga, gb = ([e["grad_norm"] for e in r["log"] if "grad_norm" in e] for r in (a, b))
    r0, r1, s = (torch.load(f"{d}/{case}.rank{r}.pt") for d, r in ((two, 0), (two, 1), (one, 0)))
    entry = {"loss_1": la, "loss_2": lb, "max_grad_norm_diff": max(abs(x - y) for x, y in zip(ga, gb)),
             "max_weight_diff_1_vs_2": max((r0[k] - s[k]).abs().max().item() for k in r0),
             "max_weight_diff_rank0_vs_rank1": max((r0[k] - r1[k]).abs().max().item() for k in r0),
             "processes": b["processes"], "seconds_1": a["seconds"], "seconds_2": b["seconds"]}
    numbers[case] = entry
    if b["processes"] != 2 or entry["max_weight_diff_rank0_vs_rank1"] != 0 or entry["max_weight_diff_1_vs_2"] > 1e-3:
        failed.append(case)
json.dump({"results": numbers, "failed": failed}, open(os.environ["CHECK_NUMBERS"], "w"), indent=1)
raise SystemExit(f"2-process runs differ: {failed}" if failed else 0)
EOF
}
if wanted parallel; then
  if [[ "$gpus" -ge 2 || $dry_run == 1 ]]; then
    [[ -d "$work/runs/one" ]] || check trainers_tiny_1gpu "$py" tests/test_distributed.py --worker "$work/runs/one" --model-dir "$tiny"
    check trainers_tiny_2proc "$py" -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py \
      --worker "$work/runs/two" --model-dir "$tiny"
    check trainers_2proc_vs_1 compare_runs "$work/runs/one" "$work/runs/two"
    check eval_hellaswag_2proc "$py" -m torch.distributed.run --standalone --nproc_per_node 2 -m cdlm eval \
      --task hellaswag --model "$model" --device "$device" --dtype float32 --limit "$limit" \
      --output-dir "$work/runs/eval_2proc" --json
  else
    echo "{\"check\": \"parallel\", \"skipped\": \"$gpus GPU(s): the 2-GPU data-parallel checks need 2\"}" >> "$records"
  fi
fi

# ----------------------------------------------------------------------------------------------- sharded
if wanted sharded; then
  if [[ $dry_run == 1 ]]; then
    echo '{"check": "sharded", "skipped": "dry run: DeepSpeed ZeRO and FSDP runs need CUDA"}' >> "$records"
  elif ! "$py" -c "import deepspeed" 2>/dev/null; then
    echo '{"check": "sharded", "skipped": "deepspeed is not importable"}' >> "$records"
  else
    n=$(( gpus >= 2 ? 2 : 1 ))
    for setup in deepspeed_zero2 deepspeed_zero3 fsdp; do
      cases="dpo cpo reward_model"
      [[ $setup == deepspeed_zero2 ]] && cases="$cases sparsepo_activation distillm2"
      check "sharded_$setup" "$root/.venv/bin/accelerate" launch --config_file "configs/accelerate/$setup.yaml" \
        --num_processes "$n" tests/test_distributed.py --worker "$work/runs/$setup" --model-dir "$tiny" --cases $cases
    done
    # SparsePO and DistiLLM-2 must refuse sharded weights with a one-line error (rc != 0 expected).
    check sharded_refusal bash -c "! '$root/.venv/bin/accelerate' launch --config_file configs/accelerate/deepspeed_zero3.yaml \
      --num_processes $n tests/test_distributed.py --worker '$work/runs/refusal' --model-dir '$tiny' --cases distillm2 \
      2>&1 | tee /dev/stderr | grep -q 'shards them'"
  fi
fi

# -------------------------------------------------------------------------------------------------- vllm
if wanted vllm; then
  if [[ $dry_run == 1 || ! -x .venv-vllm/bin/python ]]; then
    echo '{"check": "vllm", "skipped": "dry run or no .venv-vllm"}' >> "$records"
  else
    check vllm_tests .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py
    check vllm_generate .venv-vllm/bin/python -m cdlm generate --backend vllm --model "$model" --method cd \
      --amateur early-exit:1 --max-new-tokens 32 --json
  fi
fi

"$py" - "$records" "$out" "$dry_run" "$gpus" <<'EOF'
import json, platform, sys, time
records_path, out, dry_run, gpus = sys.argv[1:]
import torch
records = [json.loads(line) for line in open(records_path) if line.strip()]
machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpus": int(gpus),
           "gpu_names": [torch.cuda.get_device_name(i) for i in range(int(gpus))]}
summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": dry_run == "1", "machine": machine,
           "passed": sum(r.get("rc") == 0 for r in records), "failed": [r["check"] for r in records if r.get("rc", 0) != 0],
           "skipped": [r["check"] for r in records if "skipped" in r], "checks": records}
json.dump(summary, open(out, "w"), indent=1)
print(f"{out}: {summary['passed']} passed, failed {summary['failed']}, skipped {summary['skipped']}")
sys.exit(1 if summary["failed"] else 0)
EOF
