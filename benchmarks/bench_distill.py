"""Distillation benchmark: DistiLLM-2 against KD, reverse KL, skew KL, TRL's DistillationTrainer and GKD.

Teacher SmolLM2-135M-Instruct (or ``--teacher PATH``); student = the teacher's first ``--student-layers``
decoder layers + final norm + (tied) head, initialised from the teacher, fully fine-tuned. Prompts are
cdlm's packaged GSM8K questions (train split for training, test split held out), rendered with the chat
template. Every method starts from the same student and sees the same prompts in the same order, for the
same number of optimizer steps, batch size, learning rate (constant after a linear warmup), gradient
clipping (1.0) and seed set:

  fkl                 forward KL(teacher || student) per token on the teacher's greedy responses (plain KD)
  rkl                 reverse KL(student || teacher) per token on the same teacher responses
  skl                 DistiLLM's skew KL, KL(p || 0.1 p + 0.9 q), on the teacher responses
                      (fkl / rkl / skl: this script's own loop, AdamW, token-mean loss)
  distillm2           cdlm's DistiLLM2Trainer as benchmarks/distill_demo.py runs it: SKL on teacher responses +
                      SRKL on responses sampled (T=1) once from the initial student, beta 0.5 -> 0.75 linearly,
                      per-sample adaptive alpha (Algorithm 1)
  trl_distill         TRL's DistillationTrainer with its defaults (on-policy samples of the current student,
                      generalised JSD beta=1.0, i.e. reverse KL; temperature 1)
  trl_distill_jsd0.5  the same with beta=0.5 (JSD)
  gkd                 trl.experimental.gkd.GKDTrainer with its defaults (lmbda=0.5: half of the steps on-policy
                      student samples at T=0.9, the others the teacher responses; JSD beta=0.5)

Held-out metrics (GSM8K test prompts, at step 0 and every ``--eval-every`` steps): KL(teacher||student) per
token on the teacher's greedy responses; KL(student||teacher) per token on the student's own samples (T=1);
the teacher's log-prob per token of the student's greedy answers; answer match (final number, "#### N" or the
last number, of the student's greedy answer == that of the teacher's) and ROUGE-L F1 against the teacher's
answer; plus the student's log-likelihood of the teacher responses and GSM8K gold accuracy.

Output (``--out``, default benchmarks/results/distill_gpu/): ``records.jsonl`` (one record per evaluation, per
finished run and per failure, appended as the runs go; a rerun skips the (method, seed) runs that finished
with the same settings), ``table.md`` (final row per method, mean +- std over seeds and vs the initial
student), ``summary.json`` and ``curves.png``. Teacher responses and student samples are cached in ``--work``.

    # the GPU run (one H200): 7 methods x 3 seeds, 300 steps x 16 prompts, responses <= 128 tokens;
    # about 11 minutes (measured per-step costs below), the on-policy TRL runs being the long pole
    PYTHONPATH=. python benchmarks/bench_distill.py --device cuda --time-budget 900
    # CPU smoke run
    python benchmarks/bench_distill.py --device cpu --train 8 --eval 4 --steps 2 --eval-every 1 \\
        --max-new-tokens 8 --seeds 0 --batch-size 2 --out /tmp/bd_out --work /tmp/bd_work

Runs go to ``--workers`` processes sharing the device (default on CUDA: up to 12): the models are small, so one
process leaves most of the GPU idle (kernel-launch bound, about 0.1-0.25 s per step on an H200), and the
on-policy trainers spend most of their time in ``generate`` (about 1.3-1.7 s per step for 16 x 128 tokens),
so one 300-step TRL run alone takes 7-9 minutes. ``--time-budget`` stops starting runs that would not finish
in time (judged by finished runs of the same method) and stops running ones at the deadline (recorded as
"stopped" at the step reached); ``--report-only`` rewrites the table and plot from the records.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import random
import re
import statistics
import sys
import time
import traceback
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

ALL_METHODS = ("fkl", "rkl", "skl", "distillm2", "trl_distill", "trl_distill_jsd0.5", "gkd")
# Longest first (the on-policy trainers generate every step), so parallel workers finish together.
COST_ORDER = ("trl_distill", "trl_distill_jsd0.5", "gkd", "distillm2", "skl", "fkl", "rkl")
METRICS = (
    ("kl_teacher_student", "KL(t‖s) teacher resp.", "lower"),
    ("kl_student_teacher", "KL(s‖t) own samples", "lower"),
    ("teacher_logp_student_greedy", "teacher log p(s greedy)", "higher"),
    ("answer_match", "answer match vs teacher", "higher"),
    ("rouge_l", "ROUGE-L F1 vs teacher", "higher"),
    ("student_logp_teacher_responses", "s log p(teacher resp.)", "higher"),
    ("gold_accuracy", "GSM8K gold acc.", "higher"),
)
SKL_ALPHA = 0.1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} pid {os.getpid()}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ text metrics

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """GSM8K-style final answer: the number after ``####`` if there is one, else the last number in the text."""
    marked = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    found = marked.group(1) if marked else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    found = found.replace(",", "").rstrip(".")
    try:
        value = float(found)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over ``a`` (Hyyro 2004): O(len(b)) big-int steps."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for position, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << position)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matches = row & masks.get(token, 0)
        row = ((row + matches) | (row - matches)) & full
    return len(a) - bin(row).count("1")


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased alphanumeric words."""
    cand, ref = _words(candidate), _words(reference)
    lcs = lcs_length(ref, cand)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------------ records


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line under an exclusive lock (several worker processes write the same file)."""
    line = json.dumps(record) + "\n"
    with path.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed run
            continue
    return records


def finished_runs(records: list[dict], config: str) -> set[tuple[str, int]]:
    return {(r["method"], r["seed"]) for r in records if r.get("kind") == "final" and r.get("config") == config}


