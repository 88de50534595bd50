"""Row checks: a row that cannot be decoded becomes an error record with its reason; the job goes on.

A bad row is one that is unparsable, has no usable id, has a source that is missing, not text or empty, a
reference that is not text, or a prompt too long for the target's context with max_new_tokens added.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from jobs.batch.corpus import Corpus

TOKENIZE_CHUNK = 512


class Renderer(Protocol):
    def __call__(self, source: str, src_lang: str | None, tgt_lang: str | None) -> str: ...


class Counter(Protocol):
    def __call__(self, prompts: list[str]) -> list[int]: ...


@dataclass(frozen=True)
class GoodRow:
    row: int  # 0-based row in the corpus
    id: str
    source: str
    reference: str | None
    prompt: str
    prompt_tokens: int


@dataclass(frozen=True)
class BadRow:
    row: int
    id: str | None
    reason: str

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def check_rows(corpus: Corpus, render: Renderer, count_tokens: Counter, token_budget: int,
               langs: tuple[str | None, str | None] = (None, None)) -> tuple[list[GoodRow], list[BadRow]]:
    """Split the corpus into rows to decode and refused rows.

    render: source, src_lang, tgt_lang -> prompt; count_tokens: prompts -> token counts;
    token_budget: the most prompt tokens a row may have (context minus max_new_tokens);
    langs: the spec's (src_lang, tgt_lang), which win over the corpus's per-row fields.
    """
    bad: list[BadRow] = []
    texts: list[tuple[int, str, str, str | None]] = []  # row, id, source, reference
    seen: dict[str, int] = {}
    for row in range(corpus.size):
        doc_id, reason = _id_of(corpus, row)
        reason = corpus.broken.get(row) or reason or _duplicate(seen, doc_id, row) or _text_problem(corpus, row)
        if reason:
            bad.append(BadRow(row, doc_id, reason))
            continue
        reference = corpus.references[row] if corpus.references else None
        texts.append((row, doc_id, corpus.sources[row], reference or None))
    prompts = [render(source, *_langs(corpus, row, langs)) for row, _, source, _ in texts]
    counts = [n for i in range(0, len(prompts), TOKENIZE_CHUNK) for n in count_tokens(prompts[i:i + TOKENIZE_CHUNK])]
    good: list[GoodRow] = []
    for (row, doc_id, source, reference), prompt, n in zip(texts, prompts, counts):
        if n > token_budget:
            bad.append(BadRow(row, doc_id, f"too long for the model: prompt of {n} tokens > {token_budget} "
                                           "(the context minus max_new_tokens)"))
        else:
            good.append(GoodRow(row, doc_id, source, reference, prompt, n))
    return good, sorted(bad, key=lambda b: b.row)


def _id_of(corpus: Corpus, row: int) -> tuple[str, str | None]:
    if corpus.ids is None:
        return f"row-{row}", None
    value = corpus.ids[row]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return f"row-{row}", f"id is not text or an integer: {value!r}"
    return str(value), None


def _duplicate(seen: dict[str, int], doc_id: str, row: int) -> str | None:
    if doc_id in seen:
        return f"duplicate id {doc_id!r} (first at row {seen[doc_id]})"
    seen[doc_id] = row
    return None


def _text_problem(corpus: Corpus, row: int) -> str | None:
    field = corpus.spec.source_field
    source = corpus.sources[row]
    if source is None:
        return f"missing {field!r}"
    if not isinstance(source, str):
        return f"{field!r} is not text: {type(source).__name__} {str(source)[:40]!r}"
    if not source.strip():
        return f"empty {field!r}"
    reference = corpus.references[row] if corpus.references else None
    if reference is not None and not isinstance(reference, str):
        return f"{corpus.spec.reference_field!r} is not text: {type(reference).__name__}"
    return None


def _langs(corpus: Corpus, row: int, langs: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    src = langs[0] or _text_or_none(corpus.langs.get("src_lang"), row)
    tgt = langs[1] or _text_or_none(corpus.langs.get("tgt_lang"), row)
    return src, tgt


def _text_or_none(column: list[Any] | None, row: int) -> str | None:
    value = column[row] if column is not None else None
    return value if isinstance(value, str) and value else None
