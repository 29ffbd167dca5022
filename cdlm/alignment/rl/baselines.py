"""The offline step of contrastive rewards: ``k`` responses per prompt from the initial policy, scored once.

Results go to a JSON-lines cache: the first line records the generation settings (including which
reward scored them and which weights sampled them), every other line one prompt with the fields its
reward read (e.g. ``answer``), its ``k`` responses and their rewards. The step is batched, lazy (PPO
samples a prompt's baselines when an iteration first uses it) and resumable: prompts already in the
cache are skipped, and a cache made with different settings, another reward or other answers is
refused rather than silently mixed. Every sample draws from its own seeded RNG, so a resumed run
produces what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from cdlm.alignment.parallel import main_process_first
from cdlm.alignment.rl.rewards import RewardFunction, check_rewards, reward_identity
from cdlm.alignment.rl.rollout import prompt_text, render_prompts, sample_responses
from cdlm.textio import MalformedRowError, dumps_line, read_lines

CACHE_FORMAT = "cdlm-contrastive-baselines/2"


@dataclass(frozen=True)
class BaselineSettings:
    """Everything that determines the baseline responses and their rewards; stored in (and checked against) the cache.

    ``reward`` identifies the reward function (default: :func:`~cdlm.alignment.rl.rewards.reward_identity`) and
    ``weights`` the sampling policy's weights, so a cache scored by another reward or sampled from other
    weights is refused rather than reused.
    """

    k: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    use_chat_template: bool = True
    model: str = ""
    reward: str = ""
    weights: str = ""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"the number of baseline samples k must be >= 1, got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
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

    def columns(self, prompt: str) -> dict[str, Any]:
        """The row's other fields (e.g. ``answer``) the rewards were computed with."""
        return self._entries[prompt]["columns"]


def _read_cache(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    entries: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] | None = None
    lines = read_lines(path, "baseline cache")
    for position, (number, line) in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if position == len(lines) - 1:
                continue  # a run killed mid-write leaves a partial last line; everything before it is intact
            raise MalformedRowError(f"{path}:{number} is not valid JSON: not a baseline cache written by cdlm")
        if settings is None:
            found = record.get("format") if isinstance(record, dict) else None
            if found != CACHE_FORMAT:
                older = isinstance(found, str) and found.startswith(CACHE_FORMAT.rpartition("/")[0])
                raise ValueError(
                    f"{path}:{number}: "
                    + (
                        f"a baseline cache of an older format ({found}: it records no reward or weights); "
                        "delete it or use another path"
                        if older
                        else f"not a baseline cache (expected format {CACHE_FORMAT!r})"
                    )
                )
            settings = record["settings"]
            continue
        rewards = check_rewards(
            record["rewards"], len(record["responses"]), f"baseline cache entry {record['prompt'][:40]!r}"
        )
        entries[record["prompt"]] = {
            "responses": record["responses"],
            "rewards": rewards,
            "columns": record.get("columns", {}),
        }
    if settings is None:
        raise ValueError(f"{path} is empty: not a baseline cache")
    return settings, entries


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line left unfinished by a killed run, so appended records start on a line of their own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _sample_seed(seed: int, prompt: str, sample: int) -> int:
    """A prompt's ``sample``-th baseline draws from its own RNG: the same whichever prompts share its batch."""
    digest = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12], 16)
    return (seed * 1_000_003 + digest) * 64 + sample


