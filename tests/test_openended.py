"""The open-ended generation task: packaged data, request building, corpus metrics, and a resumable run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cdlm.eval_harness import openended
from cdlm.eval_harness.evaluate import EvalConfig, evaluate
from cdlm.eval_harness.task import GenerationRequest, GenerationResponse, get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**extra):
    return EvalConfig(task="openended", extra=extra, max_new_tokens=256)


def test_packaged_data_has_two_domains_with_dev_and_test_splits():
    task = get_task("openended")
    counts = {}
    for split in ("dev", "test"):
        for domain in openended.DOMAINS:
            data = task.load(_config(split=split, domain=domain, judge="none"))
            assert {d["domain"] for d in data.docs} == {domain}
            assert {d["split"] for d in data.docs} == {split}
            counts[split, domain] = len(data.docs)
            assert all(d["prompt"] and d["human"] and d["prompt"][-1] != " " for d in data.docs)
    assert counts == {("dev", "wikihow"): 50, ("dev", "books"): 50, ("test", "wikihow"): 200, ("test", "books"): 200}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"split": "train"}, "split must be one of dev, test, got 'train'"),
        ({"domain": "news"}, "domain must be one of wikihow, books or all, got 'news'"),
        ({"judge_dtype": "float16"}, "judge_dtype must be one of float32, bfloat16, got 'float16'"),
        ({"mauve_seed": "x"}, "mauve_seed must be an integer, got 'x'"),
        ({"judges": "a"}, r"no setting\(s\) \['judges'\]"),
    ],
)
def test_bad_settings_are_refused_in_one_line(extra, message):
    with pytest.raises(ValueError, match=message):
        openended.OpenEndedSettings.from_extra(extra)


def test_limit_keeps_both_domains_and_requests_cap_tokens_per_domain():
    task = get_task("openended")
    config = EvalConfig(task="openended", limit=4, max_new_tokens=100, extra={"split": "dev", "judge": "none"})
    data = task.load(config)
    assert [d["domain"] for d in data.docs] == ["wikihow", "books", "wikihow", "books"]
    requests = task.build_requests(data, config)
    assert [r.max_new_tokens for r in requests] == [64, 100, 64, 100]
    assert requests[0].prompt == data.docs[0]["prompt"] and requests[0].until == ()


def test_bad_settings_are_refused_with_the_name():
    task = get_task("openended")
    with pytest.raises(ValueError, match="domain"):
        task.load(_config(domain="news"))
    with pytest.raises(ValueError, match="split"):
        task.load(_config(split="train"))
    with pytest.raises(ValueError, match="no setting"):
        task.load(_config(prompt_tokens=16))


def _record(domain, continuation, human, num_tokens, budget=8):
    task = openended.OpenEndedTask()
    doc = {"id": "x", "domain": domain, "prompt": "P", "human": human}
    request = GenerationRequest("P", max_new_tokens=budget)
    return task.process_result(doc, request, GenerationResponse(continuation, num_tokens))


def test_corpus_metrics_pool_ngrams_per_domain_and_average_domains():
    records = [
        _record("wikihow", " a b a b a b", " one two three four", 8),
        _record("wikihow", " x y z", " five six seven", 3),
        _record("books", "", " c d e f g", 0),
        _record("books", " c d c d", " h i j", 4),
    ]
    assert records[1]["stopped_early"] == 1.0 and records[0]["stopped_early"] == 0.0
    assert records[0]["distinct-2"] == 2
    metrics = openended.corpus_metrics(records, judge="none")
    # wikihow: rep-2 = 1 - (2 + 1) / (4 + 1) (SimCTG counting, pooled over the domain's texts)
    assert metrics["wikihow/rep-2"] == pytest.approx(0.4)
    # books: the empty text has no n-grams; " c d c d" has cd dc (2 distinct of 2) -> rep-2 = 0
    assert metrics["books/rep-2"] == pytest.approx(0.0)
    assert metrics["rep-2"] == pytest.approx(0.2)  # mean over the two domains
    assert metrics["books/empty"] == 0.5 and metrics["books/stopped_early"] == 1.0
    assert metrics["wikihow/num_tokens"] == 5.5 and metrics["books/num_words"] == 2.0
    assert metrics["human/wikihow/rep-2".replace("human/wikihow", "wikihow/human")] == pytest.approx(0.0)
    assert metrics["wikihow/n"] == 2 and metrics["judge"] == "none"
    assert "mauve" not in metrics


def test_judged_metrics_use_the_judge_model(monkeypatch, tiny_llama, tiny_tokenizer):
    pytest.importorskip("mauve")

    class Loaded:
        model, tokenizer = tiny_llama, tiny_tokenizer

    monkeypatch.setitem(openended.Judge._loaded, ("tiny-judge", "float32"), Loaded())
    texts = ["The quick brown fox jumps", "over the lazy dog", "Contrastive decoding compares", "two models and"]
    records = [_record("books", " " + texts[i], " " + texts[(i + 1) % 4], 5) for i in range(4)]
    metrics = openended.corpus_metrics(records, judge="tiny-judge")
    assert 0.0 <= metrics["mauve"] <= 1.0
    assert -1.0 <= metrics["coherence"] <= 1.0 and -1.0 <= metrics["human/coherence"] <= 1.0
    # human perplexity: exp(total NLL / total tokens) of the human continuations under the judge
    nll = tokens = 0
    for record in records:
        context = tiny_tokenizer(record["prompt"])["input_ids"]
        target = tiny_tokenizer(record["human"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny_llama(torch.tensor([context + target])).logits[0].float(), -1)
        nll -= sum(float(log_probs[len(context) - 1 + j, t]) for j, t in enumerate(target))
        tokens += len(target)
    assert metrics["human/perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


class _Loaded:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.reference, self.source, self.details = "tiny-llama", "testing", {}


def test_evaluate_runs_the_task_and_resumes_without_regenerating(tmp_path, tiny_llama, tiny_tokenizer):
    from cdlm.decoding.methods import get_method

    loaded = _Loaded(tiny_llama, tiny_tokenizer)
    method = get_method("greedy")(tiny_llama, tiny_tokenizer)
    config = EvalConfig(
        task="openended", limit=4, max_new_tokens=6, batch_size=2, extra={"split": "dev", "judge": "none"}
    )
    first = evaluate(loaded, method, config, tmp_path / "run", progress=lambda _: None)
    assert first["n_samples"] == 4 and first["timing"]["examples_this_run"] == 4
    diversity = first["results"]["diversity"]
    assert math.isnan(diversity) or 0.0 <= diversity <= 1.0  # NaN: a tiny model's words may form no 4-gram
    assert 0 < first["results"]["num_tokens"] <= 6
    assert first["results"]["wikihow/n"] == 2 and first["results"]["books/n"] == 2
    again = evaluate(loaded, method, config, tmp_path / "run", progress=lambda _: None)
    assert again["timing"]["examples_this_run"] == 0
    assert json.dumps(again["results"], sort_keys=True) == json.dumps(first["results"], sort_keys=True)  # NaN-safe


def test_human_text_is_cut_at_the_runs_token_budget():
    doc = {"human": " one two three", "human_token_ends": [4, 8, 14]}
    assert openended.human_prefix(doc, 1) == " one"
    assert openended.human_prefix(doc, 2) == " one two"
    assert openended.human_prefix(doc, 3) == openended.human_prefix(doc, 64) == " one two three"
    assert openended.human_prefix({"human": " whole"}, 1) == " whole"
    record = _record("books", " c", " one two three", 1, budget=2)
    assert record["human"] == " one two three"  # _record's doc has no offsets: kept whole
    task = openended.OpenEndedTask()
    doc = {"id": "y", "domain": "books", "prompt": "P", **doc}
    out = task.process_result(doc, GenerationRequest("P", max_new_tokens=2), GenerationResponse(" a b", 2))
    assert out["human"] == " one two"
