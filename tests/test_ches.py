"""CHES scores (Razin et al., ICLR 2025) against a direct computation from the paper's definition."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from cdlm import testing
from cdlm.alignment.preference.ches import CHESSettings, score_pairs, tokenize_pairs, top_fraction

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [
    {"prompt": "Human: How do I bake bread? Assistant:", "chosen": " Mix flour and water.", "rejected": " No."},
    {"prompt": "Question: how many clips?", "chosen": " 72", "rejected": " She sold 48 clips in May."},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " jumps over the dog."},
]


def last_hidden_after(model, ids: list[int]) -> torch.Tensor:
    """h_{x, z}: the last-layer hidden state (the input of the unembedding) after the whole of ``ids``, alone."""
    captured = {}
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: captured.update(h=args[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    return captured["h"][0, -1].double()


def paper_ches(model, prompt_ids, chosen_ids, rejected_ids) -> tuple[float, float]:
    """CHES and length-normalised CHES straight from the definition: one forward per prefix x, y_{<k}."""
    s_plus = sum(last_hidden_after(model, prompt_ids + chosen_ids[:k]) for k in range(len(chosen_ids)))
    s_minus = sum(last_hidden_after(model, prompt_ids + rejected_ids[:k]) for k in range(len(rejected_ids)))
    n_plus, n_minus = len(chosen_ids), len(rejected_ids)
    ches = s_plus @ s_minus - s_plus @ s_plus
    normalized = s_plus @ s_minus / (n_plus * n_minus) - s_plus @ s_plus / n_plus**2
    return float(ches), float(normalized)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_ches_matches_paper_definition(request, model_name, tiny_tokenizer):
    model = request.getfixturevalue(model_name).float()
    dataset = Dataset.from_list(PAIRS)
    records = score_pairs(model, tiny_tokenizer, dataset, batch_size=2)
    tokenized = tokenize_pairs(dataset, tiny_tokenizer)
    assert [r["index"] for r in records] == [0, 1, 2]
    for record, row in zip(records, tokenized):
        # TRL's tokenisation: text replies end with EOS, which is a reply token like any other
        assert row["chosen_ids"][-1] == tiny_tokenizer.eos_token_id
        expected, expected_normalized = paper_ches(model, row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        assert record["chosen_tokens"] == len(row["chosen_ids"]) and record["rejected_tokens"] == len(
            row["rejected_ids"]
        )
        assert record["ches"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert record["ches_normalized"] == pytest.approx(expected_normalized, rel=1e-4, abs=1e-4)
    assert len({round(r["ches"], 3) for r in records}) == 3  # distinct pairs, distinct scores


def test_identical_replies_score_zero(tiny_llama, tiny_tokenizer):
    """<S, S> - ||S||^2 = 0: the score is centred on the chosen reply's own embedding."""
    pair = {"prompt": "Question:", "chosen": " 48 clips", "rejected": " 48 clips"}
    (record,) = score_pairs(tiny_llama, tiny_tokenizer, Dataset.from_list([pair]))
    assert record["ches"] == pytest.approx(0.0, abs=1e-6) and record["ches_normalized"] == pytest.approx(0.0, abs=1e-9)


def test_batching_and_formats_give_the_same_scores(tiny_llama, tiny_tokenizer):
    """Batch size does not change scores, and the implicit-prompt format scores like its explicit form.

    (The first two pairs' replies differ from their first word, so TRL's prompt extraction recovers the prompt.)
    """
    explicit = Dataset.from_list(PAIRS[:2])
    implicit = Dataset.from_list(
        [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PAIRS[:2]]
    )
    one = score_pairs(tiny_llama, tiny_tokenizer, explicit, batch_size=1)
    three = score_pairs(tiny_llama, tiny_tokenizer, explicit, batch_size=3)
    from_implicit = score_pairs(tiny_llama, tiny_tokenizer, implicit, batch_size=3)
    for a, b, c in zip(one, three, from_implicit):
        assert a["ches"] == pytest.approx(b["ches"], rel=1e-5, abs=1e-4)
        assert a["ches"] == pytest.approx(c["ches"], rel=1e-5, abs=1e-4)


