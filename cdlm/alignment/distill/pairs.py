"""DistiLLM-2 pair data: one teacher response (chosen) and one student response (rejected) per prompt.

The pairs are stored as JSON lines together with the exact token ids that were generated, so the
trainer trains on the sequences the models actually produced (re-tokenising decoded text is not
always the identity for byte-level BPE). A ``<file>.settings.json`` sidecar records the generation
settings; generation is resumable: records are appended batch by batch and prompts already present
are skipped, provided the settings are unchanged.

When ``score=True`` each record also carries both models' mean per-token log-probabilities of both
responses, computed with the models that generated them. Those are the anchors ``d_0`` of the
per-sample alpha curriculum (Algorithm 1 of the paper), so the trainer needs no extra pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cdlm.alignment.parallel import main_process_first
from cdlm.models.amateur import TokenizerMismatchError, check_same_vocabulary
from cdlm.models.prompts import adds_special_tokens, eos_token_ids, render_prompts
from cdlm.textio import MalformedRowError, dumps_line, read_jsonl_numbered, read_text_lines

PAIR_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
SCORE_FIELDS = ("chosen_teacher_logp", "chosen_student_logp", "rejected_teacher_logp", "rejected_student_logp")


@dataclass
class SamplingSettings:
    """How one model's responses are drawn (greedy when ``do_sample`` is False)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False, "num_beams": 1}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class PairGenerationSettings:
    """Everything that determines the generated pairs; stored next to the data and checked on resume."""

    teacher: str
    student: str
    max_new_tokens: int = 128
    chat_template: bool = True
    teacher_sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(do_sample=False))
    student_sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int = 0
    score: bool = True
    backend: str = "transformers"  # what generated the responses ("vllm": same greedy ids, other samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CompletionGenerator = Callable[..., list[list[int]]]
"""``(prompt_ids, *, max_new_tokens, sampling, seed) -> completion ids`` (an EOS that ended a completion is
kept). ``hf_completion_generator`` builds one on ``model.generate``; the vLLM backend's
``completion_generator(engine)`` builds one on a vLLM engine."""


def hf_completion_generator(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8
) -> CompletionGenerator:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)

    def generate(prompt_ids, *, max_new_tokens: int, sampling: SamplingSettings, seed: int | None) -> list[list[int]]:
        return generate_from_ids(
            model,
            prompt_ids,
            pad_token_id=pad_id,
            eos_ids=eos_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            batch_size=batch_size,
            seed=seed,
        )

    return generate


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, rendered: Sequence[str], chat_template: bool
) -> list[list[int]]:
    add_special = adds_special_tokens(tokenizer, chat_template)
    return [tokenizer(text, add_special_tokens=add_special)["input_ids"] for text in rendered]


