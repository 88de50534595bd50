"""Quality scores against references: sacrebleu corpus BLEU and chrF, rouge-score ROUGE-1/2/L F1 means.

All on a 0-100 scale. Translation gets BLEU and chrF, summarization ROUGE, plain text all of them. Rows
without a reference are left out of the scores (`scored_docs` says how many were scored). Outputs of dummy weights
(random weights, models.load_format dummy) are not scored at all: their scores would be numbers of noise.

The scores come from sufficient statistics that add up over shards (`QualityStats`), so that a job's scores
need one shard's rows at a time: sacrebleu's corpus BLEU and chrF are computed from the sums of its segment
statistics (what `corpus_score` does over a whole corpus), ROUGE is a mean of per-document F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DUMMY_TITLE = "dummy weights, speed only"  # in the first line of every report made with --load-format dummy
DUMMY_NOTE = ("Made with dummy weights (--load-format dummy): random weights of the models' shapes. The speed numbers "
              "are the shapes' own (memory traffic and compute do not depend on the values); the outputs, acceptance "
              "and agreement are a random model's, so a speculative method's speedup here is not the real models', "
              "and no quality score (BLEU, chrF, ROUGE) was computed.")
QUALITY_KEYS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "bleu_signature", "chrf_signature")
ROUGE_NAMES = ("rouge1", "rouge2", "rougeL")
TASK_METRICS = {"translation": ("sacrebleu",), "summarization": ("rouge",), "plain": ("sacrebleu", "rouge")}


def _add(a: list[int] | None, b: list[int] | None) -> list[int] | None:
    return a if b is None else b if a is None else [x + y for x, y in zip(a, b)]


@dataclass(frozen=True)
class QualityStats:
    """What the scores of a set of (hypothesis, reference) pairs are computed from; `+` joins two sets."""

    scored: int = 0  # pairs with a reference
    bleu: list[int] | None = None  # sacrebleu BLEU's segment statistics, summed (None: not computed)
    chrf: list[int] | None = None  # sacrebleu chrF's, summed
    rouge: tuple[float, ...] | None = None  # ROUGE-1/2/L F1, summed over the pairs
    signatures: tuple[str, str] | None = None  # sacrebleu's BLEU and chrF signatures

    def __add__(self, other: QualityStats) -> QualityStats:
        rouge = other.rouge if self.rouge is None else self.rouge if other.rouge is None else tuple(
            x + y for x, y in zip(self.rouge, other.rouge))
        return QualityStats(self.scored + other.scored, _add(self.bleu, other.bleu), _add(self.chrf, other.chrf),
                            rouge, self.signatures or other.signatures)

    def scores(self) -> dict[str, Any]:
        """The scores, None for what is not computed, and scored_docs."""
        out: dict[str, Any] = dict.fromkeys(QUALITY_KEYS)
        out["scored_docs"] = self.scored
        if self.bleu is not None and self.chrf is not None and self.signatures:
            bleu, chrf = _sacrebleu_metrics()
            out.update(bleu=bleu._compute_score_from_stats(self.bleu).score, bleu_signature=self.signatures[0],
                       chrf=chrf._compute_score_from_stats(self.chrf).score, chrf_signature=self.signatures[1])
        if self.rouge is not None and self.scored:
            out.update({name: 100 * total / self.scored for name, total in zip(ROUGE_NAMES, self.rouge)})
        return out


def _sacrebleu_metrics() -> tuple[Any, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU(), CHRF()


def _sacrebleu(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    from sacrebleu.utils import sum_of_lists

    bleu, chrf = _sacrebleu_metrics()
    bleu_stats = sum_of_lists(bleu._extract_corpus_statistics(hyps, [refs]))  # corpus_score's own sums
    chrf_stats = sum_of_lists(chrf._extract_corpus_statistics(hyps, [refs]))
    return {"bleu": list(bleu_stats), "chrf": list(chrf_stats),
            "signatures": (str(bleu.get_signature()), str(chrf.get_signature()))}


def _rouge(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_NAMES), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hyps, refs)]
    return {"rouge": tuple(sum(s[name].fmeasure for s in scores) for name in ROUGE_NAMES)}


METRICS = {"sacrebleu": _sacrebleu, "rouge": _rouge}


def quality_stats(task: str, hypotheses: list[str], references: list[str | None]) -> QualityStats:
    """The task's statistics over the rows that have a reference."""
    pairs = [(h, r) for h, r in zip(hypotheses, references) if r is not None]
    if not pairs:
        return QualityStats()
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    parts: dict[str, Any] = {}
    for metric in TASK_METRICS[task]:
        parts.update(METRICS[metric](hyps, refs))
    return QualityStats(scored=len(pairs), **parts)


def quality(task: str, hypotheses: list[str], references: list[str | None]) -> dict[str, Any]:
    """The task's scores over the rows that have a reference; None for what is not computed."""
    return quality_stats(task, hypotheses, references).scores()
