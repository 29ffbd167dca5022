r"""CHES scores: which preference pairs will make DPO-like training lower the chosen reply's likelihood.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization" (ICLR 2025)
trace likelihood displacement to pairs whose preferred and dispreferred replies have similar hidden embeddings.
With :math:`h_{x,z}` the model's last hidden state (the vector the unembedding multiplies) after input
:math:`(x, z)`, and the sums over the positions that predict each reply token,

.. math::

    S^{+} = \sum_{k=1}^{|y^+|} h_{x, y^+_{<k}}, \qquad S^{-} = \sum_{k=1}^{|y^-|} h_{x, y^-_{<k}},

    \mathrm{CHES}(x, y^+, y^-) = \langle S^{+}, S^{-} \rangle - \lVert S^{+} \rVert^2,

    \mathrm{CHES}_{\mathrm{norm}}(x, y^+, y^-) = \frac{\langle S^{+}, S^{-} \rangle}{|y^+|\,|y^-|}
        - \frac{\lVert S^{+} \rVert^2}{|y^+|^2}.

Higher scores mean more displacement. Pairs are tokenised exactly as the preference trainers tokenise them (TRL's
``DPOTrainer`` preprocessing: the prompt split off implicit-prompt data, EOS appended to text replies, chat
templates for conversational data), then cut to ``max_length`` tokens keeping the start, as the trainers' collator
does by default (``truncation_mode="keep_start"``). Sums are taken in float64.

:func:`score_pairs` is batched and resumable: with ``output_dir`` it appends one record per pair to
``samples.jsonl`` as batches finish, next to a ``run.json`` signature of the model weights, the data contents and
the settings; rerunning continues where it stopped and a different model, data or setting is refused.
"""

from __future__ import annotations

import math
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from datasets import Dataset

from cdlm.alignment.preference.data import with_explicit_prompt

SIGNATURE_VERSION = 1
SCORE_NAMES: tuple[str, ...] = ("ches", "ches_normalized")


@dataclass(frozen=True)
class CHESSettings:
    """What, besides the model and the data, determines the scores (part of the resume signature).

    Parameters:
        max_length: cut prompt + reply to this many tokens, keeping the start (as the trainers' collator does);
            ``None`` keeps whole sequences (a pair longer than the model's context is then refused, as is a
            ``max_length`` past it: hidden states beyond the trained positions mean nothing).
    """

    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a reply token), got {self.max_length}")


