"""The documents of an evaluation: each corpus's evaluated rows and its validation rows (for the sweep), as
token ids that every method and peer receives unchanged.

Rows are read and checked by the job system (jobs.batch.corpus, jobs.batch.rows): a row that cannot be decoded is refused
with its reason, and the next good row takes its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.batch.corpus import read_corpus
from jobs.errors import BadInput
from jobs.eval.suite import Suite, SuiteCorpus
from jobs.batch.rows import BadRow, PromptRow, check_rows
from cmsd.decode import encode_prompt as encode  # the ids cmsd's Decoder.generate makes

SLACK_ROWS = 16  # rows read beyond those needed, to replace refused ones


@dataclass(frozen=True)
class Doc:
    corpus: str
    task: str
    id: str  # "<corpus>/<row id>": unique across corpora
    prompt_ids: tuple[int, ...]
    reference: str | None


@dataclass(frozen=True)
class DocSet:
    test: tuple[Doc, ...]  # the evaluated documents, corpus by corpus
    validation: tuple[Doc, ...]  # the sweep's documents (disjoint from test)
    notes: tuple[str, ...]  # refused rows, corpora with fewer rows than asked

    def by_corpus(self, docs: tuple[Doc, ...] | None = None) -> dict[str, list[Doc]]:
        out: dict[str, list[Doc]] = {}
        for doc in self.test if docs is None else docs:
            out.setdefault(doc.corpus, []).append(doc)
        return out


def prepare_docs(suite: Suite, tokenizer: Any, max_context: int) -> DocSet:
    """Read every corpus, check its rows, and split the good ones into test and validation documents."""
    test: list[Doc] = []
    validation: list[Doc] = []
    notes: list[str] = []
    val_rows = suite.sweep.docs_per_corpus if suite.sweep else 0
    budget = max_context - suite.base.max_new_tokens
    for corpus in suite.corpora:
        good, refused = _good_rows(corpus, tokenizer, budget, corpus.offset + corpus.limit + val_rows)
        good = good[corpus.offset:]
        if not good[:corpus.limit]:
            first = f"; first refused: row {refused[0].row}: {refused[0].reason}" if refused else ""
            raise BadInput(f"corpus {corpus.name} ({corpus.path}): no row can be decoded{first}")
        docs = [_doc(corpus, tokenizer, row) for row in good[:corpus.limit + val_rows]]
        test += docs[:corpus.limit]
        validation += docs[corpus.limit:]
        last = good[:corpus.limit + val_rows][-1].row
        notes += [f"{corpus.name}: row {b.row} ({b.id}) refused: {b.reason}" for b in refused if b.row < last]
        if len(docs) < corpus.limit + val_rows:
            notes.append(f"{corpus.name}: {len(docs)} good rows for {corpus.limit} evaluated + {val_rows} validation")
    return DocSet(tuple(test), tuple(validation), tuple(notes))


def _good_rows(corpus: SuiteCorpus, tokenizer: Any, budget: int, wanted: int) -> tuple[list[PromptRow], list[BadRow]]:
    from cmsd import PromptTemplate

    try:
        template = PromptTemplate(task=corpus.task, template=corpus.prompt.template, chat=corpus.prompt.chat,
                                  system=corpus.prompt.system)
    except ValueError as err:
        raise BadInput(f"corpus {corpus.name}: prompt: {err}") from err
    table = read_corpus(corpus.corpus_spec(wanted + SLACK_ROWS))

    def render(source: str, src_lang: str | None, tgt_lang: str | None) -> str:
        return template.render(tokenizer, source, src_lang, tgt_lang)

    def count(prompts: list[str]) -> list[int]:
        return [len(encode(tokenizer, p)) for p in prompts]

    return check_rows(table, render, count, budget, (corpus.src_lang, corpus.tgt_lang))


def _doc(corpus: SuiteCorpus, tokenizer: Any, row: PromptRow) -> Doc:
    return Doc(corpus=corpus.name, task=corpus.task, id=f"{corpus.name}/{row.id}",
               prompt_ids=tuple(encode(tokenizer, row.prompt)), reference=row.reference)
