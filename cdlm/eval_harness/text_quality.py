"""Open-ended text quality metrics of the contrastive decoding and contrastive search papers.

* ``repetition_stats``: rep-2/3/4 and diversity = (1 - rep-2)(1 - rep-3)(1 - rep-4), as in SimCTG's
  released evaluation that both papers use (Su et al. 2022, arXiv 2202.06417; Li et al. 2022, arXiv
  2210.15097): tokens are the whitespace-split words of the continuation, rep-n is computed over the
  whole set of texts as ``1 - sum(unique n-grams per text) / sum(n-grams per text)``, and each text's
  n-grams are counted at start positions ``0 .. len - n - 1`` (that evaluation never counts a text's
  last n-gram; ``include_last_ngram=True`` gives the textbook count). Fractions, not percentages.
* ``mauve_score``: MAUVE (Pillutla et al. 2021) from the ``mauve-text`` package on precomputed features
  (``pip install 'cdlm[eval]'``); the papers use GPT-2 features, offline we use a local model's final
  hidden state at the last token (``score_documents``), as ``mauve-text`` does with GPT-2.
* ``coherence``: cosine similarity of prompt and continuation embeddings (Su & Collier 2022,
  arXiv 2210.14140, with SimCSE); offline, mean-pooled final hidden states of a local model stand in.
* ``score_documents``: MAUVE features and the negative log-likelihood of each continuation given its prompt
  under a (different) judge model, for perplexity, from one forward pass per document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from cdlm.models.lm_head import head_logits

REPETITION_ORDERS = (2, 3, 4)


def ngram_counts(tokens: Sequence[str], n: int, *, include_last_ngram: bool = False) -> tuple[int, int]:
    """(distinct n-grams, n-grams) of one token list, counted as SimCTG's evaluation does (see module doc)."""
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    total = max(0, len(tokens) - n + (1 if include_last_ngram else 0))
    distinct = {tuple(tokens[i : i + n]) for i in range(total)}
    return len(distinct), total


def words(text: str) -> list[str]:
    """The papers' tokens for repetition: whitespace-split words of the stripped text."""
    return text.strip().split()


def repetition(token_lists: Sequence[Sequence[str]], n: int, *, include_last_ngram: bool = False) -> float:
    """rep-n over a set of texts: 1 - (sum of distinct n-grams) / (sum of n-grams); NaN if no text has one."""
    distinct = total = 0
    for tokens in token_lists:
        d, t = ngram_counts(tokens, n, include_last_ngram=include_last_ngram)
        distinct += d
        total += t
    return 1.0 - distinct / total if total else math.nan