def settings_key(args: argparse.Namespace) -> str:
    fields = {
        name: getattr(args, name)
        for name in (
            "teacher",
            "student_layers",
            "dtype_resolved",
            "steps",
            "batch_size",
            "lr",
            "warmup_steps",
            "train",
            "eval",
            "max_new_tokens",
            "eval_every",
        )
    }
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ models


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Evaluation samples with its own seeds; keep the training RNG streams (torch, CUDA, python) untouched."""
    state = random.getstate()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield
    random.setstate(state)


class Models:
    """Teacher (frozen, in the compute dtype) and a fresh copy of the initial student per run."""

    def __init__(self, args: argparse.Namespace):
        from distill_demo import truncated_student

        from cdlm.models import load_model
        from cdlm.models.prompts import eos_token_ids

        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype_resolved)
        loaded = load_model(args.teacher, device="cpu", dtype="float32")
        self.tokenizer = loaded.tokenizer
        # The student copies the float32 weights; the teacher then runs in the compute dtype.
        self._student0 = truncated_student(loaded.model, args.student_layers)
        self.teacher = loaded.model.to(device=self.device, dtype=self.dtype).eval()
        self.teacher.requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_ids = eos_token_ids(self.teacher, self.tokenizer)
        self.vocab = min(
            self.teacher.get_output_embeddings().weight.shape[0],
            self._student0.get_output_embeddings().weight.shape[0],
        )

    def teacher_float32(self):
        """The teacher with float32 weights (compute still follows the trainer's autocast), made once.

        DistiLLM2Trainer applies the teacher's head to hidden states outside autocast; with bf16 teacher weights
        and Trainer's bf16 mixed precision (outputs converted to float32) that matmul fails on mixed dtypes.
        """
        if self.dtype == torch.float32:
            return self.teacher
        if getattr(self, "_teacher32", None) is None:
            self._teacher32 = copy.deepcopy(self.teacher).float().eval()
        return self._teacher32

    def student(self):
        """A float32 copy of the initial student on the device (the master weights; compute runs in autocast)."""
        return copy.deepcopy(self._student0).to(self.device).float()

    def params(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "teacher_M": round(count(self.teacher) / 1e6, 1),
            "student_M": round(count(self._student0) / 1e6, 1),
            "teacher_layers": self.teacher.config.num_hidden_layers,
            "student_layers": self._student0.config.num_hidden_layers,
        }


class _GreedyRows:
    """Logits processor: rows where ``mask`` is set keep only their argmax (greedy inside a sampling call)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        best = scores.argmax(-1, keepdim=True)
        onehot = torch.full_like(scores, float("-inf")).scatter_(1, best, 0.0)
        return torch.where(self.mask.to(scores.device)[:, None], onehot, scores)


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    *,
    models: Models,
    max_new_tokens: int,
    batch_size: int,
    sample: bool,
    greedy_rows: list[bool] | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Batched ``generate`` (left padding, prompts grouped by length); each completion keeps its EOS if it has one.

    ``sample``: T=1 ancestral sampling (no top-k/top-p); ``greedy_rows`` marks rows decoded greedily in the same call.
    """
    from transformers import LogitsProcessorList

    was_training = model.training
    model.eval()
    device = models.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    eos = torch.tensor(models.eos_ids, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in index)
            ids = torch.full((len(index), width), models.pad_id, dtype=torch.long)
            mask = torch.zeros((len(index), width), dtype=torch.long)
            for row, i in enumerate(index):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            kwargs: dict = {"do_sample": False, "num_beams": 1}
            if sample:
                kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
                if greedy_rows is not None and any(greedy_rows[i] for i in index):
                    rows = torch.tensor([greedy_rows[i] for i in index], dtype=torch.bool)
                    kwargs["logits_processor"] = LogitsProcessorList([_GreedyRows(rows)])
            with autocast(device, models.dtype):
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=models.pad_id,
                    eos_token_id=models.eos_ids,
                    **kwargs,
                )
            new = generated[:, width:]
            is_eos = torch.isin(new, eos)
            # length = first EOS position + 1 (EOS kept), or the full width
            full = torch.full((new.shape[0],), new.shape[1], dtype=torch.long, device=new.device)
            first = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, full)
            for row, (tokens, length) in enumerate(zip(new.tolist(), first.tolist())):
                out[index[row]] = tokens[:length]
    finally:
        model.train(was_training)
    return out


def _right_padded(pad_id: int, prompts: list[list[int]], completions: list[list[int]]):
    sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for row, (p, s) in enumerate(zip(prompts, sequences)):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
        comp[row, len(p) : len(s)] = 1
    return ids, mask, comp


# ------------------------------------------------------------------------------------------------ data


def prepare_data(args: argparse.Namespace, models: Models, work: Path) -> dict:
    """Prompts, the teacher's greedy responses (train + eval) and the initial student's T=1 samples (train), cached."""
    from cdlm.alignment.distill.pairs import encode_prompts, mean_logprobs
    from cdlm.eval_harness.data import load_rows
    from cdlm.models.prompts import render_prompts

    train_rows, train_source = load_rows(None, "gsm8k/train")
    test_rows, test_source = load_rows(None, "gsm8k/test")
    if args.train > len(train_rows) or args.eval > len(test_rows):
        raise SystemExit(f"--train <= {len(train_rows)} and --eval <= {len(test_rows)}")
    train_rows, test_rows = train_rows[: args.train], test_rows[: args.eval]
    tok = models.tokenizer
    key = hashlib.sha1(
        json.dumps(
            ["v2", args.teacher, args.student_layers, args.dtype_resolved, models.device.type, args.max_new_tokens]
            + [r["question"] for r in train_rows + test_rows]
        ).encode()
    ).hexdigest()[:12]
    path = work / f"data_{key}.json"
    if path.exists():
        log(f"data: cached {path}")
        return json.loads(path.read_text())
    began = time.perf_counter()
    questions = [r["question"] for r in train_rows + test_rows]
    prompt_ids = encode_prompts(tok, render_prompts(tok, questions, True), True)
    n = len(train_rows)
    log(f"data: teacher greedy responses for {len(questions)} prompts (<= {args.max_new_tokens} tokens)")
    teacher_ids = generate_ids(
        models.teacher,
        prompt_ids,
        models=models,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.gen_batch,
        sample=False,
    )
    log(f"data: initial-student samples (T=1) for {n} train prompts")
    student0 = models.student()
    student_ids = generate_ids(
        student0,
        prompt_ids[:n],
        models=models,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.gen_batch,
        sample=True,
        seed=0,
    )
    # DistiLLM-2's curriculum anchors (mean log-probs of both responses under both initial models).
    scores = {}
    for side, completions in (("chosen", teacher_ids[:n]), ("rejected", student_ids)):
        for who, net in (("teacher", models.teacher), ("student", student0)):
            with autocast(models.device, models.dtype):
                scores[f"{side}_{who}_logp"] = mean_logprobs(
                    net, prompt_ids[:n], completions, vocab_size=models.vocab, batch_size=args.score_batch
                )
    train = []
    for i in range(n):
        train.append(
            {
                "question": questions[i],
                "prompt_text": tok.decode(prompt_ids[i]),
                "prompt_ids": prompt_ids[i],
                "chosen_ids": teacher_ids[i],
                "rejected_ids": student_ids[i],
                "chosen": tok.decode(teacher_ids[i], skip_special_tokens=True),
                **{name: values[i] for name, values in scores.items()},
            }
        )
    evaluation = []
    for j, row in enumerate(test_rows):
        i = n + j
        evaluation.append(
            {
                "question": questions[i],
                "gold": final_number(row["answer"]),
                "prompt_ids": prompt_ids[i],
                "teacher_ids": teacher_ids[i],
                "teacher_text": tok.decode(teacher_ids[i], skip_special_tokens=True),
            }
        )
    data = {
        "train": train,
        "eval": evaluation,
        "sources": {"train": train_source, "eval": test_source},
        "generation_s": round(time.perf_counter() - began, 1),
    }
    path.write_text(json.dumps(data))
    log(f"data: done in {data['generation_s']} s -> {path}")
    return data


def data_order(seed: int, n_train: int, steps: int, batch: int) -> list[int]:
    """The prompt indices every method consumes, in order: a fresh seeded permutation per epoch."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch:
        permutation = list(range(n_train))
        random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
        order += permutation
        epoch += 1
    return order[: steps * batch]


# ------------------------------------------------------------------------------------------------ evaluation


class Evaluator:
    def __init__(self, args: argparse.Namespace, models: Models, data: dict):
        self.args, self.models = args, models
        self.rows = data["eval"]
        self.prompts = [r["prompt_ids"] for r in self.rows]
        self.teacher_ids = [r["teacher_ids"] for r in self.rows]
        self.teacher_numbers = [final_number(r["teacher_text"]) for r in self.rows]
        self.gold = [r["gold"] for r in self.rows]

    @torch.no_grad()
    def _score(self, student, completions: list[list[int]], divergence: str | None) -> dict[str, float]:
        from cdlm.alignment.distill.losses import chunked_sequence_stats
        from cdlm.alignment.distill.trainer import _logits_fn, _positions

        models = self.models
        student_fn, teacher_fn = _logits_fn(student, models.vocab), _logits_fn(models.teacher, models.vocab)
        totals = {"divergence": 0.0, "student_logp": 0.0, "teacher_logp": 0.0, "count": 0.0}
        size = self.args.score_batch
        for start in range(0, len(self.prompts), size):
            ids, mask, comp = _right_padded(
                models.pad_id, self.prompts[start : start + size], completions[start : start + size]
            )
            ids, mask, comp = ids.to(models.device), mask.to(models.device), comp.to(models.device)
            rows, cols, labels = _positions(ids, mask, comp, slice(0, ids.shape[0]))
            if labels.numel() == 0:
                continue
            with autocast(models.device, models.dtype):
                s_hidden = student.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                t_hidden = models.teacher.get_decoder()(
                    input_ids=ids, attention_mask=mask, use_cache=False
                ).last_hidden_state
                stats = chunked_sequence_stats(
                    student_hidden=s_hidden[rows, cols],
                    teacher_hidden=t_hidden[rows, cols],
                    labels=labels,
                    seq_index=rows,
                    num_sequences=ids.shape[0],
                    student_logits_fn=student_fn,
                    teacher_logits_fn=teacher_fn,
                    divergence=divergence,
                    chunk_size=self.args.chunk_size,
                    recompute=False,
                )
            for name in totals:
                totals[name] += stats[name].sum().item()
        tokens = max(totals["count"], 1.0)
        return {name: totals[name] / tokens for name in ("divergence", "student_logp", "teacher_logp")} | {
            "tokens": int(totals["count"])
        }

    def evaluate(self, student, seed: int, step: int) -> dict:
        began = time.perf_counter()
        models = self.models
        was_training = student.training
        student.eval()
        n = len(self.prompts)
        with preserved_rng(models.device):
            # One generate call: the first n rows greedy, the next n sampled at T=1.
            completions = generate_ids(
                student,
                self.prompts + self.prompts,
                models=models,
                max_new_tokens=self.args.max_new_tokens,
                batch_size=self.args.gen_batch,
                sample=True,
                greedy_rows=[True] * n + [False] * n,
                seed=10_007 * (seed + 1),  # the same draws at every step and for every method
            )
        greedy, sampled = completions[:n], completions[n:]
        on_teacher = self._score(student, self.teacher_ids, "fkl")
        on_greedy = self._score(student, greedy, None)
        on_samples = self._score(student, sampled, "rkl")
        student.train(was_training)
        texts = models.tokenizer.batch_decode(greedy, skip_special_tokens=True)
        numbers = [final_number(t) for t in texts]
        rouge = [rouge_l_f1(t, r["teacher_text"]) for t, r in zip(texts, self.rows)]
        metrics = {
            "kl_teacher_student": on_teacher["divergence"],
            "kl_student_teacher": on_samples["divergence"],
            "teacher_logp_student_greedy": on_greedy["teacher_logp"],
            "answer_match": sum(a is not None and a == b for a, b in zip(numbers, self.teacher_numbers)) / n,
            "rouge_l": sum(rouge) / n,
            "student_logp_teacher_responses": on_teacher["student_logp"],
            "gold_accuracy": sum(a is not None and a == g for a, g in zip(numbers, self.gold)) / n,
            "student_logp_own_greedy": on_greedy["student_logp"],
            "greedy_tokens_mean": on_greedy["tokens"] / n,
            "sample_tokens_mean": on_samples["tokens"] / n,
        }
        return {"metrics": metrics, "eval_s": round(time.perf_counter() - began, 2), "example": texts[0][:300]}

    def teacher_reference(self) -> dict:
        return {
            "teacher_gold_accuracy": sum(a is not None and a == g for a, g in zip(self.teacher_numbers, self.gold))
            / len(self.rows),
            "teacher_tokens_mean": sum(len(t) for t in self.teacher_ids) / len(self.rows),
        }


# ------------------------------------------------------------------------------------------------ runs


class Run:
    """One (method, seed) run: evaluation points, the time budget, the records."""

    def __init__(self, ctx: "Context", method: str, seed: int):
        self.ctx, self.method, self.seed = ctx, method, seed
        self.attempt = uuid.uuid4().hex[:10]
        self.train_s = 0.0
        self.eval_s = 0.0
        self.tokens = 0
        self.completion_tokens = 0
        self.stopped: str | None = None
        self.count_tokens = None  # trainer-based runs: state -> tokens so far
        self._started = self._mark = time.perf_counter()

    def base(self) -> dict:
        return {"config": self.ctx.config, "attempt": self.attempt, "method": self.method, "seed": self.seed}

    def pause(self) -> None:
        """Stop the training clock (before an evaluation)."""
        if self.ctx.models.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_s += time.perf_counter() - self._mark

    def resume(self) -> None:
        self._mark = time.perf_counter()

    def over_budget(self) -> bool:
        return self.ctx.deadline is not None and time.time() > self.ctx.deadline

    def evaluate(self, student, step: int, train_loss: float | None = None) -> None:
        self.pause()
        result = self.ctx.evaluator.evaluate(student, self.seed, step)
        self.eval_s += result["eval_s"]
        record = {
            **self.base(),
            "kind": "eval",
            "step": step,
            "metrics": result["metrics"],
            "train_loss": train_loss,
            "train_s": round(self.train_s, 2),
            "eval_s": result["eval_s"],
            "wall_s": round(time.perf_counter() - self._started, 2),
            "train_tokens": self.tokens,
            "example": result["example"],
        }
        append_record(self.ctx.records_path, record)
        m = result["metrics"]
        log(
            f"{self.method} seed {self.seed} step {step}: KL(t||s) {m['kl_teacher_student']:.3f} "
            f"KL(s||t) {m['kl_student_teacher']:.3f} t-logp {m['teacher_logp_student_greedy']:.3f} "
            f"match {m['answer_match']:.2f} rougeL {m['rouge_l']:.3f} (train {self.train_s:.1f}s, "
            f"eval {result['eval_s']:.1f}s)"
        )
        self.resume()

    def finish(self, steps_done: int, details: dict) -> None:
        final = not self.stopped and steps_done >= self.ctx.args.steps
        record = {
            **self.base(),
            "kind": "final" if final else "stopped",
            "step": steps_done,
            "stopped": self.stopped,
            "train_s": round(self.train_s, 2),
            "eval_s": round(self.eval_s, 2),
            "wall_s": round(time.perf_counter() - self._started, 2),
            "train_tokens": int(self.tokens),
            "completion_tokens": None if self.completion_tokens is None else int(self.completion_tokens),
            "tokens_per_s": round(self.tokens / self.train_s, 1) if self.train_s > 0 else None,
            "details": details,
        }
        append_record(self.ctx.records_path, record)
        log(
            f"{self.method} seed {self.seed}: {'done' if final else 'STOPPED (' + str(self.stopped) + ')'} "
            f"{steps_done} steps, train {self.train_s:.1f}s, {record['tokens_per_s']} tokens/s"
        )


class Context:
    def __init__(self, args: argparse.Namespace, models: Models, data: dict, deadline: float | None):
        self.args, self.models, self.data, self.deadline = args, models, data, deadline
        self.config = args.config_key
        self.records_path = Path(args.out) / "records.jsonl"
        self.evaluator = Evaluator(args, models, data)


def _lr_lambda(warmup: int):
    # as transformers' constant_with_warmup schedule (the first step runs at lr 0)
    return lambda step: min(1.0, step / warmup) if warmup > 0 else 1.0


def run_own_loop(ctx: Context, run: Run, divergence: str) -> tuple[int, dict]:
    """fkl / rkl / skl on the teacher's responses: AdamW, constant lr after a linear warmup, grad clip 1.0."""
    from cdlm.alignment.distill.losses import token_divergence
    from cdlm.alignment.distill.trainer import _logits_fn, _positions

    args, models = ctx.args, ctx.models
    torch.manual_seed(run.seed)
    student = models.student().train()
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=args.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        fused=models.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.warmup_steps))
    student_fn, teacher_fn = _logits_fn(student, models.vocab), _logits_fn(models.teacher, models.vocab)
    rows = ctx.data["train"]
    order = data_order(run.seed, len(rows), args.steps, args.batch_size)
    loss_sum = torch.zeros((), device=models.device)
    losses = 0
    step = 0
    run.resume()
    for step in range(1, args.steps + 1):
        batch = [rows[i] for i in order[(step - 1) * args.batch_size : step * args.batch_size]]
        ids, mask, comp = _right_padded(
            models.pad_id, [r["prompt_ids"] for r in batch], [r["chosen_ids"] for r in batch]
        )
        run.tokens += int(mask.sum())
        ids, mask, comp = ids.to(models.device), mask.to(models.device), comp.to(models.device)
        rows_i, cols, labels = _positions(ids, mask, comp, slice(0, ids.shape[0]))
        run.completion_tokens += labels.numel()
        with autocast(models.device, models.dtype):
            s_hidden = student.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            with torch.no_grad():
                t_hidden = models.teacher.get_decoder()(
                    input_ids=ids, attention_mask=mask, use_cache=False
                ).last_hidden_state
                t_logits = teacher_fn(t_hidden[rows_i, cols])
            s_logits = student_fn(s_hidden[rows_i, cols])
        per_token = token_divergence(divergence, t_logits, s_logits, SKL_ALPHA)
        loss = per_token.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        losses += 1
        if step % args.eval_every == 0 or step == args.steps:
            run.evaluate(student, step, train_loss=loss_sum.item() / max(losses, 1))
            loss_sum.zero_()
            losses = 0
        if run.over_budget() and step < args.steps:
            run.stopped = "time budget"
            if step % args.eval_every:
                run.evaluate(student, step)
            break
    run.pause()
    details = {
        "implementation": "bench_distill.py loop (AdamW, token-mean loss over the teacher-response tokens)",
        "divergence": {"fkl": "KL(p||q)", "rkl": "KL(q||p)", "skl": f"KL(p||{SKL_ALPHA}p+{1 - SKL_ALPHA}q)"}[
            divergence
        ],
        "data": "teacher greedy responses (off-policy, fixed)",
    }
    return step, details


