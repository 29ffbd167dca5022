"""One entry point that turns a model reference into a ready causal LM and its tokenizer.

A reference may be a registered short name (``smollm2-135m-instruct``), a local GGUF file, a local
folder (``save_pretrained`` layout, or holding a GGUF named by ``gguf_file``), or a hub id. GGUF
sources go through the dequantised-model cache so only the first load pays for dequantisation.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cdlm.models.cache import CacheEntry, cache_root, file_sha256, get_or_build
from cdlm.models.registry import DEFAULT_MODEL, REGISTRY, UnknownModelError, get_registered

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, plus how it was obtained (for logs and results files)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: str
    source: str
    load_seconds: float
    cache_hit: bool | None = None  # None: the cache was not involved
    details: dict = field(default_factory=dict)

    def __iter__(self):  # lets callers write ``model, tokenizer = load_model(...)``
        return iter((self.model, self.tokenizer))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: float32 on CPU (bf16 matmuls are slow on most CPUs), bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)} or 'auto'") from None


def prepare_tokenizer_for_generation(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding and a pad token: batched decoder-only generation needs both to be correct."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Bump when what is written into a cache entry changes (so older entries are not reused).
CACHE_LAYOUT = 2


def _gguf_special_token_flags(gguf_path: Path) -> dict[str, bool]:
    """The GGUF's own ``add_bos_token``/``add_eos_token`` flags, where it records them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    flags = {}
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            flags[flag] = bool(field.parts[field.data[0]][0])
    return flags


# transformers' code that turns a GGUF into weights, config and tokenizer (relative to its package).
_CONVERSION_SOURCES = (
    "modeling_gguf_pytorch_utils.py",
    "integrations/ggml.py",
    "integrations/gguf/*.py",
    "conversion_mapping.py",
)


@functools.lru_cache(maxsize=1)
def conversion_fingerprint() -> str:
    """What decides a cache entry's contents besides the GGUF: transformers' GGUF-reading source files, the
    ``gguf`` package version and ``CACHE_LAYOUT`` (cdlm's own conversion steps).

    Keyed on these rather than the transformers version, a fresh environment with another transformers
    release whose GGUF code is unchanged reuses the entry. What is *read back* is a ``save_pretrained``
    folder, which later transformers releases load by their own compatibility promise.
    """
    from importlib.metadata import PackageNotFoundError, version

    root = Path(transformers.__file__).parent
    digest = hashlib.sha256()
    for pattern in _CONVERSION_SOURCES:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        gguf_version = version("gguf")
    except PackageNotFoundError:
        gguf_version = "none"
    digest.update(f"gguf={gguf_version};layout={CACHE_LAYOUT}".encode())
    return digest.hexdigest()[:16]


def _gguf_cache_entry(gguf_path: Path) -> CacheEntry:
    # The key covers what the file is (its content hash, not its path, so another checkout or venv with the
    # same file hits) and the conversion code (GGUF tokenizer conversion, BOS handling in particular, has
    # changed between transformers releases), not the transformers version as a whole.
    stem = gguf_path.name.removesuffix(".gguf")
    key = f"{stem}-{file_sha256(gguf_path)[:16]}-conv{conversion_fingerprint()}"
    return CacheEntry(cache_root() / "models" / key)


