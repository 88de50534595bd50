"""Quality scores against references: sacrebleu corpus BLEU and chrF, rouge-score ROUGE-1/2/L F1 means.

All on a 0-100 scale. Translation gets BLEU and chrF, summarization ROUGE, plain text all of them. Rows
without a reference are left out of the scores (`scored_docs` says how many were scored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

QUALITY_KEYS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "bleu_signature", "chrf_signature")


def _sacrebleu(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    return {"bleu": bleu.corpus_score(hyps, [refs]).score, "bleu_signature": str(bleu.get_signature()),
            "chrf": chrf.corpus_score(hyps, [refs]).score, "chrf_signature": str(chrf.get_signature())}


def _rouge(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hyps, refs)]
    return {name: 100 * sum(s[name].fmeasure for s in scores) / len(scores) for name in names}


TASK_METRICS: dict[str, tuple[Callable[[list[str], list[str]], dict[str, Any]], ...]] = {
    "translation": (_sacrebleu,), "summarization": (_rouge,), "plain": (_sacrebleu, _rouge)}


def quality(task: str, hypotheses: list[str], references: list[str | None]) -> dict[str, Any]:
    """The task's scores over the rows that have a reference; None for what is not computed."""
    pairs = [(h, r) for h, r in zip(hypotheses, references) if r is not None]
    out: dict[str, Any] = dict.fromkeys(QUALITY_KEYS)
    out["scored_docs"] = len(pairs)
    if pairs:
        hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
        for metric in TASK_METRICS[task]:
            out.update(metric(hyps, refs))
    return out
