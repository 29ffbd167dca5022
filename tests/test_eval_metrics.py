"""Metric and prompt functions of the eval harness against hand-made cases (lm-eval 0.4.x semantics)."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from cdlm.eval_harness.data import MalformedRowError, load_rows, read_jsonl, take, validate_rows
from cdlm.eval_harness.metrics import (
    INVALID,
    exact_match,
    mean_and_stderr,
    multiple_choice_predictions,
    regex_extract,
)
from cdlm.eval_harness.tasks import gsm8k, gsm8k_cot, hellaswag

ROW = {"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5 apples\n#### 1,250"}


def test_strict_match_takes_the_first_hash_answer():
    assert regex_extract("so #### 1,250\n#### 7", gsm8k.GSM8K.strict_pattern) == "1,250"
    assert regex_extract("The answer is 42", gsm8k.GSM8K.strict_pattern) == INVALID


def test_flexible_extract_takes_the_last_number_and_first_nonempty_group():
    assert regex_extract("I had $3 and then 1,250.", gsm8k.FLEXIBLE, group_select=-1) == "1,250."
    assert regex_extract("x 7 y", gsm8k.FLEXIBLE, group_select=-1) == "7"  # second group (single digit)
    assert regex_extract("no digits", gsm8k.FLEXIBLE, group_select=-1) == INVALID


def test_gsm8k_scores_with_lm_eval_normalisation():
    # ',' and '$' and a final '.' are ignored; the reference loses everything up to '#### '.
    scored = gsm8k.score(gsm8k.GSM8K, "She has $1,250.\n#### 1,250", ROW)
    assert scored["exact_match,strict-match"] == 1.0
    assert scored["exact_match,flexible-extract"] == 1.0
    wrong = gsm8k.score(gsm8k.GSM8K, "#### 125", ROW)
    assert wrong["exact_match,strict-match"] == 0.0
    cot = gsm8k.score(gsm8k_cot.GSM8K_COT, "So 1000 + 250 = 1250. The answer is 1,250.", ROW)
    assert cot["strict_answer"] == "1,250" and cot["exact_match,strict-match"] == 1.0


def test_exact_match_ignore_case():
    assert exact_match("ABC", "abc", ignore_case=True) == 1.0
    assert exact_match("ABC", "abc") == 0.0


def test_acc_norm_divides_by_choice_length_and_breaks_ties_to_first():
    # acc picks choice 1 (-4 > -5); per character choice 0 wins (-5/10 > -4/2).
    assert multiple_choice_predictions([-5.0, -4.0], ["a" * 10, "bb"]) == (1, 0)
    assert multiple_choice_predictions([-1.0, -1.0], ["x", "y"]) == (0, 0)
    with pytest.raises(ValueError, match="one score per choice"):
        multiple_choice_predictions([-1.0], ["x", "y"])


def test_mean_and_stderr():
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and stderr == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))


def test_gsm8k_prompt_format_and_fewshot_sampling():
    train = [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(30)]
    rows = [{"question": "Q1?", "answer": "#### 1"}, {"question": "Q2?", "answer": "#### 2"}]
    prompts = gsm8k.build_prompts(gsm8k.GSM8K, rows, train)
    import random

    rng = random.Random(1234)  # lm-eval's sampler: one Random(1234), rnd.sample(train, 5) per doc in order
    first, second = rng.sample(train, 5), rng.sample(train, 5)
    expected = "\n\n".join(
        [f"Question: {d['question']}\nAnswer: {d['answer']}" for d in first] + ["Question: Q1?\nAnswer:"]
    )
    assert prompts[0] == expected
    assert prompts[1].startswith(f"Question: {second[0]['question']}\nAnswer: ")
    assert gsm8k.contrastive_prompts(gsm8k.GSM8K, rows)[0] == "Question: Q1?\nAnswer:"
    cot = gsm8k.build_prompts(gsm8k_cot.GSM8K_COT, rows)[0]
    assert (
        cot.startswith("Q: There are 15 trees") and cot.endswith("\n\nQ: Q1?\nA:") and cot.count("The answer is") == 8
    )


def test_hellaswag_preprocessing_matches_lm_eval():
    doc = hellaswag.process_doc(
        {
            "activity_label": "Roof shingle removal",
            "ctx_a": "A man is sitting on a roof.",
            "ctx_b": "he",
            "endings": ["is  using [title] wrap.", "b", "c", "d"],
            "label": "3",
        }
    )
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["choices"][0] == "is using. wrap."
    assert doc["gold"] == 3
    # empty ctx_b: the trailing space is stripped
    assert (
        hellaswag.process_doc({"activity_label": "X", "ctx_a": "a b.", "ctx_b": "", "endings": ["e"] * 4, "label": 0})[
            "query"
        ]
        == "X: a b."
    )


def test_packaged_data_is_complete_and_matches_lm_eval_rendering():
    assert len(load_rows(None, "gsm8k/test")[0]) == 1319
    assert len(load_rows(None, "gsm8k/train")[0]) == 7473
    raw, _ = load_rows(None, "hellaswag/validation")
    assert len(raw) == 10042
    docs = hellaswag.process_rows(raw, "packaged")
    processed, _ = load_rows("hellaswag/validation_olmo1000", "hellaswag/validation")
    # rows 0-1 are verbatim originals; where the OLMo file has such a row, rendering must be identical.
    first = [p for p in processed if p["row"] in (0, 1)]
    for p in first:
        assert docs[p["row"]]["query"] == p["query"] and docs[p["row"]]["choices"] == p["choices"]
    assert all(docs[p["row"]]["gold"] == p["gold"] for p in processed)


def test_malformed_rows_and_bad_limits_are_named(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    rows = read_jsonl(path)
    with pytest.raises(MalformedRowError, match=r"bad\.jsonl\.gz: row 2 has no field 'answer'"):
        validate_rows(rows, gsm8k.FIELDS, str(path))
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(MalformedRowError, match=r"broken\.jsonl:2 is not valid JSON"):
        read_jsonl(tmp_path / "broken.jsonl")
    with pytest.raises(MalformedRowError, match="label 7"):
        hellaswag.process_rows([{"query": "q", "choices": ["a", "b"], "gold": 7}], "x")
    with pytest.raises(ValueError, match="limit must be a positive"):
        take([1, 2], 0)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_hellaswag_fewshot_contexts_exclude_the_document_itself():
    docs = [{"query": f"L{i}: ctx {i}", "choices": ["a", "b"], "gold": i % 2} for i in range(6)]
    contexts = hellaswag.contexts(docs, num_fewshot=2)
    for doc, context in zip(docs, contexts):
        blocks = context.split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == doc["query"]
        assert all(not b.startswith(doc["query"]) for b in blocks[:-1])
    assert hellaswag.contexts(docs) == [d["query"] for d in docs]
    assert hellaswag.contrastive_contexts(docs)[0] == "L0:"