def shared_vocab_size(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> int:
    """The id range both heads score; raises ``TokenizerMismatchError`` on a real vocabulary mismatch.

    Heads padded past the tokenizer (e.g. to a multiple of 64) are fine: the divergences are taken
    over ``min(student head, teacher head)`` ids, which must cover every token of the tokenizer.
    """
    if teacher_tokenizer is not None:
        check_same_vocabulary(teacher_tokenizer, tokenizer, expert_name="teacher", amateur_name="student")
    vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if len(tokenizer) > vocab:
        raise TokenizerMismatchError(
            f"teacher and student do not share the tokenizer's vocabulary: the tokenizer has {len(tokenizer)} "
            f"tokens, but the student head scores {student.get_output_embeddings().weight.shape[0]} ids and the "
            f"teacher head {teacher.get_output_embeddings().weight.shape[0]}"
        )
    return vocab


@torch.no_grad()
def generate_from_ids(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingSettings,
    batch_size: int = 8,
    seed: int | None = None,
) -> list[list[int]]:
    """Batched ``generate`` from token ids (left padding); returns each completion's ids.

    A completion that stopped on an end-of-sequence token keeps that token (so a trained student
    learns to stop); one cut by ``max_new_tokens`` does not. Padding after the end is removed.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = model.device
    eos = set(eos_ids)
    outputs: list[list[int]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = [list(p) for p in prompt_ids[start : start + batch_size]]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            if seed is not None:
                torch.manual_seed(seed + start)
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=sorted(eos) or None,
                **sampling.generate_kwargs(),
            )
            for row in generated[:, width:].tolist():
                completion: list[int] = []
                for token in row:
                    completion.append(token)
                    if token in eos:
                        break
                outputs.append(completion)
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def mean_logprobs(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    vocab_size: int | None = None,
    batch_size: int = 8,
) -> list[float]:
    """Mean per-token log-probability of each completion given its prompt (0.0 for an empty one)."""
    device = model.device
    results: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start : start + batch_size]
        completions = completion_ids[start : start + batch_size]
        sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
        width = max(len(s) for s in sequences)
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        logp = torch.log_softmax(logits.float(), -1)
        for row, (p, c) in enumerate(zip(prompts, completions)):
            if not c:
                results.append(0.0)
                continue
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=logp.device)
            targets = torch.tensor(list(c), device=logp.device)
            results.append(logp[row, positions, targets].mean().item())
    return results


def _record_key(index: int, prompt: str) -> str:
    return hashlib.sha1(f"{index}\n{prompt}".encode()).hexdigest()[:16]


def settings_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".settings.json")


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Read a pair file written by :func:`generate_pairs` (or any jsonl with the same fields).

    Errors name ``file:LINE``: a line that is not JSON or not an object, a row lacking a token-id field
    or holding one that is not a list of integers.
    """
    numbered = read_jsonl_numbered(path, "pair file")
    for number, row in numbered:
        for name in PAIR_FIELDS:
            if name not in row:
                continue  # check_pair_rows names missing fields
            ids = row[name]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise MalformedRowError(f"{path}:{number}: {name!r} must be a list of token ids (integers)")
    return [row for _, row in numbered]


def generate_pairs(
    prompts: Sequence[str],
    *,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output: str | Path,
    settings: PairGenerationSettings,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
    teacher_generate: CompletionGenerator | None = None,
    student_generate: CompletionGenerator | None = None,
) -> list[dict[str, Any]]:
    """Generate (teacher, student) response pairs for ``prompts`` into the JSON-lines file ``output``.

    Responses come from ``teacher_generate`` / ``student_generate`` (default: batched HF generate on
    ``teacher`` / ``student``; pass the vLLM backend's ``completion_generator(engine)`` to generate
    there, and say so in ``settings.backend``). The models themselves still score the responses.

    Records: ``id``, ``prompt`` (as given), ``prompt_text`` (as rendered for the models),
    ``chosen``/``rejected`` (teacher/student text), ``prompt_ids``/``chosen_ids``/``rejected_ids``
    and, with ``settings.score``, the four mean log-probs in :data:`SCORE_FIELDS`.
    Returns all records in the file (old and new), in prompt order.

    Under a multi-process launch the main process generates (or completes) the file and the others then
    read it: one writer, the same pairs everywhere.
    """
    with main_process_first():
        return _write_pairs(
            prompts,
            teacher=teacher,
            student=student,
            tokenizer=tokenizer,
            output=output,
            settings=settings,
            student_tokenizer=student_tokenizer,
            batch_size=batch_size,
            on_batch=on_batch,
            teacher_generate=teacher_generate,
            student_generate=student_generate,
        )


def _write_pairs(
    prompts: Sequence[str],
    *,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output: str | Path,
    settings: PairGenerationSettings,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
    teacher_generate: CompletionGenerator | None = None,
    student_generate: CompletionGenerator | None = None,
) -> list[dict[str, Any]]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt set is empty: give at least one prompt to generate pairs for")
    blank = [i for i, p in enumerate(prompts) if not str(p).strip()]
    if blank:
        raise ValueError(f"{len(blank)} prompt(s) are empty or whitespace (first at index {blank[0]})")
    vocab = shared_vocab_size(
        student, teacher, student_tokenizer or tokenizer, tokenizer if student_tokenizer else None
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    meta_path = settings_path(output)
    meta = {"format": "cdlm.distill.pairs/1", **settings.to_dict()}
    existing: list[dict[str, Any]] = []
    if output.exists():
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old != meta:
                changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(
                    f"{output} was generated with different settings ({', '.join(changed)}); "
                    "resume with the same settings or write to a new file"
                )
        existing = read_pairs(output)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    done = {row["id"] for row in existing}
    rendered = render_prompts(tokenizer, prompts, settings.chat_template)
    todo = [(i, _record_key(i, p)) for i, p in enumerate(prompts) if _record_key(i, p) not in done]
    teacher_generate = teacher_generate or hf_completion_generator(teacher, tokenizer, batch_size)
    student_generate = student_generate or hf_completion_generator(student, tokenizer, batch_size)
    finished = len(prompts) - len(todo)
    with output.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            texts = [rendered[i] for i, _ in batch]
            prompt_ids = encode_prompts(tokenizer, texts, settings.chat_template)
            seed = settings.seed + batch[0][0]
            chosen = teacher_generate(
                prompt_ids, max_new_tokens=settings.max_new_tokens, sampling=settings.teacher_sampling, seed=seed
            )
            rejected = student_generate(
                prompt_ids,
                max_new_tokens=settings.max_new_tokens,
                sampling=settings.student_sampling,
                seed=seed + 1_000_003,
            )
            scores: dict[str, list[float]] = {}
            if settings.score:
                scores = {
                    "chosen_teacher_logp": mean_logprobs(
                        teacher, prompt_ids, chosen, vocab_size=vocab, batch_size=batch_size
                    ),
                    "chosen_student_logp": mean_logprobs(
                        student, prompt_ids, chosen, vocab_size=vocab, batch_size=batch_size
                    ),
                    "rejected_teacher_logp": mean_logprobs(
                        teacher, prompt_ids, rejected, vocab_size=vocab, batch_size=batch_size
                    ),
                    "rejected_student_logp": mean_logprobs(
                        student, prompt_ids, rejected, vocab_size=vocab, batch_size=batch_size
                    ),
                }
            for row, ((index, key), text) in enumerate(zip(batch, texts)):
                record = {
                    "id": key,
                    "index": index,
                    "prompt": prompts[index],
                    "prompt_text": text,
                    "chosen": tokenizer.decode(chosen[row], skip_special_tokens=True),
                    "rejected": tokenizer.decode(rejected[row], skip_special_tokens=True),
                    "prompt_ids": prompt_ids[row],
                    "chosen_ids": chosen[row],
                    "rejected_ids": rejected[row],
                    **{name: values[row] for name, values in scores.items()},
                }
                handle.write(dumps_line(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            finished += len(batch)
            if on_batch is not None:
                on_batch(finished, len(prompts))
    rows = read_pairs(output)
    order = {_record_key(i, p): i for i, p in enumerate(prompts)}
    return sorted(rows, key=lambda r: order.get(r["id"], len(order) + r.get("index", 0)))


def read_prompts(path: str | Path, field: str | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per line, split at ``"\\n"`` only) or JSON lines (``field``, default
    ``prompt``/``question``/``instruction``); ``limit``: the first N."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    path = Path(path)
    prompts: list[str] = []
    if path.suffix in (".jsonl", ".json"):
        for number, row in read_jsonl_numbered(path, "prompt file"):
            key = field or next((k for k in ("prompt", "question", "instruction") if k in row), None)
            if key is None or key not in row:
                raise MalformedRowError(
                    f"{path}:{number} has no field {field or 'prompt/question/instruction'!r} (has {sorted(row)})"
                )
            if not isinstance(row[key], str):
                raise MalformedRowError(f"{path}:{number}: {key!r} must be text, got {type(row[key]).__name__}")
            prompts.append(row[key])
    else:
        prompts = read_text_lines(path, "prompt file")
    if not prompts:
        raise ValueError(f"the prompt set {path} is empty")
    return prompts[:limit] if limit is not None else prompts


def check_pair_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate token-id pair rows; returns them as a list (ValueError naming the first problem)."""
    rows = list(rows)
    if not rows:
        raise ValueError("the pair dataset is empty")
    for number, row in enumerate(rows):
        missing = [name for name in PAIR_FIELDS if name not in row]
        if missing:
            raise ValueError(f"pair row {number} lacks {missing} (have {sorted(row)})")
        if not row["prompt_ids"]:
            raise ValueError(f"pair row {number} has an empty prompt")
        if not row["chosen_ids"] and not row["rejected_ids"]:
            raise ValueError(f"pair row {number} has neither a teacher nor a student response")
    return rows