def _trainer_callback(ctx: Context, run: Run, model_ref: dict):
    from transformers import TrainerCallback

    class EvalAndBudget(TrainerCallback):
        def __init__(self):
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if run.count_tokens is not None:
                run.tokens = run.count_tokens(state)
            if step % ctx.args.eval_every == 0 or step == ctx.args.steps:
                loss = statistics.fmean(self.losses) if self.losses else None
                self.losses = []
                run.evaluate(model_ref["model"], step, train_loss=loss)
            if run.over_budget() and step < ctx.args.steps:
                run.stopped = "time budget"
                control.should_training_stop = True
                if step % ctx.args.eval_every:
                    run.evaluate(model_ref["model"], step)
            return control

    return EvalAndBudget()


def _common_training_args(ctx: Context, run: Run, method: str) -> dict:
    args = ctx.args
    cuda = ctx.models.device.type == "cuda"
    return dict(
        output_dir=str(Path(args.work) / "trainer" / f"{method}_{run.seed}_{run.attempt}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=run.seed,
        data_seed=run.seed,
        bf16=ctx.models.dtype == torch.bfloat16,
        fp16=False,
        use_cpu=not cuda,
        gradient_checkpointing=False,
        dataloader_pin_memory=cuda,
        dataloader_num_workers=0,
    )


def _quiet(trainer) -> None:
    """Progress goes to stderr through the evaluation lines; drop Trainer's printed log dicts (stdout)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


def _sequential(trainer_class):
    """The trainer with its sampler replaced by the given order (every method sees the same prompts)."""

    class Ordered(trainer_class):
        def _get_train_sampler(self, *unused, **kwargs):
            dataset = self.train_dataset
            return torch.utils.data.SequentialSampler(dataset)

    Ordered.__name__ = f"Ordered{trainer_class.__name__}"
    return Ordered


def run_distillm2(ctx: Context, run: Run) -> tuple[int, dict]:
    from cdlm.alignment.distill.config import DistiLLM2Config
    from cdlm.alignment.distill.trainer import DistiLLM2Trainer

    args = ctx.args
    torch.manual_seed(run.seed)
    student = ctx.models.student()
    rows = ctx.data["train"]
    order = data_order(run.seed, len(rows), args.steps, args.batch_size)
    fields = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_teacher_logp", "chosen_student_logp")
    fields += ("rejected_teacher_logp", "rejected_student_logp")
    ordered = [{k: rows[i][k] for k in fields} for i in order]
    method = dict(loss_type="distillm2", beta_schedule="linear", beta_increase=0.5, beta_max=0.75, adaptive_alpha=True)
    config = DistiLLM2Config(
        **_common_training_args(ctx, run, "distillm2"),
        chunk_size=args.chunk_size,
        max_length=None,
        **method,
    )
    ref = {"model": student}
    trainer = _sequential(DistiLLM2Trainer)(
        student,
        ctx.models.teacher_float32(),
        args=config,
        train_dataset=ordered,
        processing_class=ctx.models.tokenizer,
        callbacks=[_trainer_callback(ctx, run, ref)],
    )
    ref["model"] = trainer.model
    _quiet(trainer)
    # Both sequences of every pair go through both models: prompt twice, teacher and student response.
    cumulative = [0]
    for r in ordered:
        cumulative.append(cumulative[-1] + 2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]))
    run.count_tokens = lambda state: cumulative[state.global_step * args.batch_size]
    run.resume()
    trainer.train()
    run.pause()
    steps = trainer.state.global_step
    seen = ordered[: steps * args.batch_size]
    run.tokens = cumulative[len(seen)]
    run.completion_tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in seen)
    details = {
        "implementation": "cdlm.alignment.distill.DistiLLM2Trainer",
        **method,
        "alpha": config.alpha,
        "data": "teacher greedy responses + initial-student T=1 samples (fixed pairs)",
        "teacher_weights": "float32 (bf16 autocast) to work around a dtype mismatch in the trainer's head"
        if ctx.models.dtype != torch.float32
        else "float32",
    }
    return steps, details


def _prompt_value(ctx: Context, row: dict):
    """TRL's prompt column: conversational when the tokenizer has a chat template (TRL renders it the same way)."""
    if getattr(ctx.models.tokenizer, "chat_template", None):
        return [{"role": "user", "content": row["question"]}]
    return row["prompt_text"]


def run_trl_distill(ctx: Context, run: Run, beta: float | None) -> tuple[int, dict]:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    args = ctx.args
    torch.manual_seed(run.seed)
    student = ctx.models.student()
    rows = ctx.data["train"]
    order = data_order(run.seed, len(rows), args.steps, args.batch_size)
    dataset = Dataset.from_list([{"prompt": _prompt_value(ctx, rows[i])} for i in order])
    extra = {} if beta is None else {"beta": beta}
    config = DistillationConfig(
        **_common_training_args(ctx, run, "trl_distill"),
        max_completion_length=args.max_new_tokens,
        shuffle_dataset=False,
        **extra,
    )
    ref = {"model": student}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=ctx.models.teacher,
        args=config,
        train_dataset=dataset,
        processing_class=ctx.models.tokenizer,
        callbacks=[_trainer_callback(ctx, run, ref)],
    )
    ref["model"] = trainer.model
    _quiet(trainer)
    run.count_tokens = lambda state: int(state.num_input_tokens_seen)
    run.resume()
    trainer.train()
    run.pause()
    run.tokens = int(trainer.state.num_input_tokens_seen)
    run.completion_tokens = None  # not exposed by the trainer (prompt + completion tokens are)
    details = {
        "implementation": "trl.DistillationTrainer",
        "beta": config.beta,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_completion_length": config.max_completion_length,
        "data": "on-policy: a fresh T=1 sample of the current student per prompt every step",
        "changed_from_defaults": "lr, max_steps, batch, constant_with_warmup schedule, max_completion_length "
        "(512 -> --max-new-tokens), gradient_checkpointing off, shuffle off (same order as the others)"
        + ("" if beta is None else f", beta={beta}"),
    }
    return trainer.state.global_step, details


