"""Amateur models for contrastive decoding and contrastive scoring.

Two kinds, both exposing a ``model`` that works standalone in ``generate()``:

* ``SeparateAmateur``: an independent (usually smaller) model. Contrast is taken token id against token
  id, so its tokenizer must map text to the same ids as the expert's; ``check_same_vocabulary``
  enforces that on the shared id range (an lm_head padded past the tokenizer is fine).
* ``EarlyExitAmateur``: the expert's first N decoder layers followed by the expert's own final norm
  and lm_head (O'Brien & Lewis 2023 use such "early exit" amateurs). It shares every weight with the
  expert, so it costs no memory, and because layer N's output is an intermediate result of the
  expert's own forward pass, its logits can be read off that pass (``capture`` +
  ``logits_from_hidden``) instead of running a second model.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cdlm.models.lm_head import head_logits

EARLY_EXIT_PREFIX = "early-exit:"

_PROBE_TEXT = (
    "Contrastive decoding compares 2 models: the expert's and the amateur's next-token scores. "
    "Ünïcödé, numbers 12345, code `x = y[0]`\n\tand   spaces."
)


class TokenizerMismatchError(ValueError):
    """Expert and amateur do not map text to the same token ids, so their scores cannot be contrasted."""


class CannotSplitModelError(ValueError):
    """The expert's architecture has no decoder-layer stack cdlm knows how to cut for an early exit."""


