"""report.md and report.html of an evaluation run, built once as a list of blocks and rendered twice.

Blocks: ("h1" | "h2" | "p", text), ("list", [text]), ("table", (header, rows)), ("img", relative path),
("code", text).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.batch.quality import DUMMY_NOTE, DUMMY_TITLE
from jobs.eval.calibration import METRICS, Calibration
from jobs.eval.docs import DocSet
from jobs.eval.history import Regression
from jobs.eval.measure import Measurements
from jobs.eval.metrics import TASK_METRICS
from jobs.eval.suite import Suite
from jobs.eval.sweep import SweepPoint

Block = tuple[str, Any]
SPEED_COLUMNS = ("new_tokens", "decode_s", "tokens_per_s", "target_calls", "tokens_per_call", "acceptance_rate",
                 "mean_k", "rollback_rate", "speedup_vs_ar", "agreement_with_ar", "exact_match")
PROTOCOL = ("Every method and peer decodes the same token ids on the same machine in one process, models loaded "
            "once and not timed. Each runner first decodes a few tokens untimed (warm-up). Then, for each document "
            "(batch 1) or group of documents (batched setting), every runner decodes it in turn, the order rotating "
            "by one each time, so that machine drift hits all alike. A unit where some runner's time relative to "
            "AR's is off from its usual ratio by more than execution.retime_factor (a burst of other work) is timed "
            "again, at most a quarter of the units, each runner keeping its faster time; the batched setting is timed "
            "execution.batched_rounds times, each runner keeping its fastest. decode_s is the wall time "
            "of each call, shared among its documents by new tokens; speedup_vs_ar compares sums over the same "
            "documents. Peers' counts come from a hook on the target's forward calls: rollback_rate is not visible "
            "from outside (n/a); greedy decoding drafts nothing (n/a).")


@dataclass
class RunRecord:
    """Everything one evaluation run produced, for the report and the history."""

    run_id: str
    started: str
    suite: Suite
    docs: DocSet
    key: str  # history.docs_key
    code: dict[str, Any]
    meas: Measurements
    rows: list[dict[str, Any]]
    calibrations: list[Calibration] = field(default_factory=list)
    points: list[SweepPoint] = field(default_factory=list)
    chosen: SweepPoint | None = None
    chosen_path: str | None = None
    regressions: list[Regression] = field(default_factory=list)
    warnings: list[Regression] = field(default_factory=list)  # timing regressions on a busy machine
    previous_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # this suite's rows, this run included
    wall_s: float = 0.0


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _label(rec: RunRecord, method: str) -> str:
    info = rec.meas.info[method]
    return info.settings.get("verify", "strict") if info.kind == "cmsd" else info.kind


def side_by_side(rec: RunRecord, setting: str) -> Block:
    """Methods as rows: DESIGN.md's numbers, speedup and agreement, then each corpus's quality scores."""
    quality = [] if rec.suite.models.dummy else [(c.name, m) for c in rec.suite.corpora for m in TASK_METRICS[c.task]]
    header = ["method", "verify/kind", *SPEED_COLUMNS, *(f"{c} {m}" for c, m in quality), "keeps quality"]
    by_key = {(r["method"], r["scope"]): r for r in rec.rows if r["setting"] == setting}
    body = []
    for method in dict.fromkeys(r["method"] for r in rec.rows if r["setting"] == setting):
        overall = by_key[(method, "all")]
        scores = [by_key.get((method, c), {}).get(m) for c, m in quality]
        keeps = [by_key[(method, c.name)].get("keeps_quality") for c in rec.suite.corpora if (method, c.name) in by_key]
        verdict = None if None in keeps or not keeps else all(keeps)
        body.append([method, _label(rec, method), *(fmt(overall.get(c)) for c in SPEED_COLUMNS), *map(fmt, scores),
                     fmt(verdict)])
    return ("table", (header, body))


def by_corpus(rec: RunRecord) -> Block:
    corpora = [c.name for c in rec.suite.corpora]
    header = ["method", *(f"{c} {x}" for c in corpora for x in ("speedup", "agreement", "tokens/call"))]
    by_key = {(r["method"], r["scope"]): r for r in rec.rows if r["setting"] == "batch-1"}
    body = [[m, *(fmt(by_key.get((m, c), {}).get(x)) for c in corpora
                  for x in ("speedup_vs_ar", "agreement_with_ar", "tokens_per_call"))]
            for m in dict.fromkeys(r["method"] for r in rec.rows if r["setting"] == "batch-1")]
    return ("table", (header, body))


def significance(rec: RunRecord) -> list[Block]:
    if rec.suite.models.dummy:
        return [("p", "Not computed: dummy weights (a random model's output has no quality to compare).")]
    header = ["method", "corpus", "metric", "score", "AR", "delta", "p", "95% interval", "keeps quality"]
    ar = {r["scope"]: r for r in rec.rows if r["setting"] == "batch-1" and r["method"] == rec.suite.ar.name}
    body, signatures, same = [], {}, []
    for r in rec.rows:
        if r["setting"] != "batch-1" or r["scope"] == "all":
            continue
        signatures.update({k: r[k] for k in r if k.endswith("signature") and r.get(k)})
        if "keeps_quality" not in r:
            continue
        if r.get("exact_match") == 1.0:
            same.append(f"{r['method']} ({r['scope']})")
            continue
        for m in (m for m in TASK_METRICS["plain"] if r.get(f"delta_{m}") is not None):
            interval = f"[{fmt(r.get(f'ci_low_{m}'))}, {fmt(r.get(f'ci_high_{m}'))}]"
            body.append([r["method"], r["scope"], m, fmt(r.get(m)), fmt(ar.get(r["scope"], {}).get(m)),
                         fmt(r[f"delta_{m}"]), fmt(r[f"p_{m}"]), interval, fmt(r["keeps_quality"])])
    notes = [f"{k}: `{v}`" for k, v in sorted(signatures.items())]
    text = ("BLEU/chrF: sacrebleu's paired bootstrap against AR (sacrebleu.significance.PairedTest); the interval is "
            "the method's score's. ROUGE: paired bootstrap of per-document F1 differences; the interval is the "
            f"delta's. A method keeps quality when no delta is negative with p < {rec.suite.floors.alpha:g}.")
    identical = f"Output identical to AR's on every document: {', '.join(same)}." if same else ""
    return [("p", text), ("table", (header, body)), ("p", identical),
            ("list", notes or ["no BLEU/chrF corpus in this suite"])]


def calibration_table(rec: RunRecord) -> Block:
    header = ["method", "judged tokens", *(f"ECE {m}" for m in METRICS)]
    body = []
    for method in dict.fromkeys(c.method for c in rec.calibrations):
        mine = {c.metric: c for c in rec.calibrations if c.method == method}
        body.append([method, fmt(mine["c"].tokens), *(fmt(mine[m].ece) for m in METRICS)])
    return ("table", (header, body))


def sweep_blocks(rec: RunRecord, plot: str | None) -> list[Block]:
    spec = rec.suite.sweep
    if spec is None or not rec.points:
        return [("p", "No sweep in this suite." if spec is None else "The sweep had no validation documents.")]
    knobs = list(rec.points[0].knobs)
    header = [*knobs, spec.speed, spec.quality, "Pareto", "chosen"]
    body = [[*(fmt(p.knobs[k]) for k in knobs), fmt(p.speed), fmt(p.quality), "*" if p.pareto else "",
             "<-" if rec.chosen is not None and p.name == rec.chosen.name else ""] for p in rec.points]
    text = (f"{spec.method} ({spec.verify}) on {rec.points[0].docs} validation documents (rows right after the "
            f"evaluated ones), each point alternated with AR. Chosen: the fastest point with {spec.quality} >= "
            f"{spec.min_quality:g}" + (f", written to `{rec.chosen_path}`." if rec.chosen_path else
                                       " (none with dummy weights)." if rec.suite.models.dummy else "."))
    return [("p", text), ("table", (header, body))] + ([("img", plot)] if plot else [])


def trend_table(rec: RunRecord, last: int = 8) -> Block:
    runs = list(dict.fromkeys(r["run_id"] for r in rec.history))[-last:]
    cells = {(r["run_id"], r["method"]): r.get("speedup_vs_ar") for r in rec.history
             if r.get("setting") == "batch-1" and r.get("scope") == "all"}
    methods = list(dict.fromkeys(m for (run, m) in cells if run in runs))
    return ("table", (["run", "commit", *methods],
                      [[run, fmt(_commit(rec, run)), *(fmt(cells.get((run, m))) for m in methods)] for run in runs]))


def _commit(rec: RunRecord, run: str) -> str | None:
    commit = next((r.get("git_commit") for r in rec.history if r["run_id"] == run), None)
    return commit[:10] if commit else None


def header_blocks(rec: RunRecord) -> list[Block]:
    m, s = rec.meas.machine, rec.suite
    counts = ", ".join(f"{name} {len(docs)}" for name, docs in rec.docs.by_corpus().items())
    lines = [f"run `{rec.run_id}`, started {rec.started}, code `{rec.code.get('git_commit') or 'unknown'}`",
             f"models: target `{s.models.target}`, drafter `{s.models.drafter}` "
             f"({m.get('dtype')} on {m.get('device')})",
             f"machine: {m.get('platform')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')} ({m.get('threads')} "
             f"threads), transformers {m.get('transformers')}" + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
             f"documents: {counts} (validation: {len(rec.docs.validation)}); max_new_tokens "
             f"{s.base.max_new_tokens}; batched setting: batch {s.batch_size}",
             f"wall time: {rec.wall_s:.0f} s in all; models loaded in {rec.meas.load_s:.1f} s (not timed); "
             f"measuring {rec.meas.measure_s:.0f} s; load average while timing {fmt(m.get('load_avg_mean'))} "
             f"(mean), {fmt(m.get('load_avg_max'))} (max) on {m.get('cpu_count')} CPUs"]
    if s.models.dummy:
        return [("h1", f"Evaluation: {s.name} ({DUMMY_TITLE})"), ("p", DUMMY_NOTE), ("list", lines)]
    return [("h1", f"Evaluation: {s.name}"), ("list", lines)]


def verdict_blocks(rec: RunRecord) -> list[Block]:
    against = f"the previous run `{rec.previous_id}`" if rec.previous_id else "no previous run (first of its kind)"
    busy = ([("p", f"The machine was busy while timing (mean load average {rec.meas.busy:.2f} per CPU > "
                   f"execution.busy_load {rec.suite.execution.busy_load:g}): these timing checks failed but are "
                   "only warnings; the deterministic checks (tokens per call, agreement, quality) still count:"),
             ("list", [w.message() for w in rec.warnings])] if rec.warnings else [])
    if not rec.regressions:
        return [("h2", "Verdict: no regression"), ("p", f"Floors of the suite met; compared with {against}."), *busy]
    return [("h2", f"Verdict: {len(rec.regressions)} regression(s)"),
            ("p", f"Compared with the floors of the suite and {against}:"),
            ("list", [r.message() for r in rec.regressions]), *busy]


def build(rec: RunRecord, plots: dict[str, str]) -> list[Block]:
    batched = f"batch-{rec.suite.batch_size}"
    blocks = [*header_blocks(rec), *verdict_blocks(rec), ("h2", "Side by side, batch 1"), side_by_side(rec, "batch-1")]
    if rec.suite.batch_size > 1 and any(r["setting"] == batched for r in rec.rows):  # batch 1: one table
        blocks += [("h2", f"Side by side, batch {rec.suite.batch_size}"),
                   ("p", "transformers' assisted, prompt-lookup and early-exit generation run at batch 1 only, so "
                         "they are absent here; speedup_vs_ar is against AR at this batch size, agreement against "
                         "AR's batch-1 output."), side_by_side(rec, batched)]
    blocks += [("h2", "By corpus (batch 1)"), by_corpus(rec), ("h2", "Quality against AR"), *significance(rec),
               ("h2", "Calibration: confidence against acceptance"), calibration_table(rec),
               ("img", plots["calibration"]),
               ("h2", "Draft lengths"), ("img", plots["k_histogram"]), ("h2", "Sweep"),
               *sweep_blocks(rec, plots.get("pareto")), ("h2", "Trend"), trend_table(rec), ("img", plots["trend"])]
    skipped = [f"{name}: {why}" for name, why in rec.meas.skipped.items()]
    skipped += [f"{name} ran, but {info.note}" for name, info in rec.meas.info.items() if info.note]
    skipped += [f"timed again, each runner keeping its faster time: {unit}" for unit in rec.meas.retimed]
    skipped += rec.meas.notes
    blocks += [("h2", "Skipped or changed"), ("list", skipped or ["nothing"]), ("h2", "How this was measured"),
               ("p", PROTOCOL)]
    return blocks + ([("h2", "Notes"), ("list", list(rec.docs.notes))] if rec.docs.notes else [])


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            out += [("# " if kind == "h1" else "## ") + value, ""]
        elif kind == "p":
            out += [value, ""]
        elif kind == "list":
            out += [f"- {item}" for item in value] + [""]
        elif kind == "img":
            out += [f"![{value}]({value})", ""]
        elif kind == "table":
            header, rows = value
            out += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(out)


def render_html(blocks: list[Block], title: str) -> str:
    esc, out = html.escape, []
    for kind, value in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(value)}</{kind}>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in value) + "</ul>")
        elif kind == "img":
            out.append(f'<img src="{esc(value)}" alt="{esc(value)}">')
        elif kind == "table":
            header, rows = value
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
                       + "</table>")
    style = ("body{font-family:sans-serif;max-width:90em;margin:auto}table{border-collapse:collapse;font-size:90%}"
             "td,th{padding:2px 6px;border:1px solid #ccc}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
            "</head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(rec: RunRecord, out: Path, plots: dict[str, str]) -> Path:
    blocks = build(rec, plots)
    (out / "report.md").write_text(render_markdown(blocks))
    title = f"Evaluation {rec.suite.name} {rec.run_id}" + (f" ({DUMMY_TITLE})" if rec.suite.models.dummy else "")
    (out / "report.html").write_text(render_html(blocks, title))  # the title is in the first line
    return out / "report.md"