def run_gkd(ctx: Context, run: Run) -> tuple[int, dict]:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = ctx.args
    torch.manual_seed(run.seed)
    student = ctx.models.student()
    rows = ctx.data["train"]
    order = data_order(run.seed, len(rows), args.steps, args.batch_size)
    records = []
    for i in order:
        r = rows[i]
        ids = list(r["prompt_ids"]) + list(r["chosen_ids"])
        records.append(
            {
                "prompt": r["prompt_text"],
                "messages": [
                    {"role": "user", "content": r["question"]},
                    {"role": "assistant", "content": r["chosen"]},
                ],
                "input_ids": ids,
                "completion_mask": [0] * len(r["prompt_ids"]) + [1] * len(r["chosen_ids"]),
            }
        )
    dataset = Dataset.from_list(records)
    config = GKDConfig(
        **_common_training_args(ctx, run, "gkd"),
        max_new_tokens=args.max_new_tokens,
        max_length=None,
    )
    counter = {"tokens": 0, "completion": 0}

    class CountingGKD(_sequential(GKDTrainer)):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # GKD swaps in the on-policy sequences in place; count what the loss actually saw.
            counter["tokens"] += int(inputs["attention_mask"].sum())
            counter["completion"] += int((inputs["labels"] != -100).sum())
            return loss

    ref = {"model": student}
    trainer = CountingGKD(
        model=student,
        teacher_model=ctx.models.teacher,
        args=config,
        train_dataset=dataset,
        processing_class=ctx.models.tokenizer,
        callbacks=[_trainer_callback(ctx, run, ref)],
    )
    ref["model"] = trainer.model
    _quiet(trainer)
    run.count_tokens = lambda state: counter["tokens"]
    run.resume()
    trainer.train()
    run.pause()
    run.tokens, run.completion_tokens = counter["tokens"], counter["completion"]
    details = {
        "implementation": "trl.experimental.gkd.GKDTrainer",
        "lmbda": config.lmbda,
        "beta": config.beta,
        "temperature": config.temperature,
        "seq_kd": config.seq_kd,
        "max_new_tokens": config.max_new_tokens,
        "data": "per step: with probability lmbda on-policy student samples (T=temperature), else the teacher "
        "responses (same token ids as the other methods)",
        "changed_from_defaults": "lr, max_steps, batch, constant_with_warmup schedule, max_new_tokens, "
        "gradient_checkpointing off, max_length None, sequential sampler",
    }
    return trainer.state.global_step, details


