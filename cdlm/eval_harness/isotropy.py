"""Isotropy of a model's token representations, layer by layer (Su & Collier 2022).

Contrastive search penalises a candidate token by its largest cosine similarity with the tokens
before it. That penalty only separates repetitive from fresh continuations if token representations
are *isotropic*: spread out, so that unrelated tokens have low cosine similarity. Su & Collier
("Contrastive search is what you need for neural text generation", TMLR 2023) measure this as the
average self-similarity of the tokens within a sequence, and found anisotropy (high similarity) in
GPT-2 small and medium only, with the other LMs they tested isotropic.

Definition used here, for a text ``x`` tokenised into ``n`` tokens and one layer ``l``:

    self_similarity_l(x) = 1 / (n (n - 1)) * sum_{i != j} cos(h_l,i , h_l,j)

where ``h_l,i`` is token ``i``'s hidden state at layer ``l`` of one forward pass over ``x`` (no
padding), as transformers returns it with ``output_hidden_states=True``: layer 0 is the input
embedding output, layer ``l`` in ``1 .. N-1`` the output of decoder layer ``l`` (before the final
norm), and layer ``N`` the last layer *after* the final norm, which is the representation
contrastive search compares (``hidden_states[-1]``). Special tokens the tokenizer adds (e.g.
Gemma's ``<bos>``) are fed to the model as in normal use but left out of the pairs: a BOS token is
an attention sink with an outlier representation and is not part of the text. The reported score
of a layer is the mean of ``self_similarity_l(x)`` over the texts (each text weighs the same),
with its standard deviation; 1.0 means every token of a text has the same direction.

Default texts: the first ``DEFAULT_TEXTS`` rows of the shipped HellaSwag validation set
(``cdlm/data/hellaswag``, MIT licence) whose human-written context plus gold ending has at least
``MIN_CHARACTERS`` characters, each truncated to ``max_tokens`` tokens. The character threshold keeps
the set of texts the same for every tokenizer.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from cdlm.models.lm_head import text_config

DEFAULT_TEXTS = 200
MIN_CHARACTERS = 200
DEFAULT_MAX_TOKENS = 128
TEXT_SOURCE = "hellaswag/validation: ctx + ' ' + gold ending, rows with >= 200 characters, in file order"

__all__ = [
    "IsotropyReport",
    "LayerIsotropy",
    "default_texts",
    "layer_self_similarity",
    "self_similarity",
    "reports_markdown",
    "reports_payload",
    "summary_line",
]


def self_similarity(hidden: torch.Tensor) -> float:
    """Mean cosine similarity over ordered pairs of distinct rows of ``hidden`` (n, H), n >= 2.

    Uses ``sum_{i != j} cos = |sum_i u_i|^2 - n`` for unit vectors ``u_i``, so it costs O(n H), not O(n^2 H).
    """
    n = hidden.shape[0]
    if n < 2:
        raise ValueError(f"self-similarity needs at least 2 token representations, got {n}")
    unit = torch.nn.functional.normalize(hidden.double(), dim=-1)
    total = unit.sum(dim=0)
    return float((total.dot(total) - n) / (n * (n - 1)))


@dataclass
class LayerIsotropy:
    layer: int
    mean_cosine: float
    std: float
    description: str


@dataclass
class IsotropyReport:
    model: str
    num_layers: int
    texts: int
    tokens: int
    max_tokens: int
    text_source: str
    layers: list[LayerIsotropy] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A markdown table, one row per layer."""
        lines = [
            f"Isotropy of {self.model}: mean cosine similarity of token representations within a text "
            f"({self.texts} texts, {self.tokens} tokens, <= {self.max_tokens} tokens each; lower = more isotropic)",
            "",
            "| layer | hidden state | mean cosine | std |",
            "|---:|---|---:|---:|",
        ]
        for row in self.layers:
            lines.append(f"| {row.layer} | {row.description} | {row.mean_cosine:.3f} | {row.std:.3f} |")
        return "\n".join(lines)


def default_texts(rows: Iterable[dict], limit: int = DEFAULT_TEXTS) -> list[str]:
    """The human-written texts described in the module docstring, from HellaSwag ``rows``.

    The caller reads the rows (``cdlm isotropy``: the packaged validation split, ``eval_harness.data``).
    """
    if limit < 1:
        raise ValueError(f"the number of texts must be >= 1, got {limit}")
    texts: list[str] = []
    for row in rows:
        text = f"{row['ctx'].strip()} {row['endings'][int(row['label'])].strip()}"
        if len(text) >= MIN_CHARACTERS:
            texts.append(text)
            if len(texts) == limit:
                break
    return texts


