"""DistiLLM-2 pair generation (resumable, settings recorded) and the `cdlm distill` command line."""

from __future__ import annotations

import json

import pytest
import torch

from cdlm import testing
from cdlm.alignment.distill.pairs import (
    PairGenerationSettings,
    SamplingSettings,
    generate_pairs,
    mean_logprobs,
    read_pairs,
    read_prompts,
    settings_path,
)
from cdlm.cli import main
from cdlm.decoding.methods import Greedy
from cdlm.decoding.runner import generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["What is 2+2?", "Tell me about the fox.", "How do I bake bread?", "Count to five."]


@pytest.fixture(scope="module")
def tok():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher():
    return testing.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def student():
    return testing.tiny_llama(seed=1, hidden_size=32, num_layers=2)


def _settings(**kwargs):
    return PairGenerationSettings(teacher="t", student="s", max_new_tokens=kwargs.pop("max_new_tokens", 12), **kwargs)


def test_pairs_hold_teacher_and_student_responses(tmp_path, tok, teacher, student):
    out = tmp_path / "pairs.jsonl"
    rows = generate_pairs(
        PROMPTS, teacher=teacher, student=student, tokenizer=tok, output=out, settings=_settings(), batch_size=3
    )
    assert [r["prompt"] for r in rows] == PROMPTS
    meta = json.loads(settings_path(out).read_text())
    assert meta["max_new_tokens"] == 12 and meta["teacher_sampling"]["do_sample"] is False
    # The greedy teacher response is exactly what the shared generation runner produces.
    rendered = [r["prompt_text"] for r in rows]
    reference, _ = generate(teacher, tok, rendered, Greedy(teacher, tok), max_new_tokens=12, add_special_tokens=False)
    for row, ref in zip(rows, reference):
        ids = row["chosen_ids"]
        stripped = ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids
        assert stripped == ref.token_ids
        assert row["chosen"] == tok.decode(ids, skip_special_tokens=True)
        assert row["prompt_ids"] == tok(row["prompt_text"], add_special_tokens=False)["input_ids"]
    # Scores are the models' mean log-probs of the responses (the curriculum anchors).
    got = mean_logprobs(student, [rows[0]["prompt_ids"]], [rows[0]["rejected_ids"]])[0]
    assert rows[0]["rejected_student_logp"] == pytest.approx(got, abs=1e-5)


def test_mean_logprobs_matches_a_direct_computation(tok, teacher):
    prompt, completion = [1, 40, 41, 42], [50, 51, 52]
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([prompt + completion])).logits[0]
    logp = torch.log_softmax(logits, -1)
    expected = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)) / len(completion)
    got = mean_logprobs(teacher, [prompt, [1, 7]], [completion, [9, 9, 9, 9, 9]], batch_size=2)
    assert got[0] == pytest.approx(expected, abs=1e-5)


def test_generation_resumes_and_skips_done_prompts(tmp_path, tok, teacher, student):
    out = tmp_path / "pairs.jsonl"
    generate_pairs(
        PROMPTS[:2], teacher=teacher, student=student, tokenizer=tok, output=out, settings=_settings(), batch_size=2
    )
    first = out.read_text().splitlines()
    calls = []
    rows = generate_pairs(
        PROMPTS,
        teacher=teacher,
        student=student,
        tokenizer=tok,
        output=out,
        settings=_settings(),
        batch_size=2,
        on_batch=lambda done, total: calls.append(done),
    )
    lines = out.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 4
    assert calls == [4]  # one batch: only the two new prompts were generated
    assert [r["prompt"] for r in rows] == PROMPTS
    # a finished file: nothing to do
    generate_pairs(
        PROMPTS, teacher=teacher, student=student, tokenizer=tok, output=out, settings=_settings(), batch_size=2
    )
    assert len(read_pairs(out)) == 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_pairs(
            PROMPTS,
            teacher=teacher,
            student=student,
            tokenizer=tok,
            output=out,
            settings=_settings(max_new_tokens=5),
            batch_size=2,
        )