def run_job(ctx: Context, method: str, seed: int) -> None:
    run = Run(ctx, method, seed)
    log(f"start {method} seed {seed} (attempt {run.attempt})")
    try:
        if method in ("fkl", "rkl", "skl"):
            steps, details = run_own_loop(ctx, run, method)
        elif method == "distillm2":
            steps, details = run_distillm2(ctx, run)
        elif method == "trl_distill":
            steps, details = run_trl_distill(ctx, run, None)
        elif method == "trl_distill_jsd0.5":
            steps, details = run_trl_distill(ctx, run, 0.5)
        elif method == "gkd":
            steps, details = run_gkd(ctx, run)
        else:
            raise ValueError(f"unknown method {method!r}")
    except Exception as error:  # record, then go on with the other runs
        log(f"{method} seed {seed} FAILED: {error!r}")
        append_record(
            ctx.records_path,
            {
                **run.base(),
                "kind": "failed",
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-3000:],
            },
        )
        return
    finally:
        if ctx.models.device.type == "cuda":
            torch.cuda.empty_cache()
    run.finish(steps, details)


def estimated_seconds(records: list[dict], config: str, method: str) -> float:
    walls = [
        r["train_s"] + r["eval_s"]
        for r in records
        if r.get("kind") == "final" and r.get("config") == config and r["method"] == method
    ]
    return max(walls) if walls else 0.0