def _id_to_token(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    return {index: token for token, index in tokenizer.get_vocab().items()}


def check_same_vocabulary(
    expert_tokenizer: PreTrainedTokenizerBase,
    amateur_tokenizer: PreTrainedTokenizerBase,
    *,
    expert_name: str = "expert",
    amateur_name: str = "amateur",
) -> int:
    """Return the number of shared token ids, or raise ``TokenizerMismatchError`` naming both models.

    The ids both tokenizers define must carry the same tokens, and a probe text must encode to the
    same ids (this also catches different pre-tokenisation or normalisation with equal vocabularies).
    """
    expert_vocab = _id_to_token(expert_tokenizer)
    amateur_vocab = _id_to_token(amateur_tokenizer)
    shared = min(len(expert_vocab), len(amateur_vocab))
    differing = [i for i in range(shared) if expert_vocab.get(i) != amateur_vocab.get(i)]
    if differing:
        examples = ", ".join(f"id {i}: {expert_vocab.get(i)!r} vs {amateur_vocab.get(i)!r}" for i in differing[:3])
        raise TokenizerMismatchError(
            f"tokenizers of {expert_name} and {amateur_name} differ on {len(differing)} of their "
            f"{shared} shared ids ({examples}); contrastive methods need the same vocabulary"
        )
    expert_ids = expert_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    amateur_ids = amateur_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if expert_ids != amateur_ids:
        raise TokenizerMismatchError(
            f"tokenizers of {expert_name} and {amateur_name} share a vocabulary but encode text "
            f"differently (probe text: {len(expert_ids)} vs {len(amateur_ids)} tokens)"
        )
    return shared


def output_vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def parse_early_exit(spec: str) -> int | None:
    """N for an ``"early-exit:N"`` amateur spec, ``None`` for any other spec (a model reference).

    >>> parse_early_exit("early-exit:8"), parse_early_exit("smollm2-135m-instruct")
    (8, None)
    """
    if not isinstance(spec, str) or not spec.startswith(EARLY_EXIT_PREFIX):
        return None
    layers = spec[len(EARLY_EXIT_PREFIX) :]
    if not (layers.isascii() and layers.isdigit()):
        raise ValueError(f"early-exit amateur spec must be 'early-exit:N' with an integer N, got {spec!r}")
    return int(layers)


def early_exit_spec(num_layers: int) -> str:
    """The amateur spec for the expert's first ``num_layers`` layers (inverse of ``parse_early_exit``)."""
    return f"{EARLY_EXIT_PREFIX}{int(num_layers)}"


# Not pad: loaders set it ad hoc (often to EOS), so two models of one vocabulary may disagree on it.
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id")


def _special_token_ids(model: PreTrainedModel) -> dict[str, frozenset[int]]:
    """Special-token ids the model's generation config (or config) declares, as comparable values."""
    ids = {}
    for name in _SPECIAL_TOKENS:
        value = getattr(getattr(model, "generation_config", None), name, None)
        if value is None:
            value = getattr(model.config, name, None)
        if value is not None:
            ids[name] = frozenset(value) if isinstance(value, (list, tuple)) else frozenset([value])
    return ids


def _own_tokenizer(model: PreTrainedModel) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved next to the model's weights, when it was loaded from a local folder that has one."""
    from pathlib import Path

    folder = Path(str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        return None
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def check_bare_amateur(
    expert: PreTrainedModel | None, amateur: PreTrainedModel, expert_vocab_size: int | None = None
) -> None:
    """Refuse a bare amateur model (no tokenizer given) that cannot share the expert's token ids.

    Checks what needs no tokenizer: the lm_head sizes (``expert_vocab_size``, e.g. the width of the
    scores ``generate()`` hands a processor, when no expert model is given), the special-token ids both
    models declare, and, when both were loaded from local folders holding tokenizer files, the
    tokenizers themselves. Raises ``TokenizerMismatchError``; ``make_separate_amateur`` is the checked
    way to pair models whose heads are padded to different sizes.
    """
    amateur_name = getattr(amateur.config, "_name_or_path", "") or type(amateur).__name__
    amateur_vocab = output_vocab_size(amateur)
    if expert is not None:
        expert_vocab_size = output_vocab_size(expert)
    if expert_vocab_size is not None and expert_vocab_size != amateur_vocab:
        raise TokenizerMismatchError(
            f"the amateur {amateur_name} scores {amateur_vocab} token ids but the expert scores {expert_vocab_size}: "
            "a bare amateur must use the expert's vocabulary; if both tokenizers agree and only the heads are "
            "padded differently, pair them with make_separate_amateur(expert, expert_tokenizer, amateur, "
            "amateur_tokenizer), or pass the shared id range as vocab_size"
        )
    if expert is None:
        return
    expert_special, amateur_special = _special_token_ids(expert), _special_token_ids(amateur)
    differing = [
        f"{name}: {sorted(expert_special[name])} vs {sorted(amateur_special[name])}"
        for name in _SPECIAL_TOKENS
        if name in expert_special and name in amateur_special and expert_special[name] != amateur_special[name]
    ]
    if differing:
        raise TokenizerMismatchError(
            f"the amateur {amateur_name} and the expert declare different special tokens ({'; '.join(differing)}): "
            "contrast needs one vocabulary; if they do share one, pair them with make_separate_amateur(expert, "
            "expert_tokenizer, amateur, amateur_tokenizer), which compares the tokenizers themselves"
        )
    expert_tokenizer, amateur_tokenizer = _own_tokenizer(expert), _own_tokenizer(amateur)
    if expert_tokenizer is not None and amateur_tokenizer is not None:
        check_same_vocabulary(expert_tokenizer, amateur_tokenizer, amateur_name=amateur_name)


@dataclass
class SeparateAmateur:
    """An independent amateur model; ``vocab_size`` is the id range shared with the expert."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    vocab_size: int
    kind: str = "separate"


def make_separate_amateur(
    expert: PreTrainedModel,
    expert_tokenizer: PreTrainedTokenizerBase,
    amateur: PreTrainedModel,
    amateur_tokenizer: PreTrainedTokenizerBase,
    *,
    expert_name: str = "expert",
    amateur_name: str = "amateur",
) -> SeparateAmateur:
    check_same_vocabulary(expert_tokenizer, amateur_tokenizer, expert_name=expert_name, amateur_name=amateur_name)
    # An lm_head may be padded past its tokenizer; contrast over the id range both heads score.
    vocab_size = min(output_vocab_size(expert), output_vocab_size(amateur))
    return SeparateAmateur(amateur.eval(), amateur_tokenizer, amateur_name, vocab_size)


def _decoder_stack(model: PreTrainedModel) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """(decoder, its layer list, its final norm) for Llama-style and Gemma3-style causal LMs."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if decoder is None or not isinstance(layers, nn.ModuleList) or norm is None:
        raise CannotSplitModelError(
            f"cannot build an early-exit amateur from {type(model).__name__}: cdlm needs a decoder "
            "with a `layers` ModuleList and a final `norm` (Llama, Mistral, Qwen2, Gemma3, ...)"
        )
    return decoder, layers, norm


class EarlyExitAmateur:
    """The expert's first ``num_layers`` layers + its final norm and lm_head, sharing all weights."""

    kind = "early-exit"

    def __init__(self, expert: PreTrainedModel, num_layers: int):
        decoder, layers, norm = _decoder_stack(expert)
        total = len(layers)
        if not 1 <= num_layers < total:
            raise CannotSplitModelError(
                f"early exit after {num_layers} layers is impossible: {type(expert).__name__} has "
                f"{total} decoder layers, choose 1..{total - 1}"
            )
        self.expert = expert
        self.exit_layer = num_layers
        self.name = f"{getattr(expert.config, 'name_or_path', '') or type(expert).__name__}[:{num_layers}]"
        self.vocab_size = output_vocab_size(expert)
        self._layer = layers[num_layers - 1]
        self._norm = norm
        self.model = self._build_shell(expert, decoder, layers, num_layers)

    @staticmethod
    def _build_shell(
        expert: PreTrainedModel, decoder: nn.Module, layers: nn.ModuleList, num_layers: int
    ) -> PreTrainedModel:
        """A model of the expert's class with a truncated config whose modules *are* the expert's."""
        config = copy.deepcopy(expert.config)
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
        with torch.device("meta"):
            shell = type(expert)(config)
        shell_decoder = shell.get_decoder()
        for name, child in decoder.named_children():
            replacement = nn.ModuleList(list(layers)[:num_layers]) if name == "layers" else child
            setattr(shell_decoder, name, replacement)
        for name, child in expert.named_children():
            if child is not decoder:
                setattr(shell, name, child)
        leftovers = [n for n, t in [*shell.named_parameters(), *shell.named_buffers()] if t.is_meta]
        if leftovers:
            raise CannotSplitModelError(
                f"cannot share {type(expert).__name__}'s weights with an early-exit amateur; "
                f"unshared tensors: {leftovers[:5]}"
            )
        shell.generation_config = copy.deepcopy(expert.generation_config)
        return shell.eval()

    def logits_from_hidden(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Amateur logits from the output of expert layer ``exit_layer`` (before the final norm).

        With ``token_ids`` (1-D), only those vocabulary rows of the lm_head are used and the last
        dimension follows ``token_ids``: contrastive decoding needs the amateur only on the
        expert's plausible tokens, and skipping the rest skips most of the head's cost.
        """
        return head_logits(self.expert, self._norm(hidden), token_ids)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Record layer ``exit_layer``'s output on every expert forward pass inside the block.

        Yields a list that receives one (batch, seq, hidden) tensor per forward; callers pop them.
        A forward hook keeps ``generate()`` untouched and costs no extra compute.
        """
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self._layer.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()


# Either kind of amateur (type hints of callers that accept both).
Amateur = SeparateAmateur | EarlyExitAmateur