def test_sampled_student_responses_are_reproducible(tmp_path, tok, teacher, student):
    settings = _settings(student_sampling=SamplingSettings(temperature=1.0), seed=3)
    a = generate_pairs(
        PROMPTS, teacher=teacher, student=student, tokenizer=tok, output=tmp_path / "a.jsonl", settings=settings
    )
    b = generate_pairs(
        PROMPTS, teacher=teacher, student=student, tokenizer=tok, output=tmp_path / "b.jsonl", settings=settings
    )
    assert [r["rejected_ids"] for r in a] == [r["rejected_ids"] for r in b]


def test_bad_prompt_sets_and_tokenizers_are_clear_errors(tmp_path, tok, teacher, student):
    with pytest.raises(ValueError, match="prompt set is empty"):
        generate_pairs(
            [], teacher=teacher, student=student, tokenizer=tok, output=tmp_path / "x.jsonl", settings=_settings()
        )
    with pytest.raises(ValueError, match="empty or whitespace"):
        generate_pairs(
            ["ok", "  "],
            teacher=teacher,
            student=student,
            tokenizer=tok,
            output=tmp_path / "x.jsonl",
            settings=_settings(),
        )
    from cdlm.models.amateur import TokenizerMismatchError

    with pytest.raises(TokenizerMismatchError):
        generate_pairs(
            PROMPTS,
            teacher=teacher,
            student=student,
            tokenizer=tok,
            student_tokenizer=testing.tiny_tokenizer(320),
            output=tmp_path / "x.jsonl",
            settings=_settings(),
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        read_prompts(empty)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=0.0)


def test_read_prompts_from_jsonl(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(5)) + "\n")
    assert read_prompts(path, limit=3) == ["q0", "q1", "q2"]
    with pytest.raises(ValueError, match="no field"):
        read_prompts(path, field="missing")


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("distill_cli")
    dirs = {}
    for name, model in (
        ("teacher", testing.tiny_llama(seed=0)),
        ("student", testing.tiny_llama(seed=1, hidden_size=32, num_layers=2)),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def test_cli_generate_then_train_saves_a_loadable_amateur(tmp_path, model_dirs, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    common = ["--teacher", model_dirs["teacher"], "--student", model_dirs["student"], "--device", "cpu"]
    assert (
        main(
            [
                "distill",
                "generate",
                *common,
                "--prompts-file",
                str(prompts),
                "--output",
                str(pairs),
                "--max-new-tokens",
                "8",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 4
    out = tmp_path / "student-out"
    assert (
        main(
            [
                "distill",
                "train",
                *common,
                "--pairs",
                str(pairs),
                "--eval-pairs",
                str(pairs),
                "--output-dir",
                str(out),
                "--max-steps",
                "3",
                "--per-device-train-batch-size",
                "2",
                "--learning-rate",
                "1e-2",
                "--lora-r",
                "0",
                "--adaptive-alpha",
                "--beta-schedule",
                "linear",
            ]
        )
        == 0
    )
    report = json.loads((out / "distill_report.json").read_text())
    assert report["after"]["kl_teacher_responses"] < report["before"]["kl_teacher_responses"]
    from cdlm.models import load_amateur, load_model

    expert = load_model(model_dirs["teacher"], device="cpu", dtype="float32")
    amateur = load_amateur(str(out), expert, dtype="float32")
    assert amateur.kind == "separate" and amateur.vocab_size == 384


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--alpha", "0"], "alpha"),
        (["--alpha", "1.2"], "alpha"),
        (["--beta", "-0.5"], "beta"),
        (["--beta", "2"], "beta"),
    ],
)
def test_cli_rejects_bad_alpha_and_beta_in_one_line(tmp_path, model_dirs, capsys, flags, message):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("")
    code = main(
        [
            "distill",
            "train",
            "--teacher",
            model_dirs["teacher"],
            "--student",
            model_dirs["student"],
            "--pairs",
            str(pairs),
            "--output-dir",
            str(tmp_path / "o"),
            *flags,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cdlm distill: error:" in err and message in err


def test_cli_rejects_an_empty_prompt_file(tmp_path, model_dirs, capsys):
    prompts = tmp_path / "none.txt"
    prompts.write_text("")
    code = main(
        [
            "distill",
            "generate",
            "--teacher",
            model_dirs["teacher"],
            "--student",
            model_dirs["student"],
            "--prompts-file",
            str(prompts),
            "--output",
            str(tmp_path / "p.jsonl"),
        ]
    )
    assert code == 2 and "empty" in capsys.readouterr().err
