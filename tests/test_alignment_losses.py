"""Oracle tests for cdlm.alignment's objectives.

* DPO / APO-zero / APO-down: the papers' formulas (tests/reference_formulas.py), fed with log-probabilities from an
  independent full-logits forward, equal TRL's own ``DPOTrainer`` loss on the same batch; ``PreferenceTrainer``
  equals it too.
* CPO: ``PreferenceTrainer``'s loss equals ``trl.experimental.cpo.CPOTrainer.cpo_loss`` plus its cross-entropy NLL.
* SparsePO with all-ones masks equals an independent TDPO1 computation (pure function and whole trainer).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from reference_formulas import apo_down_loss, apo_zero_loss, dpo_sigmoid_loss, token_kl_from_logits
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOTrainer

from cdlm import testing
from cdlm.alignment.preference.config import PreferenceConfig
from cdlm.alignment.preference.losses import chosen_nll, chunked_token_logps_and_kl, cpo_loss, sparsepo_loss
from cdlm.alignment.preference.trainer import PreferenceTrainer

PAIRS = [
    {
        "prompt": "Human: How do I bake bread? Assistant:",
        "chosen": " Mix flour, water, yeast and salt, then bake it.",
        "rejected": " No.",
    },
    {
        "prompt": "Question: How many clips did she sell?",
        "chosen": " She sold 48 / 2 = 24 clips.",
        "rejected": " The quick brown fox.",
    },
    {"prompt": "A man is sitting on a roof.", "chosen": " He starts pulling up roofing.", "rejected": " 0 1 2 3 4 5"},
    {
        "prompt": "Human: Tell me a joke. Assistant:",
        "chosen": " The lazy dog jumps.",
        "rejected": " Contrastive decoding compares models.",
    },
]

COMMON = dict(
    bf16=False,
    gradient_checkpointing=False,
    report_to=[],
    max_length=64,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    save_strategy="no",
    disable_tqdm=True,
    beta=0.5,
)


LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def tiny_model(seed: int = 0, arch: str = "llama"):
    return testing.tiny_llama(seed=seed) if arch == "llama" else testing.tiny_gemma3(seed=seed)


def perturb_adapter(model, seed: int = 0) -> None:
    """Give the LoRA adapter random A and B (B is zero at init), so policy != reference, reproducibly."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def make_trainer(trainer_class, config, tokenizer, seed=0, arch="llama", pairs=PAIRS):
    """A trainer that wraps a fresh tiny model with LoRA itself (reference = adapter disabled), adapter perturbed."""
    trainer = trainer_class(
        tiny_model(seed, arch),
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    perturb_adapter(trainer.model, seed)
    return trainer


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def full_token_logits(model, batch, reference: bool):
    """Independent path: the ordinary forward with full logits (no fused head), adapter disabled for the reference."""
    context = model.disable_adapter() if reference else torch.enable_grad()
    with context, torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].float()


def sequence_logps(logits, batch):
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    return (token_logps * mask).sum(-1).chunk(2), token_logps, mask


@pytest.fixture(scope="module")
def tokenizer():
    return testing.tiny_tokenizer()


@pytest.mark.parametrize(
    ("method", "loss_fn"), [("dpo", dpo_sigmoid_loss), ("apo_zero", apo_zero_loss), ("apo_down", apo_down_loss)]
)
def test_dpo_and_apo_equal_trl_dpo_trainer(method, loss_fn, tokenizer, tmp_path):
    trl_config = DPOConfig(
        output_dir=str(tmp_path / "trl"), loss_type={"dpo": "sigmoid"}.get(method, method), **COMMON
    )
    trl_trainer = make_trainer(DPOTrainer, trl_config, tokenizer)
    batch = first_batch(trl_trainer)
    with torch.no_grad():
        trl_loss = trl_trainer.compute_loss(trl_trainer.model, batch)

    # Oracle 1: cdlm's pure function on log-probs from an independent full-logits forward.
    model = trl_trainer.model
    (policy_w, policy_l), _, _ = sequence_logps(full_token_logits(model, batch, reference=False), batch)
    (ref_w, ref_l), _, _ = sequence_logps(full_token_logits(model, batch, reference=True), batch)
    ours = loss_fn(policy_w, policy_l, ref_w, ref_l, beta=COMMON["beta"]).mean()
    assert abs(float(ours) - float(trl_loss)) < 1e-4
    assert abs(float(trl_loss) - (0.6931 if method == "dpo" else 1.0)) > 1e-3  # policy != reference: non-trivial

    # Oracle 2: PreferenceTrainer on the same batch and weights gives TRL's number.
    config = PreferenceConfig(output_dir=str(tmp_path / "cdlm"), method=method, **COMMON)
    trainer = make_trainer(PreferenceTrainer, config, tokenizer)
    with torch.no_grad():
        cdlm_loss = trainer.compute_loss(trainer.model, batch)
    assert torch.allclose(cdlm_loss, trl_loss, atol=1e-6)


