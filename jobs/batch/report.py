"""report.md and report.html from summary.json and the traces, with plots/*.png (matplotlib, Agg).

A job made with dummy weights (models.load_format dummy) says so in the first line of both, and has no quality
scores. Plots: throughput per shard; the histogram of draft lengths k_j (one count per draft-verify iteration);
drafter confidence C against the empirical acceptance rate, in bins of C. The traces are counted one shard at
a time (TraceCounts), never read whole.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.batch.manifest import Manifest
from jobs.batch.quality import DUMMY_NOTE, DUMMY_TITLE
from workers.store import JobStore, trace_path

CONF_BINS = 10
TABLE_ROWS = ("docs", "new_tokens", "decode_s", "tokens_per_s", "target_calls", "tokens_per_call",
              "acceptance_rate", "mean_k", "rollback_rate", "bleu", "chrf", "rouge1", "rouge2", "rougeL",
              "agreement_with_ar", "speedup_vs_ar")
SHARD_COLUMNS = ("shard", "rows", "tokens_per_s", "tokens_per_call", "acceptance_rate", "mean_k", "attempt", "io_s")
TRACE_READ = ["doc_id", "iteration", "k_j", "c", "accepted"]  # the trace columns the plots need


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(store: JobStore, rel: str, figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    store.write_bytes(rel, buffer.getvalue())
    return rel


@dataclass(frozen=True)
class TraceCounts:
    """What the plots need from the traces, counted shard by shard (a job's traces are never all in memory)."""

    k: np.ndarray  # [k_max + 1] draft-verify iterations per draft length k_j
    drafted: np.ndarray  # [CONF_BINS] drafted tokens per bin of confidence C
    accepted: np.ndarray  # [CONF_BINS] of which accepted

    def __add__(self, other: TraceCounts) -> TraceCounts:
        size = max(len(self.k), len(other.k))
        k = np.pad(self.k, (0, size - len(self.k))) + np.pad(other.k, (0, size - len(other.k)))
        return TraceCounts(k, self.drafted + other.drafted, self.accepted + other.accepted)


def count_traces(traces: pa.Table) -> TraceCounts:
    """The counts of one shard's traces (doc ids are unique within a shard, so iterations group there)."""
    if not traces.num_rows:
        return TraceCounts(np.zeros(0, np.int64), np.zeros(CONF_BINS), np.zeros(CONF_BINS))
    per_iteration = traces.group_by(["doc_id", "iteration"]).aggregate([("k_j", "max")]).column("k_j_max")
    c = np.clip(traces.column("c").to_numpy(zero_copy_only=False), 0.0, 1.0)
    accepted = traces.column("accepted").to_numpy(zero_copy_only=False).astype(float)
    bins = np.minimum((c * CONF_BINS).astype(int), CONF_BINS - 1)
    return TraceCounts(np.bincount(per_iteration.to_numpy()), np.bincount(bins, minlength=CONF_BINS).astype(float),
                       np.bincount(bins, weights=accepted, minlength=CONF_BINS))


def read_trace_counts(store: JobStore, manifest: Manifest) -> TraceCounts:
    total = count_traces(pa.table({}))
    for entry in manifest.shards:
        if store.exists(trace_path(entry.index)):
            total = total + count_traces(store.read_parquet(trace_path(entry.index), TRACE_READ))
    return total


def plot_throughput(store: JobStore, summary: dict[str, Any]) -> str:
    shards = summary["per_shard"]
    figure, ax = _pyplot().subplots(figsize=(6, 3))
    ax.bar([str(s["shard"]) for s in shards], [s["tokens_per_s"] for s in shards], color="tab:blue")
    ax.set(xlabel="shard", ylabel="tokens / s (per actor)", title="Throughput per shard")
    return _save(store, "plots/throughput.png", figure)


NO_DRAFTS = ("no document was decoded with drafts (the configuration the job ran drafts nothing), so there is no "
             "{what}")


def plot_k_histogram(store: JobStore, counts: TraceCounts) -> str:
    """The plot's path, or a line saying why there is none (nothing drafted)."""
    drafted_k = np.flatnonzero(counts.k)
    if not counts.drafted.sum():
        return NO_DRAFTS.format(what="draft-length histogram")
    figure, ax = _pyplot().subplots(figsize=(6, 3))
    k = np.arange(drafted_k.min(), drafted_k.max() + 1)
    ax.bar(k, counts.k[k], width=0.9, color="tab:green")
    ax.set(xlabel="draft length k_j", ylabel="iterations", title="Draft lengths")
    return _save(store, "plots/k_histogram.png", figure)


def plot_tuning(store: JobStore, tuning: dict[str, Any] | None) -> str | None:
    """Tokens a second by batch size, a line per method and drafter, the chosen configuration marked."""
    if not tuning:
        return None
    figure, ax = _pyplot().subplots(figsize=(6, 3.5))
    lines: dict[str, list[tuple[int, float]]] = {}
    for c in tuning["candidates"]:
        lines.setdefault(c["label"].rsplit(" ", 1)[0], []).append((c["batch_size"], c["tokens_per_s"]))
    for name, points in lines.items():
        x, y = zip(*sorted(points))
        ax.plot(x, y, marker="o", label=name)
    chosen = tuning["chosen"]
    ax.scatter([chosen["batch_size"]], [chosen["tokens_per_s"]], s=160, facecolors="none", edgecolors="black",
               label=f"chosen: {chosen['label']}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size", ylabel="tokens / s (per actor)", title=f"Tuning ({tuning['objective']})")
    ax.legend(fontsize=8)
    return _save(store, "plots/tuning.png", figure)


def calibration(counts: TraceCounts) -> list[tuple[float, float, int]]:
    """(bin centre, empirical acceptance, drafted tokens) per confidence bin that has tokens."""
    return [((b + 0.5) / CONF_BINS, float(counts.accepted[b] / counts.drafted[b]), int(counts.drafted[b]))
            for b in range(CONF_BINS) if counts.drafted[b]]


def plot_calibration(store: JobStore, counts: TraceCounts) -> str:
    """The plot's path, or a line saying why there is none (nothing drafted)."""
    points = calibration(counts)
    if not points:
        return NO_DRAFTS.format(what="confidence-vs-acceptance plot")
    figure, ax = _pyplot().subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    x, y, n = zip(*points)
    ax.plot(x, y, marker="o", color="tab:red")
    for xi, yi, ni in points:
        ax.annotate(str(ni), (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="drafter confidence C", ylabel="empirical acceptance",
           title="Confidence vs acceptance")
    return _save(store, "plots/confidence_acceptance.png", figure)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rows(summary: dict[str, Any]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    overall = [(name, _fmt(summary["overall"].get(name))) for name in TABLE_ROWS]
    shards = [[_fmt(s.get(c)) for c in SHARD_COLUMNS] + [", ".join(n[:8] for n in s["nodes"])]
              for s in summary["per_shard"]]
    return overall, shards


TUNING_COLUMNS = ("label", "tokens_per_s", "doc_s", "tokens_per_call", "acceptance_rate", "agreement_with_ar",
                  "drafts_per_row", "kv_mb", "measured", "predicted_tokens_per_s")


def _tuning_cells(candidate: dict[str, Any]) -> list[str]:
    return [_fmt(candidate.get(name)) if name != "measured" else "measured" if candidate[name] else "predicted"
            for name in TUNING_COLUMNS]


def tuning_lines(tuning: dict[str, Any] | None) -> list[str]:
    """The tuning's choice in words and its candidates as a Markdown table (report.md, `cmsd-jobs tune`)."""
    if not tuning:
        return []
    chosen, ar = tuning["chosen"], tuning["ar"]
    versus = "tokens/s" if tuning["objective"] == "throughput" else "per-document time"
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in (tuning.get("phases") or {}).items())
    source = (f"measured now in {tuning['seconds']:.1f} s: {phases}" if tuning["source"] == "measured" else
              f"reused, measured {tuning['measured_at']} in {sum((tuning.get('phases') or {}).values()):.1f} s")
    lines = [f"Tuned for {tuning['objective']} ({source}): chose **{chosen['label']}**, "
             f"{_fmt(tuning['speedup_vs_ar'])}x AR at its own best batch ({ar['label']}) by {versus}.", ""]
    lines += [f"- {note}" for note in tuning.get("notes", [])]
    actors = tuning.get("actors") or {}
    if len(set(actors.values())) > 1:
        lines += [f"- actor {actor.split('/')[0][:8]}/{actor.split('/')[-1]}: {label}" for actor, label in actors.items()]
    lines += ["", "| " + " | ".join(TUNING_COLUMNS) + " |", "|" + " --- |" * len(TUNING_COLUMNS)]
    for c in tuning["candidates"]:
        cells = _tuning_cells(c)
        mark = "**" if c["label"] == chosen["label"] else ""
        lines.append("| " + " | ".join(f"{mark}{cell}{mark}" for cell in cells) + " |")
    return lines


def _picture(item: str) -> str:
    """A plot's Markdown, or the line that stands for it."""
    return f"![{item}]({item})" if item.endswith(".png") else f"_{item}_"


def _title(summary: dict[str, Any]) -> str:
    """The report's first line: a job made with dummy weights says so there."""
    return f"Job {summary['job_id']}" + (f" ({DUMMY_TITLE})" if _dummy(summary) else "")


def _dummy(summary: dict[str, Any]) -> bool:
    return summary.get("load_format") == "dummy"


def render_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    overall, shards = _rows(summary)
    lines = [f"# {_title(summary)}", "", *([f"**{DUMMY_NOTE}**", ""] if _dummy(summary) else []), _headline(summary),
             "", "| number | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in overall]
    if summary["overall"].get("bleu_signature"):
        lines += ["", f"sacrebleu signatures: BLEU `{summary['overall']['bleu_signature']}`, "
                      f"chrF `{summary['overall']['chrf_signature']}`"]
    lines += ["", "## Shards", "", "| " + " | ".join([*SHARD_COLUMNS, "nodes"]) + " |",
              "|" + " --- |" * (len(SHARD_COLUMNS) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in shards]
    if summary.get("tuning"):
        lines += ["", "## Tuning", ""] + tuning_lines(summary["tuning"])
    lines += ["", "## Plots", ""] + [_picture(p) for p in plots] + [""]
    return "\n".join(lines)


def render_html(summary: dict[str, Any], plots: list[str]) -> str:
    overall, shards = _rows(summary)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in [*SHARD_COLUMNS, "nodes"])
    body = [f"<h1>{esc(_title(summary))}</h1>", *([f"<p><strong>{esc(DUMMY_NOTE)}</strong></p>"] if _dummy(summary)
                                                  else []), f"<p>{esc(_headline(summary))}</p>", "<table>"]
    body += [f"<tr><td>{esc(n)}</td><td>{esc(v)}</td></tr>" for n, v in overall]
    body += ["</table>", "<h2>Shards</h2>", f"<table><tr>{head}</tr>"]
    body += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in shards]
    body += ["</table>"]
    if summary.get("tuning"):
        tuning = summary["tuning"]
        rows = [_tuning_cells(c) for c in tuning["candidates"]]
        body += ["<h2>Tuning</h2>", f"<p>{esc(tuning_lines(tuning)[0].replace('**', ''))}</p>", "<table><tr>"
                 + "".join(f"<th>{esc(c)}</th>" for c in TUNING_COLUMNS) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows] + ["</table>"]
    body += ["<h2>Plots</h2>"] + [f'<img src="{esc(p)}" alt="{esc(p)}">' if p.endswith(".png") else
                                  f"<p><em>{esc(p)}</em></p>" for p in plots]
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}td,th{padding:2px 8px;border:1px solid #ccc}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" + \
        "\n".join(body) + "</body></html>\n"


def _headline(summary: dict[str, Any]) -> str:
    return (f"{summary['task']} with {summary['method']} ({summary['verify']} verification), target "
            f"{summary['target']}, drafter {summary['drafter']}: {summary['docs']} documents in "
            f"{summary['shards']} shards on {len(summary['nodes'])} node(s), {summary['errors']} rows refused."
            + _tuned(summary.get("tuning"), summary.get("baseline")) + _io(summary.get("run")))


def _tuned(tuning: dict[str, Any] | None, baseline: dict[str, Any] | None) -> str:
    """What tuning chose, and what speedup_vs_ar and agreement_with_ar were measured on."""
    if not tuning:
        return _against_ar(baseline)
    chosen = sorted(set(tuning["actors"].values()))
    ran = f" Tuned by measurement (see Tuning): it ran {', '.join(chosen)}."
    if all(label.startswith("ar ") for label in chosen) and not (baseline or {}).get("docs"):
        return ran + " That is AR at AR's own best batch: its speedup_vs_ar is 1 by definition."
    return ran + _against_ar(baseline)


def _io(run: dict[str, Any] | None) -> str:
    """The job store's share of the shards' time (io_s per shard: reading it, writing its results)."""
    if not run or run.get("io_share") is None:
        return ""
    return (f" Reading shards and writing their results took {_fmt(run['sum_io_s'])} s of the "
            f"{_fmt(run['sum_shard_s'])} s the actors spent on shards ({run['io_share']:.1%}).")


def _against_ar(baseline: dict[str, Any] | None) -> str:
    """What speedup_vs_ar and agreement_with_ar were measured on."""
    if not baseline or not baseline.get("docs"):
        return " No document was also decoded with AR (execution.baseline 0, or the method is AR): no speedup_vs_ar."
    return (f" Against AR on {baseline['docs']} of its documents, decoded also with AR on the same actors: "
            f"{_fmt(baseline['speedup_vs_ar'])}x ({_fmt(baseline['tokens_per_s'])} against "
            f"{_fmt(baseline['ar_tokens_per_s'])} tokens/s), agreement {_fmt(baseline['agreement_with_ar'])}.")


def write_report(store: JobStore, manifest: Manifest, summary: dict[str, Any]) -> str:
    """Write plots, report.md and report.html; return the report.md location."""
    counts = read_trace_counts(store, manifest)
    plots = [plot_throughput(store, summary), plot_tuning(store, summary.get("tuning")),
             plot_k_histogram(store, counts), plot_calibration(store, counts)]
    plots = [p for p in plots if p]
    store.write_bytes("report.md", render_markdown(summary, plots).encode())
    store.write_bytes("report.html", render_html(summary, plots).encode())
    return f"{store.uri}/report.md"
