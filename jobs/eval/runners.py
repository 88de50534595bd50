"""Runners: one per method or peer, each decoding a list of token-id prompts the same way every time.

    run(prompts, doc_ids) -> [RawOutput]   decode; the caller times the call (model loading is not in it)
    warmup(prompt)                         one short untimed decode: first-call costs, and refusals, show here

A runner reports raw counts only (target calls, drafted, accepted tokens) and says which rates those counts
support (`measured`); the cmsd runners support all of them, transformers' peers fewer (eval_peers.py).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

from cmsd.stats import DocStats
from jobs.eval.docs import Doc

ALL_RATES = ("tokens_per_call", "acceptance_rate", "mean_k", "rollback_rate")
WARMUP_TOKENS = 4


@dataclass
class RawOutput:
    """One document's tokens and counts from one runner call (None: the runner cannot count it)."""

    token_ids: list[int]  # new tokens, EOS included
    calls: int | None = None  # target forward passes the document took part in
    drafted: int | None = None
    accepted: int | None = None
    iterations: int | None = None
    rollbacks: int | None = None
    trace: dict[str, list] | None = None  # cmsd's per-drafted-token columns (TRACE_COLUMNS)


@dataclass
class Output:
    """One document decoded by one method in one setting, timed by the eval."""

    method: str
    setting: str  # "batch-1", "batch-8", "sweep"
    doc_id: str
    corpus: str
    token_ids: list[int]
    text: str
    stats: DocStats  # decode_s: the document's share (by new tokens) of its timed call's wall time
    trace: dict[str, list] | None = None


@dataclass(frozen=True)
class RunnerInfo:
    kind: str  # "cmsd" or the peer kind
    measured: tuple[str, ...]  # the rates of ALL_RATES its counts support
    lossless: bool  # its output should equal the target's greedy output
    batched: bool
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # e.g. cmsd decoded it as another method (SpecBound's fallback to AR)
    drafter: str | None = None  # a cmsd method's drafter ("ngram", a model name or directory)


class Runner(ABC):
    name: str
    info: RunnerInfo
    limit: int | None = None  # only the first N documents of each corpus
    optional: bool = True  # when its warm-up fails, skip it with the reason (else the eval fails)

    @abstractmethod
    def run(self, prompts: list[list[int]], doc_ids: list[str]) -> list[RawOutput]: ...

    @abstractmethod
    def warmup(self, prompt: list[int]) -> None: ...


class CmsdRunner(Runner):
    """A cmsd method: Decoder(pair, settings) at the batch size of each call."""

    def __init__(self, name: str, pair: Any, settings: Any, batched: bool = True, limit: int | None = None,
                 batch_size: int | None = None) -> None:
        self.name, self.pair, self.limit, self.optional = name, pair, limit, False
        self.batch_size = batch_size  # the most rows a call decodes at once (None: all its documents)
        self.settings = settings.with_(trace=True)
        measured = ALL_RATES if settings.drafts else ("tokens_per_call",)
        self.info = RunnerInfo(kind="cmsd", measured=measured, lossless=settings.lossless, batched=batched,
                               settings=settings.to_dict(), drafter=pair.drafter_name)
        self._decoders: dict[int, Any] = {}

    def _decoder(self, batch: int) -> Any:
        from cmsd import Decoder

        if batch not in self._decoders:
            self._decoders[batch] = Decoder(self.pair, self.settings.with_(batch_size=batch))
        return self._decoders[batch]

    def run(self, prompts: list[list[int]], doc_ids: list[str]) -> list[RawOutput]:
        gens = self._decoder(min(len(prompts), self.batch_size or len(prompts))).generate_ids(prompts, doc_ids)
        return [RawOutput(g.token_ids, calls=g.stats.target_calls, drafted=g.stats.drafted, accepted=g.stats.accepted,
                          iterations=g.stats.iterations, rollbacks=g.stats.rollbacks, trace=g.trace) for g in gens]

    def warmup(self, prompt: list[int]) -> None:
        from cmsd import Decoder

        decoder = Decoder(self.pair, self.settings.with_(batch_size=1, max_new_tokens=WARMUP_TOKENS))
        decoder.generate_ids([prompt])
        if decoder.settings.method != self.settings.method:
            self.info = replace(self.info, note=f"cmsd decodes {self.settings.method} as {decoder.settings.method} "
                                                "with these models (see its log warning)")


def timed(runner: Runner, docs: list[Doc], setting: str, tokenizer: Any) -> tuple[list[Output], float]:
    """Run one call over `docs` and time it; each document gets its share of the wall time by new tokens."""
    prompts, ids = [list(d.prompt_ids) for d in docs], [d.id for d in docs]
    start = time.perf_counter()
    raw = runner.run(prompts, ids)
    wall = time.perf_counter() - start
    total = sum(len(r.token_ids) for r in raw) or 1
    outputs = [Output(method=runner.name, setting=setting, doc_id=d.id, corpus=d.corpus, token_ids=r.token_ids,
                      text=tokenizer.decode(r.token_ids, skip_special_tokens=True),
                      stats=_stats(r, wall * len(r.token_ids) / total, wall), trace=r.trace)
               for d, r in zip(docs, raw)]
    return outputs, wall


def _stats(raw: RawOutput, decode_s: float, wall: float) -> DocStats:
    return DocStats(docs=1, new_tokens=len(raw.token_ids), decode_s=decode_s, latency_s=wall,
                    target_calls=raw.calls or 0, drafted=raw.drafted or 0, accepted=raw.accepted or 0,
                    iterations=raw.iterations or 0, rollbacks=raw.rollbacks or 0)
