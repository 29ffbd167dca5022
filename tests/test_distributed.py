"""Every trainer under data parallelism: 2 gloo processes (``torchrun --nproc_per_node 2``) == 1 process.

Each trainer runs a few steps on tiny models twice with the same *global* batch: once in this pytest
process (no launcher, one process) and once in 2 CPU processes started exactly as users start them,
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (= ``torchrun``; ``accelerate
launch --cpu`` would start only one process on a machine without MPI). One launch runs all trainers
to keep the file fast. Checked per trainer:

* the logged losses and grad-norms match the one-process run (rtol 1e-4: only the order of float
  additions differs);
* both ranks end with bit-identical trainable weights, and these match the one-process weights
  (atol 1e-4 after 2-3 AdamW steps at learning rate 2e-3: Adam's first steps move a weight by about
  the learning rate whatever the gradient's size, so float-level gradient differences on near-zero
  gradients show up as up to ~3e-5; observed max 2.5e-5, reward model);
* the plain launch (no ``use_cpu``) trains with 2 data-parallel processes, not 2 independent copies
  (what ``accelerate`` does on CPUs unless the run is marked as CPU; the configs now mark it);
* only rank 0 writes (one checkpoint folder, no partial writes); PPO resumed from a checkpoint in
  2 processes ends where the uninterrupted 2-process run ends.

Run a worker by hand: ``torchrun --nproc_per_node 2 tests/test_distributed.py --worker OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

GLOBAL_BATCH = 2
STEPS = 3
PAIRS = [
    {
        "prompt": "Human: How do I bake bread? Assistant:",
        "chosen": " Mix flour, water, yeast and salt.",
        "rejected": " No.",
    },
    {"prompt": "Question: How many clips?", "chosen": " She sold 24 clips.", "rejected": " The quick brown fox."},
    {"prompt": "Count to five.", "chosen": " 1 2 3 4 5", "rejected": " 7 7"},
    {"prompt": "Name a colour.", "chosen": " Brown, like the fox.", "rejected": " 12 + 9"},
    {"prompt": "A man is sitting on a roof.", "chosen": " He starts pulling up roofing.", "rejected": " = ( )"},
    {"prompt": "What is 2+2?", "chosen": " 2 + 2 = 4", "rejected": " The lazy dog."},
]
PPO_PROMPTS = ["The quick brown", "Answer: She sold", "A man is sitting on", "Human: How do I bake"]
PREFERENCE_CASES = {
    "dpo": {"method": "dpo"},
    "apo_zero": {"method": "apo_zero"},
    "apo_down": {"method": "apo_down"},
    "cpo": {"method": "cpo"},
    "sparsepo_learned": {"method": "sparsepo", "sparsepo_mask_type": "learned", "sparsepo_mask_l1": 0.01},
    "sparsepo_activation": {"method": "sparsepo", "sparsepo_mask_type": "activation"},
}
CASES = [*PREFERENCE_CASES, "distillm2", "distillm2_token", "reward_model", "ppo"]


# ----------------------------------------------------------------------------------------------- workers
# Everything below runs identically in one process (called from the tests) and in each torchrun rank.


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _record(
    out: Path, name: str, trainer, trainable: dict[str, torch.Tensor], log: list[dict], seconds: float
) -> None:
    rank, world = _world()
    torch.save({k: v.detach().float().cpu() for k, v in trainable.items()}, out / f"{name}.rank{rank}.pt")
    if rank == 0:
        record = {"log": log, "seconds": seconds, "launched": world, "processes": trainer.accelerator.num_processes}
        (out / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _common(out: Path, name: str) -> dict:
    _, world = _world()
    return dict(
        output_dir=str(out / name),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=2e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        bf16=False,
        dataloader_pin_memory=False,
    )


def _lora(task_type: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type=task_type)


def _run_preference(out: Path, name: str) -> None:
    from datasets import Dataset

    from cdlm import testing
    from cdlm.alignment.preference.config import PreferenceConfig
    from cdlm.alignment.preference.trainer import PreferenceTrainer

    config = PreferenceConfig(
        **_common(out, name), max_length=64, gradient_checkpointing=False, **PREFERENCE_CASES[name]
    )
    trainer = PreferenceTrainer(
        testing.tiny_llama(0),
        args=config,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=testing.tiny_tokenizer(),
        peft_config=_lora(),
    )
    started = time.perf_counter()
    trainer.train()
    trainable = _trainable(trainer.model)
    if trainer.mask_module is not None:
        trainable.update({"masks." + n: p for n, p in trainer.mask_module.named_parameters()})
    _record(out, name, trainer, trainable, trainer.state.log_history, time.perf_counter() - started)


def _run_distillm2(out: Path, name: str) -> None:
    from cdlm import testing
    from cdlm.alignment.distill.config import DistiLLM2Config
    from cdlm.alignment.distill.trainer import DistiLLM2Trainer

    reduction = "token" if name.endswith("token") else "sequence"
    config = DistiLLM2Config(**_common(out, name), reduction=reduction, max_length=64)
    student, teacher = testing.tiny_llama(1, hidden_size=32, num_layers=2), testing.tiny_llama(0)
    trainer = DistiLLM2Trainer(
        student,
        teacher,
        args=config,
        train_dataset=PAIRS,
        processing_class=testing.tiny_tokenizer(),
        peft_config=_lora(),
    )
    started = time.perf_counter()
    trainer.train()
    _record(out, name, trainer, _trainable(trainer.model), trainer.state.log_history, time.perf_counter() - started)


def _run_reward_model(out: Path, name: str, model_dir: Path) -> None:
    from datasets import Dataset

    from cdlm import testing
    from cdlm.alignment.rl.reward_model import train_reward_model

    common = _common(out, name)
    rows = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PAIRS]
    started = time.perf_counter()
    trainer = train_reward_model(
        model_dir,
        testing.tiny_tokenizer(),
        Dataset.from_list(rows),
        out / name,
        lora_r=4,
        lora_alpha=8,
        learning_rate=2e-3,
        per_device_train_batch_size=common["per_device_train_batch_size"],
        max_length=64,
        max_steps=STEPS,
        seed=0,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    _record(out, name, trainer, _trainable(trainer.model), trainer.state.log_history, time.perf_counter() - started)


def _letter_reward(prompts, completions, **kwargs):
    return [c.count("e") / 4.0 for c in completions]


def _ppo_trainer(out: Path, name: str, iterations: int, save_steps: int = 1):
    from cdlm import testing
    from cdlm.alignment.rl.config import ContrastivePPOConfig
    from cdlm.alignment.rl.trainer import ContrastivePPOTrainer

    config = ContrastivePPOConfig(
        output_dir=str(out / name),
        num_iterations=iterations,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        gradient_accumulation_steps=2 // _world()[1],
        max_new_tokens=4,
        learning_rate=3e-3,
        temperature=1.0,
        kl_coef=0.1,
        seed=0,
        save_steps=save_steps,
    )
    return ContrastivePPOTrainer(
        testing.tiny_llama(0), config, testing.tiny_tokenizer(), _letter_reward, PPO_PROMPTS, peft_config=_lora()
    )


def _run_ppo(out: Path, name: str) -> None:
    trainer = _ppo_trainer(out, name, iterations=2)
    started = time.perf_counter()
    history = trainer.train()
    _record(out, name, trainer, trainer._trainable_state(), history, time.perf_counter() - started)
    # Resume: a fresh trainer continues from checkpoint-1 of the run above and must end at the same weights.
    resumed = _ppo_trainer(out, name, iterations=2)
    resumed.train(resume_from_checkpoint=str(out / name / "checkpoint-1"))
    _record(out, name + "_resumed", resumed, resumed._trainable_state(), resumed.history, 0.0)
    # Final checkpoint only (save_steps=0): every process must take part in the save, whoever sees the folder first.
    _ppo_trainer(out, name + "_final_only", iterations=1, save_steps=0).train()


def run_cases(out: Path, cases: list[str], model_dir: Path) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for name in cases:
        torch.manual_seed(0)  # each case starts from the same global RNG state, whatever ran before it
        if name in PREFERENCE_CASES:
            _run_preference(out, name)
        elif name.startswith("distillm2"):
            _run_distillm2(out, name)
        elif name == "reward_model":
            _run_reward_model(out, name, model_dir)
        elif name == "ppo":
            _run_ppo(out, name)
        else:
            raise ValueError(f"unknown case {name!r}")


# ------------------------------------------------------------------------------------------------- tests


def _torchrun(out: Path, model_dir: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        __file__,
        "--worker",
        str(out),
        "--model-dir",
        str(model_dir),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from cdlm import testing

    path = tmp_path_factory.mktemp("tiny_llama")
    testing.tiny_llama(0).save_pretrained(path)
    testing.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("two")
    result = _torchrun(out, model_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    try:
        run_cases(out, CASES, model_dir)
    finally:
        torch.set_num_threads(threads)
    return out


def _logged(out: Path, name: str, key: str) -> list[float]:
    log = json.loads((out / f"{name}.json").read_text())["log"]
    return [entry[key] for entry in log if key in entry]


@pytest.mark.parametrize("name", CASES)
def test_two_processes_match_one_process(name, one_process, two_processes):
    # A plain torchrun launch (no use_cpu) must train as 2 data-parallel processes, not 2 independent copies.
    assert json.loads((two_processes / f"{name}.json").read_text())["processes"] == 2
    keys = ("loss/policy", "loss/value", "kl", "score", "grad_norm") if name == "ppo" else ("loss", "grad_norm")
    for key in keys:
        single, double = _logged(one_process, name, key), _logged(two_processes, name, key)
        assert len(single) == len(double) > 0, (key, single, double)
        torch.testing.assert_close(
            torch.tensor(double), torch.tensor(single), rtol=1e-4, atol=1e-6, msg=f"{name} {key}"
        )
    rank0 = torch.load(two_processes / f"{name}.rank0.pt")
    rank1 = torch.load(two_processes / f"{name}.rank1.pt")
    single = torch.load(one_process / f"{name}.rank0.pt")
    assert rank0.keys() == rank1.keys() == single.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{name}: ranks disagree on {key}"
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=1e-4, msg=f"{name}: {key}")


def test_every_step_had_a_gradient(one_process):
    """Guards the comparison above against runs that never update (equal because nothing happened)."""
    for name in CASES:
        grad_norms = _logged(one_process, name, "grad_norm")
        assert all(g > 0 for g in grad_norms), (name, grad_norms)


def test_sparsepo_mask_gradients_do_not_leak_into_the_next_step(tmp_path):
    """Trainer zeroes only the model's gradients; the learned masks' must be reset after every step too."""
    from datasets import Dataset

    from cdlm import testing
    from cdlm.alignment.preference.config import PreferenceConfig
    from cdlm.alignment.preference.trainer import PreferenceTrainer

    common = {**_common(tmp_path, "masks"), "max_steps": 2, "save_strategy": "no"}
    config = PreferenceConfig(
        **common, max_length=64, gradient_checkpointing=False, **PREFERENCE_CASES["sparsepo_learned"]
    )
    trainer = PreferenceTrainer(
        testing.tiny_llama(0),
        args=config,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=testing.tiny_tokenizer(),
        peft_config=_lora(),
    )
    seen = []
    trainer.add_callback(
        type(
            "Spy",
            (TrainerCallback,),
            {
                "on_pre_optimizer_step": lambda self, *a, **k: seen.append(
                    [None if p.grad is None else p.grad.clone() for p in trainer.mask_module.parameters()]
                )
            },
        )()
    )
    trainer.train()
    assert len(seen) == 2 and all(g is not None for g in seen[0])
    assert all(p.grad is None for p in trainer.mask_module.parameters())


def test_ppo_resumed_in_two_processes_matches_uninterrupted(two_processes):
    full = torch.load(two_processes / "ppo.rank0.pt")
    for rank in (0, 1):
        resumed = torch.load(two_processes / f"ppo_resumed.rank{rank}.pt")
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)
    assert (two_processes / "ppo_final_only" / "checkpoint-1" / "trainer_state.json").exists()
    full_log = _logged(two_processes, "ppo", "loss/policy")
    assert _logged(two_processes, "ppo_resumed", "loss/policy") == full_log


def test_one_writer_for_checkpoints(two_processes):
    for name in CASES:
        if name == "reward_model":  # train_reward_model saves the final model only
            assert (two_processes / name / "adapter_config.json").exists()
            continue
        folders = sorted(p.name for p in (two_processes / name).iterdir() if p.name.startswith("checkpoint-"))
        assert folders == [f"checkpoint-{STEPS}"] if name != "ppo" else folders, (name, folders)
    ppo = two_processes / "ppo"
    assert sorted(p.name for p in ppo.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((ppo / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 2


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, required=True, help="output folder of this launch")
    parser.add_argument("--model-dir", type=Path, required=True, help="a saved tiny model (reward-model training)")
    parser.add_argument("--cases", nargs="*", default=CASES)
    parsed = parser.parse_args()
    run_cases(parsed.worker, parsed.cases, parsed.model_dir)
