"""Tiny, deterministic, randomly initialised models and a tokenizer built in code, for fast tests.

Nothing here touches the network or the disk. The same seed always gives the same weights and the
same tokenizer, so tests can compare token ids exactly. Weights are initialised with a large std so
next-token distributions are peaked (as in real models) rather than nearly uniform, which would make
greedy ties and plausibility masks meaningless.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from cdlm.models.loading import prepare_tokenizer_for_generation

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
    "Answer: She sold 48 / 2 = 24 clips in May. #### 72",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Contrastive decoding compares an expert model with an amateur model.",
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, then bake it.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = ( ) ,",
]


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) trained in code on a fixed corpus."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return prepare_tokenizer_for_generation(tokenizer)


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.eval()


def tiny_llama(
    seed: int = 0,
    *,
    vocab_size: int = 384,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    init_std: float = 0.25,
) -> LlamaForCausalLM:
    """A 4-layer Llama-family model (grouped-query attention, tied embeddings, like SmolLM2)."""
    config = LlamaConfig(  # type: ignore[call-arg]  # attn_implementation goes through **kwargs
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=init_std,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config))


def tiny_gemma3(
    seed: int = 0,
    *,
    vocab_size: int = 384,
    hidden_size: int = 64,
    num_layers: int = 4,
    init_std: float = 0.25,
    sliding_window: int = 8,
) -> Gemma3ForCausalLM:
    """A 4-layer Gemma3 text model mixing sliding-window and full attention layers."""
    config = Gemma3TextConfig(  # type: ignore[call-arg]  # attn_implementation goes through **kwargs
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
        # Untied: Gemma scales input embeddings by sqrt(hidden), so a tied random head just echoes
        # the input token; an untied head gives varied, peaked predictions.
        tie_word_embeddings=False,
        initializer_range=init_std,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _finish(Gemma3ForCausalLM(config))