def test_cpo_equals_trl_cpo_trainer_loss(tokenizer, tmp_path):
    config = PreferenceConfig(output_dir=str(tmp_path), method="cpo", cpo_alpha=0.7, **COMMON)
    trainer = make_trainer(PreferenceTrainer, config, tokenizer, seed=3)
    model = trainer.model
    batch = first_batch(trainer)
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch)

    logits = full_token_logits(model, batch, reference=False)
    (chosen, rejected), _, _ = sequence_logps(logits, batch)
    # TRL's CPO: cpo_loss on policy log-probs + alpha * CrossEntropyLoss over the chosen completion tokens.
    fake_self = SimpleNamespace(
        alpha=0.0,
        beta=COMMON["beta"],
        loss_type="sigmoid",
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )
    trl_losses, _, _ = CPOTrainer.cpo_loss(fake_self, chosen, rejected)
    half = batch["input_ids"].size(0) // 2
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:half, 1:]
    nll = torch.nn.CrossEntropyLoss()(logits[:half].reshape(-1, logits.size(-1)), labels.reshape(-1))
    expected = trl_losses.mean() + 0.7 * nll
    assert abs(float(ours) - float(expected)) < 1e-4
    assert trainer.ref_model is None  # reference-free


def test_cpo_pure_function_matches_trl_with_label_smoothing():
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=generator) * 5, torch.randn(6, generator=generator) * 5
    token_logps = -torch.rand(3, 7, generator=generator) * 4
    mask = (torch.rand(3, 7, generator=generator) > 0.3).float()
    nll = chosen_nll(token_logps, mask)
    assert torch.allclose(nll, -(token_logps[mask.bool()]).mean())
    fake_self = SimpleNamespace(
        alpha=0.0, beta=0.3, loss_type="sigmoid", label_smoothing=0.2, accelerator=SimpleNamespace(device="cpu")
    )
    trl_losses, _, _ = CPOTrainer.cpo_loss(fake_self, chosen, rejected)
    loss, per_pair = cpo_loss(chosen, rejected, nll, beta=0.3, alpha=2.0, label_smoothing=0.2)
    assert torch.allclose(per_pair, trl_losses)
    assert torch.allclose(loss, trl_losses.mean() + 2.0 * nll)


def tdpo1_reference(policy_logits, ref_logits, labels, mask, beta):
    """TDPO1 (Zeng et al., 2024) written from the paper, independently of cdlm.alignment.preference.losses."""
    policy_logp = torch.log_softmax(policy_logits, -1)
    ref_logp = torch.log_softmax(ref_logits, -1)
    ratio = (policy_logp - ref_logp).gather(-1, labels[..., None]).squeeze(-1)
    seq_ratio = (ratio * mask).sum(-1)
    kl = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)
    seq_kl = (kl * mask).sum(-1)
    b = seq_ratio.size(0) // 2
    u = beta * seq_ratio[:b] - beta * seq_ratio[b:]
    delta = beta * seq_kl[b:] - beta * seq_kl[:b]
    return -F.logsigmoid(u - delta)


