"""Decoding and model hardening (issues 23, 26, 27): right padding refused or fixed at every entry point, a CID
processor bound to its batch, a weights fingerprint that sees every value, the model cache key, layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

from cdlm import testing
from cdlm.decoding.contrastive_decoding import ContrastiveDecodingLogitsProcessor, contrastive_decoding_processor
from cdlm.decoding.contrastive_input import ContrastiveInputLogitsProcessor
from cdlm.decoding.contrastive_search import contrastive_search
from cdlm.decoding.dola import dola
from cdlm.decoding.methods import get_method
from cdlm.decoding.runner import generate as run_generate
from cdlm.models import EarlyExitAmateur
from cdlm.run_identity import weights_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["The quick brown fox jumps", "Hi"]


@pytest.fixture(scope="module")
def model():
    return testing.tiny_llama(seed=3)


@pytest.fixture
def right_tokenizer():
    tokenizer = testing.tiny_tokenizer()
    tokenizer.padding_side = "right"  # what save_pretrained + from_pretrained gives for most tokenizers
    return tokenizer


def _right_batch(tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, -1] == 0  # really right-padded
    return batch


# ---------------------------------------------------------------- issue 26 item 2: right padding
def test_cd_processors_refuse_a_right_padded_mask(model, right_tokenizer):
    mask = _right_batch(right_tokenizer)["attention_mask"]
    with pytest.raises(ValueError, match="row 1 is right-padded"):
        ContrastiveDecodingLogitsProcessor(testing.tiny_llama(seed=4), attention_mask=mask)
    with pytest.raises(ValueError, match="right-padded"):
        contrastive_decoding_processor(EarlyExitAmateur(model, 2), attention_mask=mask)


def test_cid_processor_refuses_right_padded_contrastive_inputs(model, right_tokenizer):
    batch = _right_batch(right_tokenizer)
    with pytest.raises(ValueError, match="contrastive attention_mask row 1 is right-padded"):
        ContrastiveInputLogitsProcessor(model, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("loop", [contrastive_search, dola], ids=["cs", "dola"])
def test_custom_generate_loops_refuse_right_padding(model, right_tokenizer, loop):
    batch = _right_batch(right_tokenizer)
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(**batch, max_new_tokens=2, do_sample=False, custom_generate=loop)


@pytest.mark.parametrize("method", ["greedy", "cd", "cid", "cs", "dola"])
def test_runner_pads_left_whatever_the_tokenizer_says(model, right_tokenizer, method):
    """Oracle: each prompt generated alone (no padding at all) gives the batched row's tokens."""
    method_class = get_method(method)
    amateur = EarlyExitAmateur(model, 2) if method_class.needs_amateur else None
    built = method_class(model, right_tokenizer, amateur=amateur)
    contrastive = ["Hi", "The quick brown fox"] if method_class.needs_contrastive_inputs else None
    batched, _ = run_generate(
        model, right_tokenizer, PROMPTS, built, max_new_tokens=5, batch_size=2, contrastive_prompts=contrastive
    )
    for index, (prompt, row) in enumerate(zip(PROMPTS, batched)):
        other = contrastive[index : index + 1] if contrastive else None
        alone, _ = run_generate(
            model, right_tokenizer, [prompt], built, max_new_tokens=5, batch_size=1, contrastive_prompts=other
        )
        assert row.token_ids == alone[0].token_ids


# ---------------------------------------------------------------- issue 27 item 6: CID processor bound to its batch
def test_cid_processor_reused_on_another_batch_is_refused(model):
    tokenizer = testing.tiny_tokenizer()
    first = tokenizer(["Write a poem about the sea."], return_tensors="pt")
    other = tokenizer(["Name a colour."], return_tensors="pt")
    contrast = tokenizer(["Write a poem."], return_tensors="pt")
    cid = ContrastiveInputLogitsProcessor(model, contrast["input_ids"], contrast["attention_mask"], cid_lambda=1.0)
    processors = LogitsProcessorList([cid])
    once = model.generate(**first, max_new_tokens=3, do_sample=False, logits_processor=processors)
    again = model.generate(**first, max_new_tokens=3, do_sample=False, logits_processor=processors)
    assert torch.equal(once, again)  # the same batch again is the same computation: allowed
    with pytest.raises(ValueError, match="contrastive inputs of another batch"):
        model.generate(**other, max_new_tokens=3, do_sample=False, logits_processor=processors)


