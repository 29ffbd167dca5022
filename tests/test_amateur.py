"""Amateurs: the separate-model vocabulary check and the weight-sharing early-exit amateur."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from cdlm import testing
from cdlm.models import (
    CannotSplitModelError,
    EarlyExitAmateur,
    TokenizerMismatchError,
    check_same_vocabulary,
    make_separate_amateur,
)

PROMPTS = ["The quick brown fox", "Question: how many clips did she sell in May?"]


def _swapped_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with two vocabulary ids exchanged: same tokens, different ids."""
    spec = json.loads(testing.tiny_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    vocab[by_id[100]], vocab[by_id[101]] = 101, 100
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>", eos_token="</s>"
    )


def test_same_tokenizer_passes_and_padded_head_uses_common_range(tiny_tokenizer):
    expert = testing.tiny_llama(seed=0)
    padded = testing.tiny_llama(seed=1, vocab_size=400)  # lm_head padded past the tokenizer
    assert check_same_vocabulary(tiny_tokenizer, testing.tiny_tokenizer()) == len(tiny_tokenizer)
    amateur = make_separate_amateur(expert, tiny_tokenizer, padded, testing.tiny_tokenizer())
    assert amateur.vocab_size == 384 and amateur.kind == "separate"


def test_mismatched_tokenizers_raise_naming_both_models(tiny_tokenizer):
    with pytest.raises(TokenizerMismatchError, match="big-expert.*small-amateur.*id 100"):
        check_same_vocabulary(
            tiny_tokenizer, _swapped_tokenizer(), expert_name="big-expert", amateur_name="small-amateur"
        )


def test_same_vocab_but_different_encoding_is_caught(tiny_tokenizer):
    spec = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:5]  # same id->token table, far fewer merges
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(TokenizerMismatchError, match="encode text differently"):
        check_same_vocabulary(tiny_tokenizer, other)


@pytest.mark.parametrize("factory", [testing.tiny_llama, testing.tiny_gemma3])
def test_early_exit_logits_from_shared_hidden_states_equal_standalone_forward(factory, tiny_tokenizer):
    expert = factory(seed=2)
    amateur = EarlyExitAmateur(expert, 2)
    batch = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), amateur.capture() as captured:
        expert_logits = expert(**batch).logits
        standalone = amateur.model(**batch).logits
    # Two forwards ran inside the block: the expert's (layer 2 hooked) and the shell's, which
    # shares that very layer module, so the hook fired for both.
    assert len(captured) == 2
    from_expert_pass = amateur.logits_from_hidden(captured[0])
    mask = batch["attention_mask"].bool()
    assert torch.allclose(from_expert_pass[mask], standalone[mask], atol=1e-5)
    assert not torch.allclose(expert_logits[mask], standalone[mask], atol=1e-2)  # it really is a different model


@pytest.mark.parametrize("factory", [testing.tiny_llama, testing.tiny_gemma3])
def test_early_exit_shares_weights_and_generates_standalone(factory, tiny_tokenizer):
    expert = factory(seed=2)
    amateur = EarlyExitAmateur(expert, 3)
    expert_ptrs = {p.data_ptr() for p in expert.parameters()}
    assert {p.data_ptr() for p in amateur.model.parameters()} <= expert_ptrs
    assert amateur.model.config.num_hidden_layers == 3 and expert.config.num_hidden_layers == 4
    batch = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = amateur.model.generate(**batch, max_new_tokens=6, do_sample=False)
    # Greedy by hand, full recomputation each step, on each prompt alone.
    for row, prompt in enumerate(PROMPTS):
        ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
        for _ in range(6):
            with torch.no_grad():
                next_id = amateur.model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        assert out[row, -6:].tolist() == ids[0, -6:].tolist()


def test_early_exit_layer_count_is_validated():
    expert = testing.tiny_llama()
    for bad in (0, 4, 9):
        with pytest.raises(CannotSplitModelError, match="choose 1..3"):
            EarlyExitAmateur(expert, bad)


def test_unsplittable_architecture_gets_a_clear_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(CannotSplitModelError, match="GPT2LMHeadModel"):
        EarlyExitAmateur(model, 1)


@pytest.mark.real_model
def test_real_smollm2_early_exit_matches_standalone(smollm2):
    model, tokenizer = smollm2
    amateur = EarlyExitAmateur(model, 8)
    batch = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    with torch.no_grad(), amateur.capture() as captured:
        model(**batch)
    with torch.no_grad():
        standalone = amateur.model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(amateur.logits_from_hidden(captured[0])[mask], standalone[mask], atol=1e-4)


@pytest.mark.real_model
def test_real_gemma3_early_exit_matches_standalone(gemma3):
    model, tokenizer = gemma3
    amateur = EarlyExitAmateur(model, 6)
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad(), amateur.capture() as captured:
        model(**batch)
    with torch.no_grad():
        standalone = amateur.model(**batch).logits
    assert torch.allclose(amateur.logits_from_hidden(captured[0]), standalone, atol=1e-3)
