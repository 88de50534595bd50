"""Row checks: a row that cannot be decoded becomes an error record with its reason; the job goes on.

The driver checks each row as the corpus streams by: a bad row is unparsable, has no usable id or one seen
before, has a source that is missing, not text or empty, or a reference that is not text. Whether a prompt is
too long for the target's context (with max_new_tokens added) is the worker's check (workers.prompts), where
the tokenizer is; `check_rows` does both for a small corpus held in memory (evaluations, distillation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from jobs.batch.corpus import Corpus, Rows, open_corpus
from jobs.batch.spec import CorpusSpec
from workers.prompts import too_long

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
    src_lang: str | None  # the spec's language, else the row's own, else None
    tgt_lang: str | None


@dataclass(frozen=True)
class PromptRow(GoodRow):
    prompt: str  # the rendered prompt the model sees
    prompt_tokens: int


@dataclass(frozen=True)
class BadRow:
    row: int
    id: str | None
    reason: str

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


class SeenIds:
    """The ids met so far, each as an 8-byte blake2b digest with its first row, in sorted numpy arrays.

    16 bytes an id, whatever its length (16 MB for a million ids). Two different ids share a digest with a
    probability of about n^2 / 2^65 (3e-8 for a million): the second would be refused as a duplicate.
    """

    def __init__(self) -> None:
        self._digests = np.empty(0, np.uint64)  # sorted
        self._rows = np.empty(0, np.int64)  # the first row of each digest

    def first_rows(self, ids: list[str], rows: list[int]) -> list[int | None]:
        """For each (id, row), in corpus order: the earlier row with the same id, or None; all are remembered."""
        if not ids:
            return []
        digests = np.frombuffer(b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids), np.uint64)
        row_array = np.asarray(rows, np.int64)
        unique, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
        at = np.searchsorted(self._digests, unique)
        known = at < len(self._digests)
        known[known] = self._digests[at[known]] == unique[known]
        earliest = row_array[first]  # per unique digest: its first row in this batch, or before it
        earliest[known] = self._rows[at[known]]
        self._digests = np.insert(self._digests, at[~known], unique[~known])
        self._rows = np.insert(self._rows, at[~known], row_array[first][~known])
        return [None if first_row == row else first_row for first_row, row in zip(earliest[inverse].tolist(), rows)]


class RowChecker:
    """Checks a corpus's rows batch by batch, in corpus order (ids are remembered across batches)."""

    def __init__(self, spec: CorpusSpec, langs: tuple[str | None, str | None] = (None, None)) -> None:
        self.spec, self.langs = spec, langs  # spec: the resolved corpus spec; langs: the job's, which win
        self.seen = SeenIds()

    def check(self, rows: Rows) -> list[GoodRow | BadRow]:
        ids = [_id_of(rows, i) for i in range(rows.size)]
        early = [rows.broken.get(rows.start + i) or reason for i, (_, reason) in enumerate(ids)]
        fresh = [i for i, why in enumerate(early) if why is None and rows.ids is not None]
        firsts = dict(zip(fresh, self.seen.first_rows([ids[i][0] for i in fresh], [rows.start + i for i in fresh])))
        out: list[GoodRow | BadRow] = []
        for i, (doc_id, _) in enumerate(ids):
            earlier = firsts.get(i)
            duplicate = f"duplicate id {doc_id!r} (first at row {earlier})" if earlier is not None else None
            reason = early[i] or duplicate or _text_problem(self.spec, rows, i)
            if reason:
                out.append(BadRow(rows.start + i, doc_id, reason))
            else:
                reference = rows.references[i] if rows.references else None
                out.append(GoodRow(rows.start + i, doc_id, rows.sources[i], reference or None,
                                   self.langs[0] or _text_or_none(rows.langs.get("src_lang"), i),
                                   self.langs[1] or _text_or_none(rows.langs.get("tgt_lang"), i)))
        return out


def checked_rows(spec: CorpusSpec, langs: tuple[str | None, str | None] = (None, None)) -> Iterator[GoodRow | BadRow]:
    """Every row of the corpus, checked, in corpus order: the stream the shards are written from."""
    stream = open_corpus(spec)
    checker = RowChecker(stream.spec, langs)
    for rows in stream.batches:
        yield from checker.check(rows)


def check_rows(corpus: Corpus, render: Renderer, count_tokens: Counter, token_budget: int,
               langs: tuple[str | None, str | None] = (None, None)) -> tuple[list[PromptRow], list[BadRow]]:
    """Split a corpus held in memory into rows to decode, with their prompts, and refused rows.

    render: source, src_lang, tgt_lang -> prompt; count_tokens: prompts -> token counts;
    token_budget: the most prompt tokens a row may have (context minus max_new_tokens);
    langs: the spec's (src_lang, tgt_lang), which win over the corpus's per-row fields.
    """
    checked = RowChecker(corpus.spec, langs).check(corpus)
    bad = [r for r in checked if isinstance(r, BadRow)]
    texts = [r for r in checked if isinstance(r, GoodRow)]
    prompts = [render(r.source, r.src_lang, r.tgt_lang) for r in texts]
    counts = [n for i in range(0, len(prompts), TOKENIZE_CHUNK) for n in count_tokens(prompts[i:i + TOKENIZE_CHUNK])]
    good: list[PromptRow] = []
    for row, prompt, n in zip(texts, prompts, counts):
        reason = too_long(n, token_budget)
        if reason:
            bad.append(BadRow(row.row, row.id, reason))
        else:
            good.append(PromptRow(**asdict(row), prompt=prompt, prompt_tokens=n))
    return good, sorted(bad, key=lambda b: b.row)


def _id_of(rows: Rows, i: int) -> tuple[str, str | None]:
    row = rows.start + i
    if rows.ids is None:
        return f"row-{row}", None
    value = rows.ids[i]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return f"row-{row}", f"id is not text or an integer: {value!r}"
    return str(value), None


def _text_problem(spec: CorpusSpec, rows: Rows, i: int) -> str | None:
    field = spec.source_field
    source = rows.sources[i]
    if source is None:
        return f"missing {field!r}"
    if not isinstance(source, str):
        return f"{field!r} is not text: {type(source).__name__} {str(source)[:40]!r}"
    if not source.strip():
        return f"empty {field!r}"
    reference = rows.references[i] if rows.references else None
    if reference is not None and not isinstance(reference, str):
        return f"{spec.reference_field!r} is not text: {type(reference).__name__}"
    return None


def _text_or_none(column: list[Any] | None, i: int) -> str | None:
    value = column[i] if column is not None else None
    return value if isinstance(value, str) and value else None