# ---------------------------------------------------------------- issue 27 item 8: weights fingerprint
def test_weights_fingerprint_changes_for_any_single_value():
    model = testing.tiny_llama(seed=0)
    base = weights_fingerprint(model)
    assert weights_fingerprint(testing.tiny_llama(seed=0)) == base  # same weights, another object
    embedding = model.get_input_embeddings().weight
    seen = {base}
    with torch.no_grad():
        for row, column in [(1, 1), (383, 63), (77, 5)]:  # no stride or sample can cover all of these
            original = embedding[row, column].item()
            embedding[row, column] += 1e-6
            seen.add(weights_fingerprint(model))
            embedding[row, column] = original
        assert weights_fingerprint(model) == base
        layer_norm = model.model.layers[2].post_attention_layernorm.weight
        layer_norm.data.numpy()[7] += 1.0  # an edit that bypasses torch's version counter
        seen.add(weights_fingerprint(model))
        layer_norm.data.numpy()[7] -= 1.0
    assert len(seen) == 5 and weights_fingerprint(model) == base
    assert weights_fingerprint(model.to(torch.bfloat16)) != base


def test_weights_fingerprint_refuses_unloaded_weights():
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta device"):
        weights_fingerprint(meta)


# ---------------------------------------------------------------- issue 22 item 8: the model cache key
def test_cache_key_follows_the_conversion_code_not_the_transformers_version(tmp_path, monkeypatch):
    import transformers

    from cdlm.models import loading

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setenv("CDLM_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "transformers"
    (package / "integrations" / "gguf").mkdir(parents=True)
    (package / "modeling_gguf_pytorch_utils.py").write_text("reader v1")
    (package / "integrations" / "gguf" / "tokenizer.py").write_text("tokenizer v1")
    (package / "models").mkdir()
    (package / "models" / "llama.py").write_text("unrelated")
    monkeypatch.setattr(transformers, "__file__", str(package / "__init__.py"))

    def key():
        loading.conversion_fingerprint.cache_clear()
        return loading._gguf_cache_entry(gguf).path.name

    first = key()
    assert "tf" not in first.split("-")[-1] and transformers.__version__ not in first
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    (package / "models" / "llama.py").write_text("changed, but it does not read GGUF files")
    assert key() == first  # a fresh venv with another release and the same GGUF code: a cache hit
    (package / "integrations" / "gguf" / "tokenizer.py").write_text("tokenizer v2")
    assert key() != first
    loading.conversion_fingerprint.cache_clear()


# ---------------------------------------------------------------- issue 23: layers
LAYER = {"cli": 5, "eval_harness": 4, "alignment": 3, "decoding": 3, "models": 2}


def _cdlm_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cdlm"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("cdlm"))
    return names


@pytest.mark.parametrize("area", ["decoding", "models"])
def test_no_upward_or_sideways_imports(area):
    root = Path(__file__).resolve().parents[1] / "cdlm"
    bad = []
    for path in sorted((root / area).glob("*.py")):  # decoding/vllm/ has its own owner and rules
        for name in _cdlm_imports(path):
            target = name.split(".")[1] if "." in name else ""
            if target in LAYER and target != area and LAYER[target] >= LAYER[area]:
                bad.append(f"{path.name} imports {name}")
    assert bad == []


def test_dola_and_the_registry_form_no_cycle():
    """The registry imports the DoLa loop only to hand it to generate(); DoLa imports no registry code."""
    decoding = Path(__file__).resolve().parents[1] / "cdlm" / "decoding"
    assert "cdlm.decoding.methods" not in _cdlm_imports(decoding / "dola.py")
    assert "_depth_and_tying" not in (decoding / "methods.py").read_text()


def test_custom_generate_loops_refuse_transformers_cache_kwarg():
    """transformers 5.24 passes the KV cache as `cache`: the loops would decode with a cache the model ignores."""
    from cdlm.decoding.custom_generate import split_model_kwargs

    with pytest.raises(ValueError, match=r"support transformers < 5\.24"):
        split_model_kwargs({"attention_mask": None, "cache": object()})
    assert split_model_kwargs({"past_key_values": "kv", "use_cache": True, "token_type_ids": None}) == (None, "kv", {})