def ches_from_sums(
    chosen_sum: torch.Tensor, rejected_sum: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CHES and length-normalised CHES from the summed hidden states ``(..., d)`` and the reply token counts."""
    cross = (chosen_sum * rejected_sum).sum(-1)
    own = (chosen_sum * chosen_sum).sum(-1)
    chosen_tokens, rejected_tokens = chosen_tokens.to(cross.dtype), rejected_tokens.to(cross.dtype)
    return cross - own, cross / (chosen_tokens * rejected_tokens) - own / chosen_tokens**2


def tokenize_pairs(dataset: Dataset, tokenizer: Any) -> Dataset:
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` for every row, by TRL's own ``DPOTrainer`` preprocessing.

    Any format the preference trainers accept (standard or conversational, explicit or implicit prompt). No row is
    dropped, so row ``i`` of the result is row ``i`` of ``dataset``.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
        return dataset
    # `_prepare_dataset` needs nothing of the trainer but its tokenizer (for the EOS token), and of its config only
    # these fields (a real DPOConfig would reset accelerate's global state under a running trainer). No
    # max_length: no row is dropped here; truncation happens at scoring time.
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer_stub = types.SimpleNamespace(_tokenizer=getattr(tokenizer, "tokenizer", tokenizer))
    return DPOTrainer._prepare_dataset(trainer_stub, with_explicit_prompt(dataset), tokenizer, args, "CHES")


def check_fits_model(model: torch.nn.Module, tokenized: Dataset, settings: CHESSettings) -> None:
    """Refuse pairs longer than the model's context: positions past it give hidden states, and scores, of no meaning.

    With ``max_length`` every sequence is cut to it, so only ``max_length`` itself is compared.
    """
    from cdlm.models.prompts import context_length

    limit = context_length(model)
    if limit is None:
        return
    if settings.max_length is not None:
        if settings.max_length > limit:
            raise ValueError(f"max_length={settings.max_length} is past the model's context of {limit} tokens")
        return
    for index, row in enumerate(tokenized):
        length = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        if length > limit:
            raise ValueError(
                f"pair {index} has {length} tokens (prompt + longer reply), past the model's context of {limit}: "
                f"pass --max-length {limit} (or less) to cut pairs as training does"
            )


def _truncate(prompt: list[int], reply: list[int], max_length: int | None) -> list[int]:
    if max_length is None:
        return reply
    return reply[: max(0, max_length - len(prompt))]


@torch.no_grad()
def _response_sums(
    model: torch.nn.Module, prompts: list[list[int]], replies: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Per sequence, the float64 sum of last-layer hidden states at the positions that predict each reply token."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, replies)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    positions = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):
        sequence = prompt + reply
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        # hidden state at position t predicts token t + 1: reply tokens sit at len(prompt) .. len(sequence) - 1
        positions[row, len(prompt) - 1 : len(sequence) - 1] = True
    inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    try:  # the logits are not needed, only the last hidden states
        outputs = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    except TypeError:  # a model without `logits_to_keep`
        outputs = model(**inputs, output_hidden_states=True, use_cache=False)
    hidden = outputs.hidden_states[-1].double()
    return (hidden * positions.to(device).unsqueeze(-1)).sum(1).cpu()


def run_signature(model: torch.nn.Module, dataset: Dataset, settings: CHESSettings) -> dict[str, Any]:
    """What a resumed run must share with the records already written."""
    from cdlm.run_identity import rows_fingerprint, weights_fingerprint

    return {
        "kind": "ches",
        "version": SIGNATURE_VERSION,
        "model_weights": weights_fingerprint(model),
        "model_dtype": str(next(model.parameters()).dtype),
        "data": rows_fingerprint(dataset),
        "pairs": len(dataset),
        "settings": asdict(settings),
    }


def score_pairs(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Dataset,
    *,
    settings: CHESSettings | None = None,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """CHES records for every pair of ``dataset``, in row order.

    Each record: ``index`` (row of ``dataset``), ``ches``, ``ches_normalized``, ``chosen_tokens``,
    ``rejected_tokens`` (reply tokens scored, after truncation). A pair with no reply token left after truncation
    gets ``NaN`` scores and ``"skipped"`` saying why. With ``output_dir``, records are appended to
    ``samples.jsonl`` as each batch finishes and an interrupted run continues where it stopped (same model weights,
    data and settings, or a ``ValueError``).
    """
    from cdlm.runs import RunFolder

    settings = settings or CHESSettings()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("preference dataset is empty")
    # Everything that can be refused is refused before anything is written (a run.json would block the rerun).
    tokenized = tokenize_pairs(dataset, tokenizer)
    check_fits_model(model, tokenized, settings)
    folder = None
    done: dict[int, dict] = {}
    if output_dir is not None:
        folder = RunFolder.open(output_dir, run_signature(model, dataset, settings), overwrite=overwrite)
        done = folder.finished()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    todo = [i for i in range(len(tokenized)) if i not in done]
    rows = {i: tokenized[i] for i in todo}
    # Longest first groups similar lengths (less padding) and surfaces out-of-memory at the start.
    todo.sort(
        key=lambda i: -(len(rows[i]["prompt_ids"]) + max(len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"])))
    )
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            records = list(_score_batch(model, [rows[i] for i in batch], batch, settings, pad_id))
            if folder is not None:
                folder.append(records)
            done.update((record["index"], record) for record in records)
            if progress is not None:
                progress(len(done), len(tokenized))
    finally:
        model.train(was_training)
    return [done[i] for i in range(len(tokenized))]


def _score_batch(
    model: torch.nn.Module, rows: list[dict], indices: list[int], settings: CHESSettings, pad_id: int
) -> Iterable[dict[str, Any]]:
    prompts, chosen, rejected, scored = [], [], [], []
    for index, row in zip(indices, rows):
        prompt = list(row["prompt_ids"])
        if settings.max_length is not None:
            prompt = prompt[: settings.max_length]
        reply_chosen = _truncate(prompt, list(row["chosen_ids"]), settings.max_length)
        reply_rejected = _truncate(prompt, list(row["rejected_ids"]), settings.max_length)
        if not prompt or not reply_chosen or not reply_rejected:
            reason = "empty prompt" if not prompt else "no reply token left within max_length"
            yield {
                "index": index,
                "ches": math.nan,
                "ches_normalized": math.nan,
                "chosen_tokens": len(reply_chosen),
                "rejected_tokens": len(reply_rejected),
                "skipped": reason,
            }
            continue
        prompts.append(prompt)
        chosen.append(reply_chosen)
        rejected.append(reply_rejected)
        scored.append(index)
    if not scored:
        return
    sums = _response_sums(model, prompts + prompts, chosen + rejected, pad_id)
    chosen_sum, rejected_sum = sums[: len(scored)], sums[len(scored) :]
    chosen_tokens = torch.tensor([len(r) for r in chosen])
    rejected_tokens = torch.tensor([len(r) for r in rejected])
    ches, normalized = ches_from_sums(chosen_sum, rejected_sum, chosen_tokens, rejected_tokens)
    for position, index in enumerate(scored):
        yield {
            "index": index,
            "ches": float(ches[position]),
            "ches_normalized": float(normalized[position]),
            "chosen_tokens": int(chosen_tokens[position]),
            "rejected_tokens": int(rejected_tokens[position]),
        }


def top_fraction(records: list[dict[str, Any]], fraction: float, score: str = "ches") -> list[int]:
    """Row indices of the ``fraction`` of pairs with the highest ``score`` (count rounded; skipped pairs never)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if score not in SCORE_NAMES:
        raise ValueError(f"score must be one of {', '.join(SCORE_NAMES)}, got {score!r}")
    scored = [r for r in records if not math.isnan(r[score])]
    count = int(round(fraction * len(records)))
    ranked = sorted(scored, key=lambda r: (-r[score], r["index"]))
    return sorted(r["index"] for r in ranked[:count])


def histogram(values: list[float], bins: int = 20) -> dict[str, list[float]]:
    """Equal-width histogram of the finite values: ``edges`` (bins + 1) and ``counts``."""
    finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if finite.numel() == 0:
        return {"edges": [], "counts": []}
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        high = low + 1.0
    counts = torch.histc(finite, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}


__all__ = [
    "CHESSettings",
    "SCORE_NAMES",
    "ches_from_sums",
    "histogram",
    "run_signature",
    "score_pairs",
    "tokenize_pairs",
    "top_fraction",
]