def repetition_stats(token_lists: Sequence[Sequence[str]], *, include_last_ngram: bool = False) -> dict[str, float]:
    """rep-2, rep-3, rep-4 and diversity = prod(1 - rep-n) of a set of texts (as token lists)."""
    stats = {f"rep-{n}": repetition(token_lists, n, include_last_ngram=include_last_ngram) for n in REPETITION_ORDERS}
    stats["diversity"] = math.prod(1.0 - stats[f"rep-{n}"] for n in REPETITION_ORDERS)
    return stats


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (rows, dim) tensors, in float32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def coherence(prompt_embeddings: torch.Tensor, continuation_embeddings: torch.Tensor) -> list[float]:
    """Per-example coherence: cos(embedding(prompt), embedding(continuation))."""
    if prompt_embeddings.shape != continuation_embeddings.shape:
        raise ValueError(
            f"prompt embeddings {tuple(prompt_embeddings.shape)} and continuation embeddings "
            f"{tuple(continuation_embeddings.shape)} differ in shape"
        )
    return cosine(prompt_embeddings, continuation_embeddings).tolist()


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Corpus perplexity: exp(total NLL / total tokens) over the examples that have tokens."""
    tokens = sum(token_counts)
    return math.exp(sum(nll_sums) / tokens) if tokens else math.nan


MAUVE_MIN_TEXTS = 2  # per side: fewer leaves nothing to cluster


def check_mauve_available() -> None:
    """Raise ``MissingDependencyError`` (one line naming the extra) when ``mauve-text`` is not installed."""
    import importlib.util

    from cdlm.errors import MissingDependencyError

    if importlib.util.find_spec("mauve") is None:
        raise MissingDependencyError("MAUVE needs the `mauve-text` package: pip install 'cdlm[eval]'")


def mauve_score(p_features, q_features, *, seed: int = 25, num_buckets: str | int = "auto") -> float:
    """MAUVE between feature sets P (reference, e.g. human text) and Q (model text), ``mauve-text``'s defaults.

    Features are (n, dim) arrays; ``num_buckets="auto"`` is ``mauve-text``'s n/10 clusters. The seed
    fixes the k-means initialisation, so the same features always give the same score.
    """
    check_mauve_available()
    import mauve
    import numpy as np

    p = np.asarray(p_features, dtype=np.float32)
    q = np.asarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"MAUVE needs two (n, dim) feature arrays of the same dim, got {p.shape} and {q.shape}")
    if len(p) < MAUVE_MIN_TEXTS or len(q) < MAUVE_MIN_TEXTS:
        raise ValueError(f"MAUVE needs at least {MAUVE_MIN_TEXTS} texts per side, got {len(p)} and {len(q)}")
    result = mauve.compute_mauve(p_features=p, q_features=q, seed=seed, num_buckets=num_buckets, verbose=False)
    return float(result.mauve)


@dataclass
class HiddenStateFeatures:
    """Text embeddings from a local causal LM's final hidden states (after its final norm).

    ``mean_pooled``: the mean over the text's tokens (the SimCSE stand-in for coherence). Texts are encoded
    with the model's own tokenizer (its special tokens included), in batches.
    """

    model: torch.nn.Module
    tokenizer: object
    batch_size: int = 16
    max_length: int = 512

    def _encode(self, texts: Sequence[str]):
        for start in range(0, len(texts), self.batch_size):
            chunk = [
                text if text.strip() else (self.tokenizer.eos_token or " ")
                for text in texts[start : start + self.batch_size]
            ]
            batch = self.tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            ).to(self.model.device)
            with torch.inference_mode():
                hidden = self.model.get_decoder()(**batch).last_hidden_state.float()
            yield hidden, batch["attention_mask"]

    def mean_pooled(self, texts: Sequence[str]) -> torch.Tensor:
        rows = []
        for hidden, mask in self._encode(texts):
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        return torch.cat(rows) if rows else torch.empty(0)


@dataclass
class DocumentScores:
    """What one judge pass over prompt + continuation documents yields."""

    features: torch.Tensor  # (N, hidden): final hidden state at each document's last token (MAUVE's features)
    nll: list[tuple[float, int]]  # per document: (sum of -log p(continuation tokens | prompt), their number)


def score_documents(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    with_nll: bool = True,
) -> DocumentScores:
    """MAUVE features and continuation NLL of prompt + continuation documents, from one forward each.

    Prompt and continuation are tokenised separately with ``model``'s tokenizer (the prompt with its
    special tokens), so the split point is exact whatever tokenizer produced the text; the lm_head runs
    on continuation positions only (a large-vocabulary judge's head costs more than its body). An empty
    continuation gives (0.0, 0) and the prompt's last-token feature. Without ``with_nll`` no head runs
    and every NLL is (0.0, 0).
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    encoded = []
    for prompt, continuation in zip(prompts, continuations):
        context = tokenizer(prompt)["input_ids"]
        target = tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else []
        encoded.append((context, target))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    features: list[torch.Tensor] = []
    nll: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(c) + len(t) for c, t in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (context, target) in enumerate(chunk):  # right padding: positions start at 0 in every row
            sequence = context + target
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        rows, positions, targets = [], [], []
        for row, (context, target) in enumerate(chunk):  # the hidden state before each continuation token
            rows += [row] * len(target)
            positions += range(len(context) - 1, len(context) + len(target) - 1)
            targets += target
        with torch.inference_mode():
            hidden = model.get_decoder()(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device)
            ).last_hidden_state
            last = torch.tensor([len(c) + len(t) - 1 for c, t in chunk])
            features.append(hidden[torch.arange(len(chunk)), last].float())
            if not with_nll:
                nll += [(0.0, 0)] * len(chunk)
                continue
            picked_hidden = hidden[torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)]
            log_probs = torch.log_softmax(head_logits(model, picked_hidden).float(), dim=-1)
            picked = -log_probs[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)]
        start_of_row = 0
        for _, target in chunk:
            nll.append((float(picked[start_of_row : start_of_row + len(target)].sum()), len(target)))
            start_of_row += len(target)
    return DocumentScores(torch.cat(features) if features else torch.empty(0), nll)
