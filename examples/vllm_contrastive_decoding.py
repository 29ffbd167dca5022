"""Contrastive decoding and contrastive input decoding served by vLLM (run in .venv-vllm).

    bash scripts/setup_vllm.sh
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python examples/vllm_contrastive_decoding.py

Two ways to use it: cdlm's backend (``load_vllm`` + ``generate``, the same results as
``cdlm.decoding.runner.generate``), or plain vLLM with the processor registered and per-request
settings in ``SamplingParams.extra_args`` (flat ``cdlm_*`` keys; over HTTP the same keys go in the
body's ``vllm_xargs``, see ``cdlm serve``): greedy, CD and CID requests share one batch. The engine
captures layer 8, so ``early-exit:8`` costs one norm + LM head on vLLM's own forward pass.
"""

from cdlm.decoding.vllm import ContrastParams, generate, load_vllm


def main() -> None:
    engine = load_vllm("smollm2-135m-instruct", max_model_len=1024, max_num_seqs=8, early_exit_layers=[8])
    chat = lambda text: engine.tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    prompts = [chat("Write a short poem about the sea.")]
    contrastive = [chat("Write a short poem.")]

    # 1. cdlm's backend: method names and hyperparameters as on the command line.
    for method, kwargs in [
        ("greedy", {}),
        ("cd", {"amateur": "early-exit:8", "hyperparameters": {"alpha": 0.1, "beta": 0.5}}),
        ("cid", {"contrastive_prompts": contrastive, "hyperparameters": {"cid_lambda": 0.5}}),
    ]:
        results, stats = generate(engine, prompts, method, max_new_tokens=40, add_special_tokens=False, **kwargs)
        print(f"=== {method} ({stats.tokens_per_second:.1f} tokens/s)\n{results[0].text.strip()}\n")

    # 2. Plain vLLM: the processor is registered on engine.llm; switch it on per request.
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = engine.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    cd = ContrastParams(method="cd", amateur="early-exit:8", beta=1.0)  # .to_extra_args(): {"cdlm_method": "cd", ...}
    outputs = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=ids)] * 2,
        [
            SamplingParams(temperature=0, max_tokens=40),
            SamplingParams(temperature=0, max_tokens=40, extra_args=cd.to_extra_args()),
        ],
        use_tqdm=False,
    )
    for label, output in zip(["greedy", "cd beta=1"], outputs):
        print(f"--- {label}: {output.outputs[0].text.strip()}")


if __name__ == "__main__":
    main()