def worker(args_dict: dict, jobs, deadline: float | None, worker_id: int) -> None:
    """Run (method, seed) jobs from the queue until it is empty or the time budget would be exceeded."""
    args = argparse.Namespace(**args_dict)
    setup_torch(args)
    models = Models(args)
    data = json.loads(Path(args.data_path).read_text())
    ctx = Context(args, models, data, deadline)
    while True:
        try:
            method, seed = jobs.get_nowait()
        except Exception:  # queue.Empty
            return
        if deadline is not None:
            need = estimated_seconds(read_records(ctx.records_path), ctx.config, method)
            if time.time() + need > deadline:
                log(f"worker {worker_id}: skip {method} seed {seed}: the time budget would be exceeded")
                continue
        run_job(ctx, method, seed)


def setup_torch(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ------------------------------------------------------------------------------------------------ report


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: list[dict], config: str, methods: list[str], seeds: list[int]) -> dict:
    mine = [r for r in records if r.get("config") == config]
    initial = {r["seed"]: r for r in mine if r.get("kind") == "eval" and r["method"] == "initial"}
    summary: dict = {"methods": {}, "initial": {}, "failed": {}}
    if initial:
        summary["initial"] = {
            name: _mean_std([initial[s]["metrics"][name] for s in initial]) for name, _, _ in METRICS
        }
    for method in methods:
        attempts: dict[str, list[dict]] = {}
        for r in mine:
            if r["method"] == method:
                attempts.setdefault(r["attempt"], []).append(r)
        per_seed: dict[int, list[dict]] = {}
        for attempt in attempts.values():  # per seed: a finished attempt, else the one that got furthest
            seed = attempt[0]["seed"]
            rank = (any(r["kind"] == "final" for r in attempt), len(attempt))
            previous = per_seed.get(seed)
            if previous is None or rank >= (any(r["kind"] == "final" for r in previous), len(previous)):
                per_seed[seed] = attempt
        failures = [r for a in per_seed.values() for r in a if r["kind"] == "failed"]
        if failures and all(any(r["kind"] == "failed" for r in a) for a in per_seed.values()):
            summary["failed"][method] = failures[-1]["error"]
            continue
        finals, curves, ends, complete = {}, {}, {}, 0
        for seed, attempt in sorted(per_seed.items()):
            evals = sorted((r for r in attempt if r["kind"] == "eval"), key=lambda r: r["step"])
            if not evals:
                continue
            if seed in initial:
                evals = [initial[seed], *evals]
            curves[seed] = [(r["step"], r["metrics"]) for r in evals]
            finals[seed] = evals[-1]
            end = next((r for r in attempt if r["kind"] in ("final", "stopped")), None)
            if end is not None:
                ends[seed] = end
                complete += end["kind"] == "final"
        if not finals:
            continue
        row = {
            "seeds": sorted(finals),
            "complete_seeds": complete,
            "final_step": _mean_std([finals[s]["step"] for s in finals]),
            "metrics": {name: _mean_std([finals[s]["metrics"][name] for s in finals]) for name, _, _ in METRICS},
            "curves": curves,
        }
        if ends:
            row["train_s"] = _mean_std([e["train_s"] for e in ends.values()])
            row["train_tokens"] = _mean_std([e["train_tokens"] for e in ends.values()])
            rates = [e["tokens_per_s"] for e in ends.values() if e.get("tokens_per_s")]
            row["tokens_per_s"] = _mean_std(rates) if rates else None
            row["details"] = next(iter(ends.values()))["details"]
        summary["methods"][method] = row
    return summary