def _layer_description(layer: int, num_layers: int) -> str:
    if layer == 0:
        return "embeddings"
    if layer == num_layers:
        return f"layer {layer} + final norm (contrastive search's)"
    return f"layer {layer} output"


def _token_ids(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[bool]]:
    """The text's ids (with the tokenizer's own special tokens) and which positions count (not special)."""
    encoded = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    ids = encoded["input_ids"]
    special = encoded["special_tokens_mask"]
    keep = [not flag for flag in special]
    # Truncate to max_tokens *text* tokens, keeping any leading special tokens in front of them.
    kept = 0
    for end, counted in enumerate(keep, 1):
        kept += counted
        if kept == max_tokens:
            return ids[:end], keep[:end]
    return ids, keep


def layer_self_similarity(
    model,
    tokenizer,
    texts: Iterable[str],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    model_name: str | None = None,
    text_source: str = "given texts",
) -> IsotropyReport:
    """Per-layer mean self-similarity of ``texts`` under ``model`` (see the module docstring)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (a text needs two tokens to compare), got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [_token_ids(tokenizer, text, max_tokens) for text in texts]
    encoded = [(ids, keep) for ids, keep in encoded if sum(keep) >= 2]
    if not encoded:
        raise ValueError("no text has 2 or more tokens: isotropy needs pairs of tokens within a text")
    num_layers = int(text_config(model).num_hidden_layers)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_layer: list[list[float]] = [[] for _ in range(num_layers + 1)]
    # Only hidden states are needed: skip the LM head over every position (Gemma's 262k-row head dominates).
    head_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            # Right padding: a causal model's real positions never see the pads, and positions stay 0..n-1.
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, _) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            outputs = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                output_hidden_states=True,
                use_cache=False,
                **head_kwargs,
            )
            hidden_states = outputs.hidden_states
            if hidden_states is None or len(hidden_states) != num_layers + 1:
                raise ValueError(
                    f"{type(model).__name__} returned {0 if hidden_states is None else len(hidden_states)} hidden "
                    f"states, expected {num_layers + 1} (embeddings + one per layer)"
                )
            for row, (ids, keep) in enumerate(chunk):
                positions = torch.tensor([i for i, counted in enumerate(keep) if counted], device=device)
                for layer, states in enumerate(hidden_states):
                    per_layer[layer].append(self_similarity(states[row, positions].float()))
    tokens = sum(sum(keep) for _, keep in encoded)
    report = IsotropyReport(
        model=model_name or getattr(model.config, "name_or_path", "") or type(model).__name__,
        num_layers=num_layers,
        texts=len(encoded),
        tokens=tokens,
        max_tokens=max_tokens,
        text_source=text_source,
    )
    for layer, values in enumerate(per_layer):
        scores = torch.tensor(values, dtype=torch.float64)
        std = float(scores.std()) if len(values) > 1 else 0.0
        report.layers.append(LayerIsotropy(layer, float(scores.mean()), std, _layer_description(layer, num_layers)))
    return report


def summary_line(report: IsotropyReport) -> str:
    """One line for the command's end: the final layer (what contrastive search uses) and the extremes."""
    final = report.layers[-1]
    most = max(report.layers, key=lambda row: row.mean_cosine)
    return (
        f"final layer (contrastive search's representation): mean cosine {final.mean_cosine:.3f}; "
        f"least isotropic layer: {most.layer} ({most.mean_cosine:.3f})"
    )


def reports_payload(reports: list[IsotropyReport]) -> dict:
    """The JSON written by ``cdlm isotropy --output``: the definition, then one report per model."""
    return {
        "measure": "per layer: mean over texts of the mean cosine similarity between distinct token "
        "representations within the text (Su & Collier 2022 self-similarity); see cdlm/eval_harness/isotropy.py",
        "reports": [report.to_dict() for report in reports],
    }


def reports_markdown(reports: list[IsotropyReport]) -> str:
    """The tables of several reports, each followed by its summary line."""
    return "\n\n".join(f"{report.table()}\n\n{summary_line(report)}" for report in reports)