def _dequantise_into(gguf_path: Path, target: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers 5.x's GGUF tokenizer conversion ignores the file's add_bos_token flag (Gemma-3's
    # GGUF says True; without its BOS the model degenerates into repeating itself). Honour the file.
    for flag, value in _gguf_special_token_flags(gguf_path).items():
        if getattr(tokenizer, flag, value) != value:
            setattr(tokenizer, flag, value)
    # The weights are plain float32 tensors now; drop the GGUF marker so save_pretrained accepts them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def cached_gguf_folder(gguf_path: str | Path) -> tuple[Path, bool]:
    """The cache folder holding ``gguf_path`` dequantised (built on first use), and whether it was a hit."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    entry = _gguf_cache_entry(gguf_path)
    source = {"gguf": str(gguf_path), "transformers": transformers.__version__, "conversion": conversion_fingerprint()}
    return get_or_build(entry, lambda tmp: _dequantise_into(gguf_path, tmp), source)


def _describe_unknown(reference: str) -> str:
    known = ", ".join(sorted(REGISTRY))
    return (
        f"unknown model {reference!r}: not a registered name ({known}), not a local file or folder, "
        "and not loadable as a hub id (the hub is unreachable or offline)"
    )


def resolve_reference(reference: str, gguf_file: str | None = None) -> tuple[str, Path | None, str]:
    """Return (kind, path, description) where kind is 'gguf', 'folder' or 'hub'."""
    registered = get_registered(reference)
    if registered is not None:
        path = registered.gguf_path(cache_root() / "gguf")
        return "gguf", path, f"{registered.name} ({path})"
    candidate = Path(reference).expanduser()
    if candidate.is_file():
        if candidate.suffix != ".gguf":
            raise ValueError(f"{reference!r} is a file but not a .gguf; pass a model folder or a GGUF file")
        return "gguf", candidate, str(candidate)
    if candidate.is_dir():
        if gguf_file:
            gguf_path = candidate / gguf_file
            if not gguf_path.is_file():
                raise FileNotFoundError(f"{gguf_file!r} not found in {candidate}")
            return "gguf", gguf_path, str(gguf_path)
        return "folder", candidate, str(candidate)
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise UnknownModelError(_describe_unknown(reference))
    return "hub", None, reference


def load_model(
    reference: str = DEFAULT_MODEL,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    use_cache: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for batched generation (eval mode, left padding).

    Args:
        reference: registered name, GGUF file, local folder or hub id.
        gguf_file: the GGUF file inside a folder or hub repository, as in ``from_pretrained``.
        dtype: "auto", a name such as "bfloat16", or a torch dtype.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        use_cache: read/write the dequantised-GGUF cache (off: dequantise every time).
    """
    start = time.perf_counter()
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    kind, path, description = resolve_reference(reference, gguf_file)
    cache_hit: bool | None = None
    load_kwargs: dict = {"dtype": target_dtype}
    if kind == "gguf" and use_cache:
        assert path is not None  # resolve_reference gives every GGUF reference a path
        folder, cache_hit = cached_gguf_folder(path)
        model_source, tok_source = str(folder), str(folder)
    elif kind == "gguf":
        assert path is not None
        model_source, tok_source = str(path.parent), str(path.parent)
        load_kwargs["gguf_file"] = path.name
    elif kind == "folder":
        model_source = tok_source = str(path)
    else:
        model_source = tok_source = reference
        if gguf_file:
            load_kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(model_source, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            tok_source, **({"gguf_file": load_kwargs["gguf_file"]} if "gguf_file" in load_kwargs else {})
        )
    except OSError as error:
        if kind == "hub":
            raise UnknownModelError(f"{_describe_unknown(reference)}: {error}") from error
        raise
    model.to(target_device)  # type: ignore[arg-type]
    model.eval()
    prepare_tokenizer_for_generation(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        reference=reference,
        source=description,
        load_seconds=time.perf_counter() - start,
        cache_hit=cache_hit,
        details={"kind": kind, "dtype": str(target_dtype), "device": str(target_device)},
    )


def load_amateur(spec: str, expert: LoadedModel, **load_kwargs):
    """An amateur for ``expert`` from a spec: ``early-exit:N`` or any model reference.

    A separate amateur is put on the expert's device unless ``device`` is given, and its tokenizer
    is checked against the expert's.
    """
    from cdlm.models.amateur import EarlyExitAmateur, make_separate_amateur, parse_early_exit

    layers = parse_early_exit(spec)
    if layers is not None:
        return EarlyExitAmateur(expert.model, layers)
    load_kwargs.setdefault("device", expert.model.device)
    amateur = load_model(spec, **load_kwargs)
    return make_separate_amateur(
        expert.model,
        expert.tokenizer,
        amateur.model,
        amateur.tokenizer,
        expert_name=expert.reference,
        amateur_name=spec,
    )
