"""Pair rows as a torch dataset, their tokenisation from text, and the batch collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase
from trl.trainer.dpo_trainer import DataCollatorForPreference

from cdlm.alignment.distill.pairs import PAIR_FIELDS, SCORE_FIELDS
from cdlm.alignment.preference.data import explicit_prompt_fields


class PairDataset(TorchDataset):
    """An in-memory list of token-id pairs; mutable so on-policy re-sampling can swap responses."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = [dict(row) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def _completion_text(value: Any) -> str:
    if isinstance(value, list):  # conversational: the last assistant message
        return str(value[-1]["content"]) if value else ""
    return str(value)


def tokenize_pair_rows(rows: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Token ids for rows that carry only text (``prompt``/``chosen``/``rejected``, TRL's format).

    The prompt may also be implicit in ``chosen``/``rejected`` (TRL's implicit-prompt format); it is split off
    as TRL does (:func:`cdlm.alignment.preference.data.explicit_prompt_fields`). Rows that already hold
    ``prompt_ids``/``chosen_ids``/``rejected_ids`` (the output of
    :func:`cdlm.alignment.distill.pairs.generate_pairs`) are kept as they are. Text responses get the
    EOS token appended, as in TRL's ``DPOTrainer``.
    """
    out = []
    for number, row in enumerate(rows):
        if all(name in row for name in PAIR_FIELDS):
            out.append(row)
            continue
        missing = [name for name in ("chosen", "rejected") if name not in row]
        if missing:
            raise ValueError(f"row {number} has neither token ids {PAIR_FIELDS} nor text fields (missing {missing})")
        row = {**row, **explicit_prompt_fields(row)}
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt_ids = tokenizer.apply_chat_template(
                prompt, tokenize=True, add_generation_prompt=True, return_dict=False
            )
        else:
            prompt_ids = tokenizer(str(prompt))["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        encode = lambda text: tokenizer(_completion_text(text), add_special_tokens=False)["input_ids"] + eos  # noqa: E731
        out.append(
            {
                **row,
                "prompt_ids": list(prompt_ids),
                "chosen_ids": encode(row["chosen"]),
                "rejected_ids": encode(row["rejected"]),
            }
        )
    return out


@dataclass
class DistiLLM2Collator:
    """TRL's preference collator (chosen rows first, then rejected) plus the curriculum anchors."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        core = DataCollatorForPreference(pad_token_id=self.pad_token_id, max_length=self.max_length)
        batch = core([{name: example[name] for name in PAIR_FIELDS} for example in examples])
        if all(all(name in example for name in SCORE_FIELDS) for example in examples):
            for name in SCORE_FIELDS:
                batch[name] = torch.tensor([float(example[name]) for example in examples])
        return batch