def test_conversational_pairs(tiny_llama, tiny_tokenizer):
    chosen = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix flour."}]
    rejected = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "No."}]
    explicit = Dataset.from_list([{"prompt": chosen[:1], "chosen": chosen[1:], "rejected": rejected[1:]}])
    implicit = Dataset.from_list([{"chosen": chosen, "rejected": rejected}])
    (a,), (b,) = score_pairs(tiny_llama, tiny_tokenizer, explicit), score_pairs(tiny_llama, tiny_tokenizer, implicit)
    row = tokenize_pairs(explicit, tiny_tokenizer)[0]
    expected, _ = paper_ches(tiny_llama, row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
    assert a["ches"] == pytest.approx(expected, rel=1e-4, abs=1e-3) and b["ches"] == pytest.approx(a["ches"], rel=1e-6)


def test_max_length_truncates_like_the_trainers(tiny_llama, tiny_tokenizer):
    dataset = Dataset.from_list(PAIRS[:1])
    row = tokenize_pairs(dataset, tiny_tokenizer)[0]
    max_length = len(row["prompt_ids"]) + 2
    (record,) = score_pairs(tiny_llama, tiny_tokenizer, dataset, settings=CHESSettings(max_length=max_length))
    expected, _ = paper_ches(tiny_llama, row["prompt_ids"], row["chosen_ids"][:2], row["rejected_ids"][:2])
    assert record["chosen_tokens"] == 2 and record["ches"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    (skipped,) = score_pairs(
        tiny_llama, tiny_tokenizer, dataset, settings=CHESSettings(max_length=len(row["prompt_ids"]))
    )
    assert math.isnan(skipped["ches"]) and "max_length" in skipped["skipped"]


def test_resume_continues_and_refuses_changes(tmp_path, tiny_llama, tiny_tokenizer):
    dataset = Dataset.from_list(PAIRS)
    full = score_pairs(tiny_llama, tiny_tokenizer, dataset, output_dir=tmp_path / "a", batch_size=1)
    samples = (tmp_path / "a" / "samples.jsonl").read_text().splitlines(keepends=True)
    assert len(samples) == 3
    # a run killed after one record, mid-way through writing the second
    (tmp_path / "a" / "samples.jsonl").write_text(samples[0] + samples[1][:10])
    calls = []
    resumed = score_pairs(
        tiny_llama,
        tiny_tokenizer,
        dataset,
        output_dir=tmp_path / "a",
        batch_size=1,
        progress=lambda d, t: calls.append(d),
    )
    assert calls == [2, 3]  # only the two missing pairs were computed
    assert [r["ches"] for r in resumed] == pytest.approx([r["ches"] for r in full], rel=1e-9)
    assert len((tmp_path / "a" / "samples.jsonl").read_text().splitlines()) == 3
    changed = Dataset.from_list([{**PAIRS[0], "chosen": " Mix rye and water."}, *PAIRS[1:]])
    with pytest.raises(ValueError, match="data"):
        score_pairs(tiny_llama, tiny_tokenizer, changed, output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="settings"):
        score_pairs(
            tiny_llama, tiny_tokenizer, dataset, output_dir=tmp_path / "a", settings=CHESSettings(max_length=64)
        )
    other_model = testing.tiny_llama(seed=1)
    with pytest.raises(ValueError, match="model_weights"):
        score_pairs(other_model, tiny_tokenizer, dataset, output_dir=tmp_path / "a")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["pairs"] == 3


def test_top_fraction():
    records = [{"index": i, "ches": s, "ches_normalized": -s} for i, s in enumerate([3.0, 9.0, math.nan, 1.0, 7.0])]
    assert top_fraction(records, 0.4) == [1, 4]
    assert top_fraction(records, 0.4, score="ches_normalized") == [0, 3]
    assert top_fraction(records, 0.0) == []
    with pytest.raises(ValueError):
        top_fraction(records, 1.5)


def test_cli_scores_writes_histogram_and_drops_top(tmp_path, tiny_llama, tiny_tokenizer, capsys):
    from cdlm.cli import main

    folder = tmp_path / "model"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    data = tmp_path / "pairs.jsonl"
    # implicit-prompt rows, as TRL accepts them
    data.write_text(
        "".join(
            json.dumps({"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}) + "\n"
            for p in PAIRS
        )
    )
    out = tmp_path / "out"
    argv = [
        "data",
        "ches",
        "--model",
        str(folder),
        "--dataset",
        str(data),
        "--split",
        "all",
        "--output-dir",
        str(out),
        "--drop-top",
        "0.34",
        "--threads",
        "1",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    top = max(records, key=lambda r: r["ches"])["index"]
    kept = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in data.read_text().splitlines()]
    assert kept == [row for i, row in enumerate(original) if i != top]  # rows written back in their own format
    summary = json.loads((out / "ches_summary.json").read_text())
    assert summary["filtered"]["dropped_indices"] == [top] and sum(summary["ches"]["histogram"]["counts"]) == 3
    assert main(argv) == 0  # rerun: everything already scored, nothing appended
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert main([*argv[:-6], "--drop-top", "1.5"]) == 2
    assert "--drop-top must be a fraction in [0, 1)" in capsys.readouterr().err
