"""The numbers of each method: DESIGN.md's table per setting and scope, plus speedup_vs_ar and agreement_with_ar,
and quality changes against AR judged the MT way.

    speedup_vs_ar      AR's decode_s / this method's decode_s, summed over the documents both decoded, same run
    agreement_with_ar  matching positions / positions, pooled over documents: position i matches when both
                       outputs have a token there and it is the same (a length difference counts as mismatches)
    exact_match        share of documents whose whole output equals AR's
    delta_<metric>     the method's score minus AR's (points); p_<metric> its paired-bootstrap p-value: sacrebleu's
                       own paired bootstrap (sacrebleu.significance.PairedTest) for BLEU and chrF, a paired bootstrap
                       of per-document F1 differences for ROUGE (ci_low/ci_high: its 95% interval)
    keeps_quality      no metric of the corpus is significantly worse than AR's (delta < 0 and p < alpha)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cmsd.stats import DocStats, token_agreement
from jobs.eval.docs import DocSet
from jobs.eval.measure import Measurements
from jobs.eval.runners import ALL_RATES, Output, RunnerInfo
from jobs.eval.suite import Suite
from jobs.batch.quality import quality

TASK_METRICS = {"translation": ("bleu", "chrf"), "summarization": ("rouge1", "rouge2", "rougeL"),
                "plain": ("bleu", "chrf", "rouge1", "rouge2", "rougeL")}
BOOTSTRAP_SEED = 12345  # sacrebleu's default seed too
DROPPED = ("latency_s",)  # a per-call wall time: summing it over documents means nothing


@dataclass(frozen=True)
class Delta:
    metric: str
    delta: float  # method - AR, points
    p: float  # paired bootstrap p-value (two-sided)
    ci_low: float | None  # 95% interval of the delta (ROUGE) or of the method's score (sacrebleu)
    ci_high: float | None

    def significant_loss(self, alpha: float) -> bool:
        return self.delta < 0 and self.p < alpha


Index = dict[tuple[str, str], dict[str, Output]]  # (setting, method) -> doc id -> output


def index_outputs(outputs: list[Output]) -> Index:
    out: Index = {}
    for o in outputs:
        out.setdefault((o.setting, o.method), {})[o.doc_id] = o
    return out


def speed_numbers(outs: list[Output], baseline: dict[str, Output], reference: dict[str, Output],
                  info: RunnerInfo) -> dict[str, Any]:
    """Summed counts, rates from the sums (n/a where the runner cannot count them), speedup and agreement."""
    row: dict[str, Any] = DocStats.total([o.stats for o in outs]).to_dict()
    for key in DROPPED:
        row.pop(key, None)
    row.update({rate: None for rate in ALL_RATES if rate not in info.measured})
    same = [o for o in outs if o.doc_id in baseline]
    own_s = sum(o.stats.decode_s for o in same)
    row["speedup_vs_ar"] = sum(baseline[o.doc_id].stats.decode_s for o in same) / own_s if own_s > 0 else None
    matches, positions, exact = agreement(outs, reference)
    row["agreement_with_ar"] = matches / positions if positions else None
    row["exact_match"] = exact / len(outs) if outs else None
    return row


def agreement(outs: list[Output], reference: dict[str, Output]) -> tuple[int, int, int]:
    """(matching positions, positions, identical documents) against the reference outputs."""
    return token_agreement((o.token_ids, reference[o.doc_id].token_ids) for o in outs if o.doc_id in reference)


def quality_numbers(task: str, outs: list[Output], references: dict[str, str | None]) -> dict[str, Any]:
    """The corpus's BLEU/chrF (with sacrebleu signatures) or ROUGE, via the job system's jobs.batch.quality."""
    return quality(task, [o.text for o in outs], [references.get(o.doc_id) for o in outs])


def deltas(task: str, outs: list[Output], ar: dict[str, Output], references: dict[str, str | None],
           samples: int) -> tuple[list[Delta], dict[str, str]]:
    """Paired tests of the method against AR on the documents both decoded that have a reference.
    Returns the deltas and the sacrebleu signatures of the tests."""
    docs = [o for o in outs if o.doc_id in ar and references.get(o.doc_id)]
    if not docs:
        return [], {}
    hyps, base = [o.text for o in docs], [ar[o.doc_id].text for o in docs]
    refs = [str(references[o.doc_id]) for o in docs]
    found: list[Delta] = []
    signatures: dict[str, str] = {}
    wanted = TASK_METRICS[task]
    if "bleu" in wanted:
        more, signatures = sacrebleu_paired(base, hyps, refs, samples)
        found += more
    if "rougeL" in wanted:
        found += rouge_paired(base, hyps, refs, samples)
    return found, signatures


def sacrebleu_paired(base: list[str], hyps: list[str], refs: list[str],
                     samples: int) -> tuple[list[Delta], dict[str, str]]:
    """sacrebleu's paired bootstrap resampling (PairedTest, test_type='bs') for BLEU and chrF."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    test = PairedTest([("ar", base), ("method", hyps)], {"BLEU": BLEU(), "chrF": CHRF()}, [refs],
                      test_type="bs", n_samples=samples)
    signatures, scores = test()
    out, sigs = [], {}
    for key, name in zip([k for k in scores if k != "System"], ("bleu", "chrf")):
        ar_result, result = scores[key]
        p = 1.0 if base == hyps else float(result.p_value)
        ci = result.ci if result.ci is not None else None
        low, high = (result.mean - ci, result.mean + ci) if ci is not None else (None, None)
        out.append(Delta(name, float(result.score - ar_result.score), p, low, high))
        sigs[name] = str(signatures[key])
    return out, sigs


