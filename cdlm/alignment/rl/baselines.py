"""The offline step of contrastive rewards: ``k`` responses per prompt from the initial policy, scored once.

Results go to a JSON-lines cache: the first line records the generation settings, every other line
one prompt with its ``k`` responses and their rewards. The step is batched and resumable: prompts
already in the cache are skipped, and a cache made with different settings is refused rather than
silently mixed. Sampling is seeded per prompt, so a resumed run produces what an uninterrupted one
would have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cdlm.alignment.parallel import main_process_first
from cdlm.alignment.rl.rewards import RewardFunction, check_rewards
from cdlm.alignment.rl.rollout import prompt_text, render_prompts, sample_responses

CACHE_FORMAT = "cdlm-contrastive-baselines/1"


@dataclass(frozen=True)
class BaselineSettings:
    """Everything that determines the baseline responses; stored in (and checked against) the cache."""

    k: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    use_chat_template: bool = True
    model: str = ""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"the number of baseline samples k must be >= 1, got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"baseline sampling needs temperature > 0, got {self.temperature}")


class BaselineCache(Mapping[str, list[float]]):
    """Read-only view of a baseline cache: ``cache[prompt] -> k rewards``; ``responses(prompt)`` for the texts."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"baseline cache {str(self.path)!r} does not exist; generate it first")
        self.settings, self._entries = _read_cache(self.path)

    def __getitem__(self, prompt: str) -> list[float]:
        return self._entries[prompt]["rewards"]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def responses(self, prompt: str) -> list[str]:
        return self._entries[prompt]["responses"]


def _read_cache(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    entries: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] | None = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line; everything before it is intact.
                continue
            if settings is None:
                if record.get("format") != CACHE_FORMAT:
                    raise ValueError(f"{path} line {number}: not a baseline cache (expected format {CACHE_FORMAT!r})")
                settings = record["settings"]
                continue
            rewards = check_rewards(
                record["rewards"], len(record["responses"]), f"baseline cache entry {record['prompt'][:40]!r}"
            )
            entries[record["prompt"]] = {"responses": record["responses"], "rewards": rewards}
    if settings is None:
        raise ValueError(f"{path} is empty: not a baseline cache")
    return settings, entries


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line left unfinished by a killed run, so appended records start on a line of their own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def generate_baselines(
    model,
    tokenizer,
    prompts: Sequence[Any],
    reward: RewardFunction | None,
    cache_path: str | os.PathLike,
    settings: BaselineSettings = BaselineSettings(),
    *,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> BaselineCache:
    """Sample ``settings.k`` responses per prompt with ``model`` and cache them with their rewards.

    ``prompts`` are strings or dicts with a ``prompt`` key; the dicts' other keys (e.g. ``answer``)
    are passed to ``reward`` as keyword lists, like TRL passes dataset columns. ``batch_size``
    counts sequences (prompt x sample) per ``generate`` call. Returns the loaded cache.

    Under data parallelism (``torchrun``) the main process generates (or completes) the cache while the
    others wait, then every process reads it: one writer, and every process trains on the same baselines.
    """
    with main_process_first():
        return _write_baselines(
            model, tokenizer, prompts, reward, cache_path, settings, batch_size=batch_size, progress=progress
        )


def _write_baselines(
    model,
    tokenizer,
    prompts: Sequence[Any],
    reward: RewardFunction | None,
    cache_path: str | os.PathLike,
    settings: BaselineSettings = BaselineSettings(),
    *,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> BaselineCache:
    if reward is None:
        raise ValueError("the baseline step needs a reward function or reward model to score the baseline responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [row if isinstance(row, Mapping) else {"prompt": row} for row in prompts]
    if any("prompt" not in row for row in rows):
        raise ValueError("every prompt row needs a 'prompt' key")
    path = Path(cache_path)
    wanted = asdict(settings)
    done: set[str] = set()
    if path.exists() and path.stat().st_size > 0:
        existing, entries = _read_cache(path)
        if existing != wanted:
            changed = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
            raise ValueError(
                f"baseline cache {path} was made with different settings ({', '.join(changed)}); use another path"
            )
        done = set(entries)
        _drop_partial_last_line(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": CACHE_FORMAT, "settings": wanted}) + "\n", encoding="utf-8")
    todo = [(index, row) for index, row in enumerate(rows) if prompt_text(row["prompt"]) not in done]
    prompts_per_batch = max(1, batch_size // settings.k)
    with path.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), prompts_per_batch):
            chunk = todo[start : start + prompts_per_batch]
            texts, rendered, extra = [], [], {}
            for index, row in chunk:
                text = prompt_text(row["prompt"])
                texts += [text] * settings.k
                rendered += render_prompts(tokenizer, [text], settings.use_chat_template) * settings.k
                for key, value in row.items():
                    if key != "prompt":
                        extra.setdefault(key, []).extend([value] * settings.k)
            # Seeded by the first prompt's position so a resumed run samples the same responses.
            torch.manual_seed(settings.seed * 1_000_003 + chunk[0][0])
            rollout = sample_responses(
                model,
                tokenizer,
                rendered,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
            )
            scores = check_rewards(
                reward(texts, rollout.texts, **extra), len(texts), getattr(reward, "__name__", "reward")
            )
            for position, (index, row) in enumerate(chunk):
                window = slice(position * settings.k, (position + 1) * settings.k)
                record = {
                    "prompt": prompt_text(row["prompt"]),
                    "responses": rollout.texts[window],
                    "rewards": scores[window],
                }
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            if progress is not None:
                progress(f"baselines: {min(start + prompts_per_batch, len(todo))}/{len(todo)} prompts")
    return BaselineCache(path)
