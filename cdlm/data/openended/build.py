"""Rebuild ``openended.jsonl.gz``: prompts and human continuations for ``--task openended`` (see README.md).

Usage (from the repository root, with the ``models`` extra installed)::

    python cdlm/data/openended/build.py PRIDE_AND_PREJUDICE_1342.txt SHERLOCK_HOLMES_1661.txt

Two domains of human-written prose:

* ``wikihow``: WikiHow how-to text from the shipped HellaSwag validation file: the context followed by the
  gold (human, not adversarially generated) ending, for rows whose activity label is a WikiHow category.
* ``books``: two public-domain novels from Project Gutenberg; only the book text between the ``*** START
  OF`` / ``*** END OF`` markers is kept (no Project Gutenberg header, footer or licence text). Consecutive
  paragraphs are joined into passages of at least ``MIN_WORDS`` words.

Each document is split as in the contrastive decoding / contrastive search papers: the prompt is its first
``PROMPT_TOKENS`` tokens, the human continuation the next ``CONTINUATION_TOKENS[domain]`` tokens (documents
with fewer than ``MIN_CONTINUATION_TOKENS[domain]`` are skipped). The split is done once, here, with one
reference tokenizer (SmolLM2's GPT-2-style BPE, the default model's), so every evaluated model continues the
same prompts; the cut is at a token boundary, so the prompt and continuation texts are exact substrings.
``PER_DOMAIN`` documents are taken evenly spaced; every fifth is in the ``dev`` split, the rest in ``test``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
from pathlib import Path

PROMPT_TOKENS = 32
CONTINUATION_TOKENS = {"wikihow": 64, "books": 128}
MIN_CONTINUATION_TOKENS = {"wikihow": 48, "books": 128}
PER_DOMAIN = 250
MIN_WORDS = 180
REFERENCE_TOKENIZER = "smollm2-135m-instruct"
BOOKS = (
    ("austen-pride-and-prejudice", "Pride and Prejudice (Jane Austen), Project Gutenberg eBook #1342"),
    ("doyle-adventures-of-sherlock-holmes", "The Adventures of Sherlock Holmes (Arthur Conan Doyle), eBook #1661"),
)
# HellaSwag's WikiHow rows carry the article's top-level wikiHow category as their activity label.
WIKIHOW_CATEGORIES = frozenset(
    {
        "Arts and Entertainment",
        "Cars & Other Vehicles",
        "Computers and Electronics",
        "Education and Communications",
        "Family Life",
        "Finance and Business",
        "Food and Entertaining",
        "Health",
        "Hobbies and Crafts",
        "Holidays and Traditions",
        "Home and Garden",
        "Personal Care and Style",
        "Pets and Animals",
        "Philosophy and Religion",
        "Relationships",
        "Sports and Fitness",
        "Travel",
        "Work World",
        "Youth",
    }
)
_HEADING = re.compile(r"^(chapter\b|adventure\b|[ivxlc]+\.\s)", re.IGNORECASE)


def book_body(raw: str) -> str:
    text = raw.replace("\r\n", "\n")
    start = text.index("\n", text.index("*** START OF")) + 1
    return text[start : text.index("*** END OF")]


def paragraphs(body: str) -> list[str]:
    result = []
    for block in re.split(r"\n\s*\n", body):
        line = " ".join(part.strip() for part in block.splitlines() if part.strip())
        if len(line.split()) < 4 or _HEADING.match(line) or line.isupper() or line.startswith("Produced by"):
            continue
        result.append(line.replace("_", ""))
    return result


def passages(paras: list[str]) -> list[str]:
    out, current = [], []
    for paragraph in paras:
        current.append(paragraph)
        if sum(len(p.split()) for p in current) >= MIN_WORDS:
            out.append("\n\n".join(current))
            current = []
    return out


def split_document(tokenizer, text: str, domain: str) -> tuple[str, str, list[int]] | None:
    """(prompt, human continuation, end offset in the continuation of each of its tokens), cut at token
    boundaries, or None if the document is too short. The offsets let a run with a smaller token budget
    compare against the human text cut at the same number of tokens."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < PROMPT_TOKENS + MIN_CONTINUATION_TOKENS[domain]:
        return None
    cut = offsets[PROMPT_TOKENS - 1][1]
    ends = [end - cut for _, end in offsets[PROMPT_TOKENS : PROMPT_TOKENS + CONTINUATION_TOKENS[domain]]]
    return text[:cut], text[cut : cut + ends[-1]], ends


def documents(book_paths: list[str]) -> dict[str, list[tuple[str, str]]]:
    """domain -> [(source, text)] in corpus order."""
    hellaswag = Path(__file__).parents[1] / "hellaswag" / "hellaswag_val.jsonl.gz"
    wikihow = []
    with gzip.open(hellaswag, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            row = json.loads(line)
            if row["activity_label"] in WIKIHOW_CATEGORIES:
                text = row["ctx"].strip() + " " + row["endings"][int(row["label"])].strip()
                wikihow.append((f"HellaSwag validation row {number} ({row['activity_label']})", text))
    books = []
    for (_, title), path in zip(BOOKS, book_paths, strict=True):
        books += [(title, text) for text in passages(paragraphs(book_body(Path(path).read_text(encoding="utf-8"))))]
    return {"wikihow": wikihow, "books": books}


def main(book_paths: list[str]) -> None:
    from cdlm.models import load_model

    tokenizer = load_model(REFERENCE_TOKENIZER).tokenizer
    rows = []
    for domain, docs in documents(book_paths).items():
        usable = [(source, pair) for source, text in docs if (pair := split_document(tokenizer, text, domain))]
        step = len(usable) / PER_DOMAIN
        for i in range(PER_DOMAIN):
            source, (prompt, human, ends) = usable[int(i * step)]
            rows.append(
                {
                    "id": f"{domain}-{i:03d}",
                    "domain": domain,
                    "split": "dev" if i % 5 == 0 else "test",
                    "source": source,
                    "prompt": prompt,
                    "human": human,
                    "human_token_ends": ends,
                }
            )
        print(f"{domain}: {len(usable)} of {len(docs)} documents long enough, kept {PER_DOMAIN}")
    target = Path(__file__).with_name("openended.jsonl.gz")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
        for row in rows:
            handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    target.write_bytes(buffer.getvalue())
    print(f"wrote {len(rows)} rows to {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