def test_sparsepo_with_unit_masks_is_tdpo1():
    generator = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 17
    policy_logits = torch.randn(2 * B, T, V, generator=generator) * 2
    ref_logits = torch.randn(2 * B, T, V, generator=generator) * 2
    labels = torch.randint(0, V, (2 * B, T), generator=generator)
    mask = (torch.rand(2 * B, T, generator=generator) > 0.3).float()
    policy_logp = torch.log_softmax(policy_logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    kl = token_kl_from_logits(ref_logits, policy_logits)
    ones = torch.ones_like(mask)
    out = sparsepo_loss(policy_logp, ref_logp, kl, mask, ones, ones, beta=0.2)
    expected = tdpo1_reference(policy_logits, ref_logits, labels, mask, beta=0.2)
    assert torch.allclose(out.losses, expected, atol=1e-6)
    assert torch.allclose(out.loss, expected.mean(), atol=1e-6)
    # Zero masks remove every term: loss is log 2 whatever the models say.
    zeros = torch.zeros_like(mask)
    assert torch.allclose(
        sparsepo_loss(policy_logp, ref_logp, kl, mask, zeros, zeros, beta=0.2).losses,
        torch.full((B,), 0.6931472),
        atol=1e-6,
    )
    # L1 counts the shared mask once, independent masks twice.
    assert torch.isclose(
        sparsepo_loss(policy_logp, ref_logp, kl, mask, ones, ones, beta=0.2, mask_l1=0.5).loss,
        expected.mean() + 0.5,
        atol=1e-6,
    )
    assert torch.isclose(
        sparsepo_loss(policy_logp, ref_logp, kl, mask, ones, ones.clone(), beta=0.2, mask_l1=0.5).loss,
        expected.mean() + 1.0,
        atol=1e-6,
    )


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_logps_and_kl_match_full_vocab_and_gradients(softcap):
    generator = torch.Generator().manual_seed(1)
    N, H, V = 11, 8, 23
    weight = torch.randn(V, H, generator=generator)
    policy_hidden = torch.randn(N, H, generator=generator, requires_grad=True)
    ref_hidden = torch.randn(N, H, generator=generator)
    labels = torch.randint(0, V, (N,), generator=generator)

    def head(h):
        z = h @ weight.T
        return softcap * torch.tanh(z / softcap) if softcap else z

    full_logp = torch.log_softmax(head(policy_hidden), -1)
    full_ref = torch.log_softmax(head(ref_hidden), -1)
    exp_logp = full_logp.gather(-1, labels[:, None]).squeeze(-1)
    exp_kl = token_kl_from_logits(head(ref_hidden), head(policy_hidden))
    (exp_logp.sum() + exp_kl.sum()).backward()
    expected_grad = policy_hidden.grad.clone()
    policy_hidden.grad = None

    logp, ref_logp, kl = chunked_token_logps_and_kl(
        policy_hidden, ref_hidden, weight, None, labels, softcap=softcap, chunk_size=4
    )
    assert torch.allclose(logp, exp_logp, atol=1e-5)
    assert torch.allclose(ref_logp, full_ref.gather(-1, labels[:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(kl, exp_kl, atol=1e-5)
    (logp.sum() + kl.sum()).backward()
    assert torch.allclose(policy_hidden.grad, expected_grad, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sparsepo_trainer_with_unit_masks_equals_tdpo1(arch, tokenizer, tmp_path):
    config = PreferenceConfig(output_dir=str(tmp_path), method="sparsepo", sparsepo_mask_type="learned", **COMMON)
    trainer = make_trainer(PreferenceTrainer, config, tokenizer, seed=5, arch=arch)
    model = trainer.model
    with torch.no_grad():  # make the learned mask exactly 1: zero head weights, unit bias, a single-layer mix
        for head in trainer.mask_module.reward.heads:
            head[1].weight.zero_()
            head[1].bias.fill_(1.0)
        trainer.mask_module.reward.mix.weight.zero_()
        trainer.mask_module.reward.mix.weight[0, 0] = 1.0
    batch = first_batch(trainer)
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch)
    policy_logits = full_token_logits(model, batch, reference=False)
    ref_logits = full_token_logits(model, batch, reference=True)
    expected = tdpo1_reference(
        policy_logits, ref_logits, batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:].float(), COMMON["beta"]
    )
    assert abs(float(ours) - float(expected.mean())) < 1e-4
    assert abs(float(ours) - 0.6931) > 1e-4


def test_gradients_reach_lora_and_learned_mask_heads(tokenizer, tmp_path):
    config = PreferenceConfig(
        output_dir=str(tmp_path), method="sparsepo", sparsepo_shared_mask=False, sparsepo_mask_l1=0.1, **COMMON
    )
    trainer = make_trainer(PreferenceTrainer, config, tokenizer, seed=7)
    batch = first_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    lora_grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert sum(float(g.abs().sum()) for g in lora_grads) > 0
    for mask in (trainer.mask_module.reward, trainer.mask_module.kl):
        assert mask.mix.weight.grad is not None and float(mask.mix.weight.grad.abs().sum()) > 0
        assert any(h[1].weight.grad is not None and float(h[1].weight.grad.abs().sum()) > 0 for h in mask.heads)
    base_grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert all(g is None for g in base_grads)