def _fmt(pair, digits: int = 3) -> str:
    mean, std = pair
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_table(summary: dict, header: dict) -> str:
    lines = [
        "# Distillation benchmark: " + header["title"],
        "",
        f"Command: `{header['command']}`  ",
        f"Machine: {header['machine']}; wall time of this invocation {header['wall_s']:.0f} s "
        f"({header['workers']} worker process(es)).  ",
        f"Data: {header['data']}  ",
        f"Budget per run: {header['budget']}.  ",
        f"Teacher on the held-out prompts: {header['teacher_reference']}.",
        "",
        "Final evaluation per method (mean ± std over seeds; in brackets: the change vs the initial student — ratio for "
        "the KLs, difference otherwise). KLs in nats per token; lower is better for the KLs, higher for the rest.",
        "",
    ]
    names = [label for _, label, _ in METRICS]
    lines.append("| method | seeds | " + " | ".join(names) + " | train s | train tokens | tokens/s |")
    lines.append("| --- | --- |" + " ---: |" * (len(names) + 3))
    init = summary.get("initial") or {}
    if init:
        lines.append(
            "| initial student | "
            + str(len(header["seeds"]))
            + " | "
            + " | ".join(_fmt(init[n]) for n, _, _ in METRICS)
            + " | | | |"
        )
    for method, row in summary["methods"].items():
        cells = []
        for name, _, _ in METRICS:
            value = row["metrics"][name]
            cell = _fmt(value)
            if name in init:
                base = init[name][0]
                if name.startswith("kl_"):
                    cell += f" ({value[0] / base:.2f}x)" if base else ""
                else:
                    cell += f" ({value[0] - base:+.3f})"
            cells.append(cell)
        seeds = f"{row['complete_seeds']}/{len(row['seeds'])}"
        if row["complete_seeds"] < len(row["seeds"]):
            seeds += f" (step {row['final_step'][0]:.0f})"
        train = _fmt(row["train_s"], 1) if "train_s" in row else ""
        tokens = f"{row['train_tokens'][0]:.0f}" if row.get("train_tokens") else ""
        rate = _fmt(row["tokens_per_s"], 0) if row.get("tokens_per_s") else ""
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + f" | {train} | {tokens} | {rate} |")
    for method, error in summary["failed"].items():
        lines.append(f"| {method} | failed: {error[:200]} |" + " |" * (len(names) + 3))
    lines += ["", "seeds: runs that finished all steps / runs with data. Methods:", ""]
    for method, row in summary["methods"].items():
        details = row.get("details") or {}
        lines.append(f"- `{method}`: " + "; ".join(f"{k}={v}" for k, v in details.items()))
    missing = [m for m in header["methods"] if m not in summary["methods"] and m not in summary["failed"]]
    if missing:
        lines.append(f"- not run (time budget or not reached): {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = METRICS[:6]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (name, label, better) in zip(axes.flat, shown):
        for method, row in summary["methods"].items():
            steps = sorted({step for curve in row["curves"].values() for step, _ in curve})
            means, lows, highs = [], [], []
            for step in steps:
                values = [m[name] for curve in row["curves"].values() for s, m in curve if s == step]
                means.append(statistics.fmean(values))
                lows.append(min(values))
                highs.append(max(values))
            (line,) = ax.plot(steps, means, marker=".", label=method)
            if len(row["curves"]) > 1:
                ax.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{label} ({better} is better)")
        ax.set_xlabel("step")
        if name.startswith("kl_"):
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("held-out metrics vs optimizer step (mean over seeds, band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="registered name or model folder/GGUF")
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--train", type=int, default=512, help="GSM8K train prompts (the first N)")
    parser.add_argument("--eval", type=int, default=100, help="held-out GSM8K test prompts (the first N)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 autocast on CUDA, float32 on CPU")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="parallel run processes (0: auto = min(12, cores - 2) on CUDA, 1 on CPU)",
    )
    parser.add_argument("--gen-batch", type=int, default=0, help="generation batch (0: 256 on CUDA, 16 on CPU)")
    parser.add_argument("--score-batch", type=int, default=0, help="scoring batch (0: 50 on CUDA, 8 on CPU)")
    parser.add_argument("--chunk-size", type=int, default=0, help="logit positions per chunk (0: 4096 / 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no new runs once it is near")
    parser.add_argument("--out", default=str(HERE / "results" / "distill_gpu"))
    parser.add_argument("--work", default="/tmp/cdlm_bench_distill")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the records")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "train", "eval", "eval_every", "max_new_tokens"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def resolve(args: argparse.Namespace) -> None:
    from cdlm.models.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    args.device = str(device)
    args.dtype_resolved = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    cuda = device.type == "cuda"
    args.gen_batch = args.gen_batch or (256 if cuda else 16)
    args.score_batch = args.score_batch or (50 if cuda else 8)
    args.chunk_size = args.chunk_size or (4096 if cuda else 256)
    args.teacher = args.teacher if not Path(args.teacher).exists() else str(Path(args.teacher).resolve())
    args.config_key = settings_key(args)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    resolve(args)
    setup_torch(args)
    deadline = started + args.time_budget if args.time_budget else None
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    from _machine import describe_machine

    machine = describe_machine()
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        machine += f"; GPU {torch.cuda.get_device_name()}"
    jobs = []
    if not args.report_only:
        models = Models(args)
        log(f"models: {models.params()}, device {args.device}, compute dtype {args.dtype_resolved}")
        data = prepare_data(args, models, work)
        args.data_path = str(work / "data_current.json")
        Path(args.data_path).write_text(json.dumps(data))
        ctx = Context(args, models, data, deadline)
        records = read_records(records_path)
        have_initial = {
            r["seed"]
            for r in records
            if r.get("config") == args.config_key and r.get("kind") == "eval" and r["method"] == "initial"
        }
        for seed in args.seeds:
            if seed not in have_initial:
                result = ctx.evaluator.evaluate(models.student(), seed, 0)
                append_record(
                    records_path,
                    {
                        "config": args.config_key,
                        "attempt": f"initial{seed}",
                        "method": "initial",
                        "seed": seed,
                        "kind": "eval",
                        "step": 0,
                        "metrics": result["metrics"],
                        "eval_s": result["eval_s"],
                        "example": result["example"],
                        "teacher_reference": ctx.evaluator.teacher_reference(),
                    },
                )
                log(f"initial student, seed {seed}: {json.dumps(result['metrics'])}")
        done = finished_runs(records, args.config_key)
        order = [m for m in COST_ORDER if m in args.methods]
        # Longest runs first (every seed of the on-policy trainers), so the parallel workers finish together.
        jobs = [(m, s) for m in order for s in args.seeds if (m, s) not in done]
        skipped = len(args.seeds) * len(order) - len(jobs)
        log(f"{len(jobs)} runs to do ({skipped} already finished in {records_path})")
        auto = min(12, max(1, (os.cpu_count() or 2) - 2)) if "cuda" in args.device else 1
        workers = args.workers or auto
        workers = max(1, min(workers, len(jobs))) if jobs else 0
        args.workers_used = workers
        if workers == 1:
            for method, seed in jobs:
                if deadline is not None:
                    need = estimated_seconds(read_records(records_path), args.config_key, method)
                    if time.time() + need > deadline:
                        log(f"skip {method} seed {seed}: the time budget would be exceeded")
                        continue
                run_job(ctx, method, seed)
        elif workers > 1:
            import multiprocessing as mp

            spawn = mp.get_context("spawn")
            queue = spawn.Queue()
            for job in jobs:
                queue.put(job)
            time.sleep(0.2)  # let the feeder thread fill the queue before workers poll it
            args_dict = vars(args)
            processes = [spawn.Process(target=worker, args=(args_dict, queue, deadline, i)) for i in range(workers)]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            bad = [p.exitcode for p in processes if p.exitcode]
            if bad:
                log(f"worker exit codes {bad}: see the messages above; finished runs are in {records_path}")
    # ---- report
    records = read_records(records_path)
    summary = summarize(records, args.config_key, list(args.methods), args.seeds)
    teacher_ref = next(
        (
            r.get("teacher_reference")
            for r in records
            if r.get("config") == args.config_key and r.get("teacher_reference")
        ),
        {},
    )
    header = {
        "title": f"{args.teacher} -> its first {args.student_layers} layers (+ norm + head), full fine-tuning",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "wall_s": time.time() - started,
        "workers": getattr(args, "workers_used", 0),
        "seeds": args.seeds,
        "methods": list(args.methods),
        "data": f"{args.train} GSM8K train prompts / {args.eval} GSM8K test prompts (cdlm packaged), chat template; "
        f"teacher greedy responses and student samples <= {args.max_new_tokens} new tokens",
        "budget": f"{args.steps} steps x {args.batch_size} prompts, lr {args.lr} (AdamW, constant after "
        f"{args.warmup_steps} warmup steps), grad clip 1.0, compute {args.dtype_resolved} on {args.device}; "
        f"evaluated every {args.eval_every} steps",
        "teacher_reference": ", ".join(f"{k} {v:.3f}" for k, v in teacher_ref.items()) or "n/a",
    }
    table = render_table(summary, header)
    (out / "table.md").write_text(table)
    plotted = plot_curves(summary, out / "curves.png")
    (out / "summary.json").write_text(
        json.dumps({"header": header, "config": args.config_key, "args": vars(args), "summary": summary}, indent=1)
        + "\n"
    )
    print(table)
    log(f"wrote {out / 'table.md'}, {out / 'summary.json'}" + (f", {out / 'curves.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
