"""``--task openended``: the open-ended generation benchmark of the contrastive decoding / search papers.

Li et al. 2022 (CD, arXiv 2210.15097) and Su & Collier 2022 (contrastive search, arXiv 2210.14140)
continue the first 32 tokens of human-written documents and compare the continuations with the
documents' own (human) continuations on repetition (rep-2/3/4), diversity, MAUVE and coherence. This
task does the same on the packaged prompts (``cdlm/data/openended``: wikiHow how-to text and two
public-domain novels; 50 dev + 200 test prompts per domain) with every registered decoding method.

Task settings (``EvalConfig.extra``): ``domain`` (``wikihow``, ``books`` or ``all``, default ``all``),
``split`` (``dev`` / ``test``, default ``test``), ``judge`` (the local model whose hidden states give
MAUVE features and coherence embeddings and which scores perplexity; default ``gemma3-270m``; use a model
other than the evaluated one, e.g. ``smollm2-135m-instruct`` to judge Gemma's text; ``none`` skips the
model-based metrics), ``judge_dtype`` (``float32`` or ``bfloat16``: about 3x faster on CPUs with
AVX512-BF16) and ``mauve_seed``. New tokens are capped per domain at the human continuation's length (64 wikiHow,
128 books), so model and human texts have comparable lengths.

Per-example records hold the prompt, the human and model continuations and per-text statistics; the
corpus-level metrics (pooled rep-n, diversity, MAUVE per domain, coherence, perplexity, length, and the
same for the human continuations under ``human/...``) are computed in ``aggregate``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Sequence

from cdlm import progress
from cdlm.eval_harness.data import load_rows, take, validate_rows
from cdlm.eval_harness.task import (
    GENERATE_UNTIL,
    GenerationRequest,
    GenerationResponse,
    Task,
    TaskData,
    fingerprint_rows,
)
from cdlm.eval_harness.text_quality import (
    MAUVE_MIN_TEXTS,
    REPETITION_ORDERS,
    check_mauve_available,
    ngram_counts,
    repetition_stats,
    words,
)

DOMAINS = ("wikihow", "books")
SPLITS = ("dev", "test")
# New-token cap per domain: the length (reference tokenizer) of the packaged human continuations.
MAX_NEW_TOKENS = {"wikihow": 64, "books": 128}
DEFAULT_JUDGE = "gemma3-270m"
FIELDS = {"id": str, "domain": str, "split": str, "prompt": str, "human": str}
_SETTINGS = ("domain", "split", "judge", "judge_dtype", "mauve_seed")
JUDGE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class OpenEndedSettings:
    domain: str = "all"
    split: str = "test"
    judge: str = DEFAULT_JUDGE
    judge_dtype: str = "float32"
    mauve_seed: int = 25

    @classmethod
    def from_extra(cls, extra: dict) -> "OpenEndedSettings":
        unknown = sorted(set(extra) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"openended has no setting(s) {unknown}; known: {', '.join(_SETTINGS)}")
        if "mauve_seed" in extra:  # command-line options arrive as strings
            try:
                extra = {**extra, "mauve_seed": int(extra["mauve_seed"])}
            except ValueError:
                raise ValueError(f"openended mauve_seed must be an integer, got {extra['mauve_seed']!r}") from None
        settings = cls(**extra)
        if settings.domain not in (*DOMAINS, "all"):
            raise ValueError(f"openended domain must be one of {', '.join(DOMAINS)} or all, got {settings.domain!r}")
        if settings.judge_dtype not in JUDGE_DTYPES:
            raise ValueError(
                f"openended judge_dtype must be one of {', '.join(JUDGE_DTYPES)}, got {settings.judge_dtype!r}"
            )
        if settings.split not in SPLITS:
            raise ValueError(f"openended split must be one of {', '.join(SPLITS)}, got {settings.split!r}")
        if not 0 <= settings.mauve_seed < 2**32:  # numpy's seed range (MAUVE's k-means)
            raise ValueError(f"openended mauve_seed must be in 0..{2**32 - 1}, got {settings.mauve_seed}")
        return settings

    @property
    def judged(self) -> bool:
        return self.judge != "none"


def check_judge(reference: str) -> None:
    """Refuse a judge that cannot be loaded now, not after every continuation is generated (it is first
    needed by ``aggregate``): a bad path, or offline, a hub id that is not in the local cache."""
    import os

    from cdlm.models.loading import resolve_reference

    kind, _, _ = resolve_reference(reference)
    if kind != "hub" or os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(reference, "config.json"), str):
        raise ValueError(
            f"openended judge {reference!r} is not a registered model, a local folder or GGUF file, nor a hub model "
            "in the local cache (the hub is offline); give another judge= or judge=none"
        )


def select(rows: Sequence[dict], settings: OpenEndedSettings) -> list[dict]:
    """The rows of the chosen split and domain(s), domains interleaved so that ``--limit`` keeps both."""
    by_domain = {
        domain: [r for r in rows if r["domain"] == domain and r["split"] == settings.split]
        for domain in DOMAINS
        if settings.domain in (domain, "all")
    }
    selected = []
    for position in range(max(map(len, by_domain.values()), default=0)):
        selected += [docs[position] for docs in by_domain.values() if position < len(docs)]
    return selected


def human_prefix(doc: dict, max_tokens: int) -> str:
    """The human continuation cut at ``max_tokens`` reference tokens (``human_token_ends``; whole if absent),
    so that model and human texts of a run have the same token budget."""
    ends = doc.get("human_token_ends")
    if not ends or max_tokens >= len(ends):
        return doc["human"]
    return doc["human"][: ends[max_tokens - 1]]


def text_metrics(continuations: Sequence[str], num_tokens: Sequence[int] | None = None) -> dict[str, float]:
    """Model-free corpus metrics of a set of continuations: pooled rep-n, diversity and length."""
    token_lists = [words(text) for text in continuations]
    result = repetition_stats(token_lists)
    result["num_words"] = sum(map(len, token_lists)) / len(token_lists) if token_lists else math.nan
    if num_tokens is not None:
        result["num_tokens"] = sum(num_tokens) / len(num_tokens) if num_tokens else math.nan
    return result


class Judge:
    """A local model that featurises and scores text for MAUVE, coherence and perplexity (loaded once)."""

    _loaded: dict[tuple[str, str], object] = {}
    # per judge model: results shared by every run scored in this process (e.g. the human rows' pass)
    _results: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()

    def __init__(self, reference: str, *, batch_size: int = 16, dtype: str = "float32"):
        from cdlm.eval_harness.text_quality import HiddenStateFeatures
        from cdlm.models import load_model

        if (reference, dtype) not in Judge._loaded:
            Judge._loaded[reference, dtype] = load_model(reference, device="cpu", dtype=dtype)
        loaded = Judge._loaded[reference, dtype]
        self.reference = reference
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.features = HiddenStateFeatures(self.model, self.tokenizer, batch_size=batch_size)
        self.batch_size = batch_size
        self._cache = Judge._results.setdefault(self.model, {})

    def _cached(self, kind: str, texts: Sequence[str], compute):
        key = (kind, tuple(texts))
        if key not in self._cache:
            self._cache[key] = compute(list(texts))
        return self._cache[key]

    def documents(self, prompts: Sequence[str], continuations: Sequence[str], *, with_nll: bool):
        """MAUVE features and continuation NLL of prompt + continuation (one forward; see ``score_documents``).
        A pass with NLL also answers later requests without it."""
        from cdlm.eval_harness.text_quality import score_documents

        texts = (tuple(prompts), tuple(continuations))
        for key in (("documents", True, texts), ("documents", with_nll, texts)):
            if key in self._cache:
                return self._cache[key]
        scores = score_documents(
            self.model, self.tokenizer, prompts, continuations, batch_size=self.batch_size, with_nll=with_nll
        )
        self._cache[("documents", with_nll, texts)] = scores
        return scores

    def embeddings(self, texts: Sequence[str]):
        return self._cached("mean", texts, self.features.mean_pooled)


def judged_metrics(
    judge: Judge,
    prompts,
    continuations,
    humans,
    *,
    mauve_seed: int = 25,
    with_perplexity: bool = True,
    with_mauve: bool = True,
    with_coherence: bool = True,
) -> dict[str, float]:
    """MAUVE (vs the human continuations), coherence and perplexity of one domain's continuations.

    Empty continuations (EOS as the first token) get no coherence (there is no text to embed) and add no
    tokens to the perplexity; MAUVE still sees them, as the prompt alone.
    """
    from cdlm.eval_harness.text_quality import coherence, mauve_score, perplexity

    result = {}
    if with_mauve:
        model_features = judge.documents(prompts, continuations, with_nll=with_perplexity).features
        human_features = judge.documents(prompts, humans, with_nll=with_perplexity).features
        result["mauve"] = mauve_score(human_features.numpy(), model_features.numpy(), seed=mauve_seed)
    if with_coherence:
        nonempty = [i for i, text in enumerate(continuations) if text.strip()]
        values = []
        if nonempty:
            prompt_embeddings = judge.embeddings([prompts[i] for i in nonempty])
            continuation_embeddings = judge.embeddings([continuations[i] for i in nonempty])
            values = coherence(prompt_embeddings, continuation_embeddings)
        result["coherence"] = sum(values) / len(values) if values else math.nan
    if with_perplexity:  # the costly part with a large-vocabulary judge (Gemma 3: 262k-token softmax)
        scored = judge.documents(prompts, continuations, with_nll=True).nll
        result["perplexity"] = perplexity([s for s, _ in scored], [n for _, n in scored])
    return result


def corpus_metrics(
    records: Sequence[dict],
    judge: str | None = DEFAULT_JUDGE,
    *,
    mauve_seed: int = 25,
    with_perplexity: bool = True,
    with_coherence: bool = True,
    judge_dtype: str = "float32",
) -> dict:
    """Every corpus-level metric of a run's records, per domain (``books/mauve``) and averaged over domains.

    Keys without a prefix are the model's; ``human/...`` are the human continuations' (MAUVE is only
    defined against them, so it has no human entry). Overall values are means over the domains present.
    """
    results: dict[str, float] = {}
    present = [d for d in DOMAINS if any(r["domain"] == d for r in records)]
    per_domain = {}
    for domain in present:
        rows = [r for r in records if r["domain"] == domain]
        prompts = [r["prompt"] for r in rows]
        model = text_metrics([r["continuation"] for r in rows], [r["num_tokens"] for r in rows])
        model["stopped_early"] = sum(r["stopped_early"] for r in rows) / len(rows)
        model["empty"] = sum(not r["continuation"].strip() for r in rows) / len(rows)
        human = text_metrics([r["human"] for r in rows])
        if judge and judge != "none":
            progress.message(f"openended: scoring {len(rows)} {domain} continuations with the judge {judge}")
            scorer = Judge(judge, dtype=judge_dtype)
            humans = [r["human"] for r in rows]
            passes = {"with_perplexity": with_perplexity, "with_coherence": with_coherence}
            continuations = [r["continuation"] for r in rows]
            model.update(judged_metrics(scorer, prompts, continuations, humans, mauve_seed=mauve_seed, **passes))
            human.update(judged_metrics(scorer, prompts, humans, humans, with_mauve=False, **passes))
        per_domain[domain] = (model, human)
        results.update({f"{domain}/{k}": v for k, v in model.items()})
        results.update({f"{domain}/human/{k}": v for k, v in human.items()})
    for index, prefix in ((0, ""), (1, "human/")):
        names = per_domain[present[0]][index] if present else {}
        for name in names:
            values = [per_domain[d][index][name] for d in present]
            results[prefix + name] = sum(values) / len(values)
    results.update({f"{d}/n": sum(r["domain"] == d for r in records) for d in present})
    results["judge"] = judge or "none"
    return results


class OpenEndedTask(Task):
    """Continue human-written prompts; score repetition, diversity, MAUVE, coherence, perplexity, length."""

    name = "openended"
    version = "2"
    output_type = GENERATE_UNTIL
    metrics = ("num_tokens", "num_words", "stopped_early")
    primary_metric = "mauve"
    options = _SETTINGS

    def __init__(self):
        self.settings = OpenEndedSettings()

    def load(self, config) -> TaskData:
        self.settings = OpenEndedSettings.from_extra(dict(config.extra or {}))
        if self.settings.judged:
            check_mauve_available()
            check_judge(self.settings.judge)
        rows, source = load_rows(config.data, "openended")
        validate_rows(rows, FIELDS, source)
        unknown = sorted({r["domain"] for r in rows} - set(DOMAINS))
        if unknown:
            raise ValueError(f"{source}: unknown domain(s) {unknown}; known: {', '.join(DOMAINS)}")
        docs = select(rows, self.settings)
        if not docs:
            raise ValueError(f"{source} has no {self.settings.split} rows for domain {self.settings.domain!r}")
        return TaskData(
            take(docs, config.limit),
            f"{source} ({self.settings.domain}, {self.settings.split})",
            None,
            {"data": fingerprint_rows(rows)},
        )

    def build_requests(self, data: TaskData, config) -> list[GenerationRequest]:
        if self.settings.judged:  # MAUVE compares the model's and the human texts of each domain
            counts = {d: sum(doc["domain"] == d for doc in data.docs) for d in DOMAINS}
            short = {d: n for d, n in counts.items() if 0 < n < MAUVE_MIN_TEXTS}
            if short:
                shown = ", ".join(f"{d}: {n}" for d, n in short.items())
                raise ValueError(
                    f"openended MAUVE needs at least {MAUVE_MIN_TEXTS} examples per domain, this run has {shown}; "
                    f"raise --limit (both domains are interleaved) or pass --task-option judge=none"
                )
        return [
            GenerationRequest(doc["prompt"], max_new_tokens=min(config.max_new_tokens, MAX_NEW_TOKENS[doc["domain"]]))
            for doc in data.docs
        ]

    def process_result(self, doc: dict, request: GenerationRequest, response: GenerationResponse) -> dict:
        tokens = words(response.text)
        return {
            "id": doc["id"],
            "domain": doc["domain"],
            "prompt": doc["prompt"],
            "human": human_prefix(doc, request.max_new_tokens),
            "continuation": response.text,
            "num_tokens": response.num_tokens,
            "num_words": len(tokens),
            "stopped_early": float(response.num_tokens < request.max_new_tokens),
            **{f"distinct-{n}": ngram_counts(tokens, n)[0] for n in REPETITION_ORDERS},
        }

    def aggregate(self, records: Sequence[dict]) -> dict:
        return corpus_metrics(
            records, self.settings.judge, mauve_seed=self.settings.mauve_seed, judge_dtype=self.settings.judge_dtype
        )
