"""Isotropy (mean within-text cosine similarity per layer): exact values on hand-built vectors, agreement with a
brute-force pairwise computation on a tiny model, and the ``cdlm isotropy`` command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from cdlm import testing
from cdlm.eval_harness import isotropy
from cdlm.eval_harness.isotropy import default_texts, layer_self_similarity, self_similarity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is sitting on a roof. He starts pulling up roofing.",
    "0 1 2 3",
]


def brute_force(hidden: torch.Tensor) -> float:
    n = hidden.shape[0]
    total = sum(F.cosine_similarity(hidden[i], hidden[j], dim=0).item() for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


def test_self_similarity_hand_checkable():
    v = torch.tensor([3.0, -1.0, 2.0])
    assert self_similarity(torch.stack([v, 2 * v, 0.5 * v])) == pytest.approx(1.0)  # identical directions
    assert self_similarity(torch.eye(4)) == pytest.approx(0.0)  # orthogonal
    assert self_similarity(torch.stack([v, -v])) == pytest.approx(-1.0)
    # e1, e1, e2: pairs (1,2) and (2,1) have cosine 1, the other four 0 -> 2/6.
    assert self_similarity(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1 / 3)
    hidden = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert self_similarity(hidden) == pytest.approx(brute_force(hidden), abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        self_similarity(torch.ones(1, 3))


def test_matches_brute_force_per_text_and_layer(tiny_tokenizer, tiny_llama):
    """Batched, right-padded forward == one unpadded forward per text, every layer, brute-force pair average."""
    report = layer_self_similarity(tiny_llama, tiny_tokenizer, TEXTS, max_tokens=32, batch_size=2)
    assert report.num_layers == 4 and len(report.layers) == 5 and report.texts == 3
    expected = [[] for _ in range(5)]
    with torch.no_grad():
        for text in TEXTS:
            ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"][:, :32]
            hidden_states = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states
            for layer, states in enumerate(hidden_states):
                expected[layer].append(brute_force(states[0]))
    for row, values in zip(report.layers, expected):
        assert row.mean_cosine == pytest.approx(sum(values) / len(values), abs=1e-5)
        assert row.std == pytest.approx(torch.tensor(values, dtype=torch.float64).std().item(), abs=1e-5)
    assert report.layers[0].description == "embeddings" and "final norm" in report.layers[-1].description


def test_identical_embeddings_give_one(tiny_tokenizer, tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = torch.linspace(-1, 1, model.config.hidden_size)
    report = layer_self_similarity(model, tiny_tokenizer, TEXTS, max_tokens=16)
    assert report.layers[0].mean_cosine == pytest.approx(1.0, abs=1e-6)
    assert report.layers[0].std == pytest.approx(0.0, abs=1e-6)


def test_special_tokens_are_fed_but_not_counted(tiny_tokenizer):
    class WithBos:
        """The tiny tokenizer plus a leading BOS marked special, as Gemma's tokenizer adds one."""

        pad_token_id = tiny_tokenizer.pad_token_id

        def __call__(self, text, add_special_tokens=True, return_special_tokens_mask=True):
            ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": [testing.BOS_ID] + ids, "special_tokens_mask": [1] + [0] * len(ids)}

    ids, keep = isotropy._token_ids(WithBos(), TEXTS[0], max_tokens=3)
    assert ids[0] == testing.BOS_ID and keep == [False, True, True, True] and len(ids) == 4
    model = testing.tiny_llama(seed=0)
    report = layer_self_similarity(model, WithBos(), TEXTS[:1], max_tokens=6)
    with torch.no_grad():
        states = model(
            input_ids=torch.tensor([ids[:1] + WithBos()(TEXTS[0])["input_ids"][1:7]]), output_hidden_states=True
        )
    assert report.tokens == 6
    assert report.layers[2].mean_cosine == pytest.approx(brute_force(states.hidden_states[2][0, 1:]), abs=1e-5)


def test_default_texts_are_long_human_texts():
    from cdlm.eval_harness.data import load_rows

    rows, _ = load_rows(None, "hellaswag/validation")
    texts = default_texts(rows, 20)
    assert len(texts) == 20 and all(len(t) >= isotropy.MIN_CHARACTERS for t in texts)
    assert texts == default_texts(rows, 25)[:20]  # deterministic, in file order
    short = {"ctx": "A man", "endings": ["runs.", "x" * 300], "label": "1"}
    assert default_texts([{"ctx": "A man", "endings": ["runs."], "label": "0"}, short], 1) == ["A man " + "x" * 300]


def test_bad_input(tiny_tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="max_tokens"):
        layer_self_similarity(tiny_llama, tiny_tokenizer, TEXTS, max_tokens=1)
    with pytest.raises(ValueError, match="2 or more tokens"):
        layer_self_similarity(tiny_llama, tiny_tokenizer, ["a"], max_tokens=8)
    with pytest.raises(ValueError, match="number of texts"):
        default_texts([], 0)


def test_cli_writes_json_and_table(tmp_path, tiny_tokenizer, capsys):
    from cdlm.cli import main

    folder = tmp_path / "tiny"
    testing.tiny_llama(seed=0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    output = tmp_path / "out" / "isotropy.json"
    code = main(
        [
            "isotropy",
            str(folder),
            "--texts-file",
            str(texts),
            "--max-tokens",
            "16",
            "--output",
            str(output),
            "--threads",
            "1",
        ]
    )
    assert code == 0
    payload = json.loads(output.read_text())
    (report,) = payload["reports"]
    assert report["texts"] == 3 and [row["layer"] for row in report["layers"]] == [0, 1, 2, 3, 4]
    assert "| layer |" in output.with_suffix(".md").read_text() and "| layer |" in capsys.readouterr().out
    # Several models in one command: one report each, in order (here the same model twice).
    assert (
        main(["isotropy", str(folder), str(folder), "--texts-file", str(texts), "--max-tokens", "16", "--json"]) == 0
    )
    both = json.loads(capsys.readouterr().out)["reports"]
    assert [r["layers"] for r in both] == [report["layers"]] * 2
    assert main(["isotropy", str(folder), "--texts-file", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