def rouge_paired(base: list[str], hyps: list[str], refs: list[str], samples: int) -> list[Delta]:
    """A paired bootstrap of the mean per-document ROUGE F1 difference (x100), with its 95% interval."""
    from rouge_score import rouge_scorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)  # as jobs.batch.quality scores them
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, len(refs), size=(samples, len(refs)))
    out = []
    for name in names:
        diff = 100 * np.array([scorer.score(r, h)[name].fmeasure - scorer.score(r, b)[name].fmeasure
                               for h, b, r in zip(hyps, base, refs)])
        means = diff[picks].mean(axis=1)
        p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
        low, high = np.percentile(means, [2.5, 97.5])
        out.append(Delta(name, float(diff.mean()), 1.0 if not diff.any() else p, float(low), float(high)))
    return out


def method_rows(meas: Measurements, suite: Suite, docs: DocSet) -> list[dict[str, Any]]:
    """One row per (setting, method or peer, scope); scope is "all" or a corpus name (with its quality, except for
    dummy weights)."""
    index = index_outputs(meas.outputs)
    references = {d.id: d.reference for d in (*docs.test, *docs.validation)}
    order = list(meas.info)
    keys = sorted(index, key=lambda k: (_setting_rank(k[0]), order.index(k[1]) if k[1] in order else len(order)))
    rows = []
    for setting, method in keys:
        baseline = index.get((setting, suite.ar.name), {})
        reference = index.get(("sweep" if setting == "sweep" else "batch-1", suite.ar.name), baseline)
        outs = list(index[(setting, method)].values())
        for scope, subset in [("all", outs), *_by_corpus(outs)]:
            info = meas.info[method]
            row = {"setting": setting, "method": method, "scope": scope, "kind": info.kind, "lossless": info.lossless,
                   **speed_numbers(subset, baseline, reference, info)}
            if scope != "all" and not suite.models.dummy:  # a random model's output has no quality to score
                task = next(c.task for c in suite.corpora if c.name == scope)
                row.update(quality_numbers(task, subset, references))
                if setting == "batch-1" and method != suite.ar.name:
                    row.update(_delta_columns(task, subset, baseline, references, suite))
            rows.append(row)
    return rows


def _delta_columns(task: str, outs: list[Output], ar: dict[str, Output], references: dict[str, str | None],
                   suite: Suite) -> dict[str, Any]:
    found, signatures = deltas(task, outs, ar, references, suite.bootstrap_samples)
    alpha = (suite.floors_for(outs[0].method) or suite.floors).alpha
    row: dict[str, Any] = {"keeps_quality": not any(d.significant_loss(alpha) for d in found)} if found else {}
    for d in found:
        row.update({f"delta_{d.metric}": d.delta, f"p_{d.metric}": d.p, f"ci_low_{d.metric}": d.ci_low,
                    f"ci_high_{d.metric}": d.ci_high})
    row.update({f"{name}_paired_signature": sig for name, sig in signatures.items()})
    return row


def _by_corpus(outs: list[Output]) -> list[tuple[str, list[Output]]]:
    groups: dict[str, list[Output]] = {}
    for o in outs:
        groups.setdefault(o.corpus, []).append(o)
    return list(groups.items())


def _setting_rank(setting: str) -> tuple[int, str]:
    return (0 if setting == "batch-1" else 2 if setting == "sweep" else 1, setting)