class LazyBaselines(Mapping[str, list[float]]):
    """Baselines sampled on first need: :meth:`ensure` samples (and caches) only the prompts it is given.

    PPO calls :meth:`ensure` with each iteration's prompts and the *initial* policy (the adapter-disabled
    reference), so a short run samples baselines for the prompts it trains on, not for the whole set.
    Every prompt's samples come from their own seeded RNGs, so the cache holds the same responses
    whichever iteration (or resumed run) first needed them.
    """

    def __init__(
        self,
        tokenizer,
        reward: RewardFunction,
        cache_path: str | os.PathLike,
        settings: BaselineSettings,
        *,
        batch_size: int = 8,
        progress: Callable[[str], None] | None = None,
    ):
        if reward is None:
            raise ValueError(
                "the baseline step needs a reward function or reward model to score the baseline responses"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not settings.reward:  # always record what scores the baselines, so another reward is refused
            settings = replace(settings, reward=reward_identity(reward))
        self.tokenizer, self.reward, self.settings = tokenizer, reward, settings
        self.path, self.batch_size, self.progress = Path(cache_path), batch_size, progress
        self.sampled = 0  # prompts sampled by this object (not read from the cache)
        self._cache: BaselineCache | None = None
        with main_process_first():
            self._open()
            self._cache = BaselineCache(self.path)

    def _open(self) -> None:
        wanted = asdict(self.settings)
        if self.path.exists() and self.path.stat().st_size > 0:
            existing, _ = _read_cache(self.path)
            if existing != wanted:
                changed = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
                raise ValueError(
                    f"baseline cache {self.path} was made with different settings ({', '.join(changed)}); "
                    "delete it or use another path"
                )
            _drop_partial_last_line(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"format": CACHE_FORMAT, "settings": wanted}) + "\n", encoding="utf-8")

    def __getitem__(self, prompt: str) -> list[float]:
        assert self._cache is not None
        return self._cache[prompt]

    def __iter__(self) -> Iterator[str]:
        assert self._cache is not None
        return iter(self._cache)

    def __len__(self) -> int:
        assert self._cache is not None
        return len(self._cache)

    @property
    def cache(self) -> BaselineCache:
        assert self._cache is not None
        return self._cache

    def ensure(self, prompts: Sequence[Any], model) -> None:
        """Sample and score the baselines of the ``prompts`` (strings or rows) not cached yet, with ``model``.

        A cached prompt whose other fields (e.g. ``answer``) differ from the given row's is refused: its
        rewards were computed against other references.
        """
        rows = [row if isinstance(row, Mapping) else {"prompt": row} for row in prompts]
        if any("prompt" not in row for row in rows):
            raise ValueError("every prompt row needs a 'prompt' key")
        todo: dict[str, dict[str, Any]] = {}
        for row in rows:
            text = prompt_text(row["prompt"])
            columns = {key: value for key, value in row.items() if key != "prompt"}
            if text in self.cache:
                known = self.cache.columns(text)
            elif text in todo:
                known = todo[text]
            else:
                todo[text] = columns
                continue
            if _canonical(known) != _canonical(columns):
                raise ValueError(
                    f"baseline cache {self.path} scored prompt {text[:50]!r} with {_canonical(known)}, but the "
                    f"prompt now comes with {_canonical(columns)}: delete the cache or use another path"
                )
        if not todo:
            return
        with main_process_first():
            # Another process may have written them meanwhile (it went first): read before sampling.
            self._cache = BaselineCache(self.path)
            missing = [(text, columns) for text, columns in todo.items() if text not in self._cache]
            if missing:
                self._sample(missing, model)
                self._cache = BaselineCache(self.path)

    def _sample(self, todo: list[tuple[str, dict[str, Any]]], model) -> None:
        settings = self.settings
        prompts_per_batch = max(1, self.batch_size // settings.k)
        _drop_partial_last_line(self.path)
        with self.path.open("a", encoding="utf-8") as handle:
            for start in range(0, len(todo), prompts_per_batch):
                chunk = todo[start : start + prompts_per_batch]
                texts, rendered, seeds, extra = [], [], [], {}
                for text, columns in chunk:
                    texts += [text] * settings.k
                    rendered += render_prompts(self.tokenizer, [text], settings.use_chat_template) * settings.k
                    seeds += [_sample_seed(settings.seed, text, sample) for sample in range(settings.k)]
                    for key, value in columns.items():
                        extra.setdefault(key, []).extend([value] * settings.k)
                rollout = sample_responses(
                    model,
                    self.tokenizer,
                    rendered,
                    max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    top_k=settings.top_k,
                    top_p=settings.top_p,
                    row_seeds=seeds,
                )
                scores = check_rewards(
                    self.reward(texts, rollout.texts, **extra), len(texts), getattr(self.reward, "__name__", "reward")
                )
                for position, (text, columns) in enumerate(chunk):
                    window = slice(position * settings.k, (position + 1) * settings.k)
                    record = {
                        "prompt": text,
                        "columns": columns,
                        "responses": rollout.texts[window],
                        "rewards": scores[window],
                    }
                    handle.write(dumps_line(record) + "\n")
                handle.flush()
                self.sampled += len(chunk)
                if self.progress is not None:
                    self.progress(f"baselines: {min(start + prompts_per_batch, len(todo))}/{len(todo)} prompts")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


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
    """Sample ``settings.k`` responses per prompt with ``model`` and cache them with their rewards (all prompts now).

    ``prompts`` are strings or dicts with a ``prompt`` key; the dicts' other keys (e.g. ``answer``)
    are passed to ``reward`` as keyword lists, like TRL passes dataset columns. ``batch_size``
    counts sequences (prompt x sample) per ``generate`` call. Returns the loaded cache. For baselines
    sampled only when a prompt is first used, see :class:`LazyBaselines`.

    Under data parallelism (``torchrun``) the main process generates (or completes) the cache while the
    others wait, then every process reads it: one writer, and every process trains on the same baselines.
    """
    lazy = LazyBaselines(tokenizer, reward, cache_path, settings, batch_size=batch_size, progress=progress)
    lazy.ensure(prompts, model)
    return lazy.cache
