"""One evaluation run: check everything, time every method and peer, analyse, compare, write.

    1. read the suite, check the models (no weights) and the corpora: any problem is a BadInput, nothing written
    2. measure (eval_measure): in this process, or in Ray actors
    3. numbers per method (eval_metrics), calibration (eval_calibration), the sweep (eval_sweep)
    4. regressions against the suite's floors and the previous run (eval_history); append to the history
    5. write <out>/<run id>/: summary.json, results.parquet, traces.parquet, chosen_settings.yaml, plots/, reports
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.errors import BadInput
from jobs.eval.calibration import calibrate, ece_columns
from jobs.eval.docs import DocSet, prepare_docs
from jobs.eval.history import append_history, docs_key, previous_run, read_history, regressions
from jobs.eval.measure import Measurements, measure, measure_on_ray, stderr_log
from jobs.eval.metrics import TASK_METRICS, method_rows
from jobs.eval.plots import plot_calibration, plot_k_histogram, plot_pareto, plot_trend
from jobs.eval.report import RunRecord, write_report
from jobs.eval.suite import Suite, load_suite
from jobs.eval.sweep import choose, sweep_points, write_settings
from jobs.batch.manifest import code_versions
from jobs.batch.quality import DUMMY_NOTE
from jobs.batch.models import check_models

MACHINE_KEYS = ("platform", "machine", "python", "cpu_count", "torch", "transformers", "device", "gpu", "threads",
                "dtype", "load_avg_mean", "load_avg_max")


def run_eval(suite_file: str, out: str | None, history: str | None, address: str | None,
             load_format: str | None = None) -> tuple[RunRecord, Path]:
    """Run the suite; returns the run's record and its directory. Raises BadInput (exit 2) before writing.
    out: where run directories go (None: beside the history, else ./eval-runs); history: None = OUT/history;
    load_format: overrides the suite's models.load_format (dummy: random weights, no quality scores)."""
    start = time.perf_counter()
    suite, docs = check_inputs(suite_file, address, load_format)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{suite.name}"
    root = Path(out) if out else Path(history).parent / "eval" if history else Path("eval-runs")
    out_dir, history_dir = root / run_id, Path(history) if history else root / "history"
    out_dir.mkdir(parents=True, exist_ok=False)
    stderr_log(f"eval {suite.name}: {len(docs.test)} documents, {len(docs.validation)} validation; writing {out_dir}")
    timing = measure_on_ray if suite.execution.uses_ray else measure
    meas = timing(suite, docs.test, docs.validation, stderr_log)
    rec = analyse(RunRecord(run_id=run_id, started=started, suite=suite, docs=docs, key=docs_key(docs.test, suite),
                            code=code_versions(), meas=meas, rows=[]), out_dir)
    past = read_history(history_dir)
    previous = previous_run(past, suite.name, rec.key, run_id)
    rec.previous_id = previous[0]["run_id"] if previous else None
    found = regressions(rec.rows, previous, suite)
    busy = suite.execution.busy_load > 0 and meas.busy > suite.execution.busy_load
    rec.regressions = [r for r in found if not (busy and r.timing)]
    rec.warnings = [r for r in found if busy and r.timing]
    mine = history_rows(rec)
    append_history(history_dir, run_id, mine)
    rec.history = [r for r in past if r.get("suite") == suite.name  # the trend: runs of the same kind of weights
                   and (r.get("load_format") or "auto") == suite.models.load_format] + mine
    rec.wall_s = time.perf_counter() - start
    write_outputs(rec, out_dir)
    return rec, out_dir


def check_inputs(suite_file: str, address: str | None, load_format: str | None = None) -> tuple[Suite, DocSet]:
    """The suite, its models (config and tokenizer only) and its documents; BadInput for any problem."""
    from cmsd import DecodeSettings

    suite = load_suite(suite_file)
    if address:
        suite = replace(suite, execution=replace(suite.execution, address=address))
    if load_format:
        suite = replace(suite, models=replace(suite.models, load_format=load_format))
    checked = check_models(suite.models, DecodeSettings(method="ar"))
    for m in suite.methods:  # a method's own drafter: found, and sharing the target's tokenizer
        if m.drafter not in (None, suite.models.drafter):
            try:
                check_models(replace(suite.models, drafter=m.drafter), DecodeSettings(method="ar"))
            except BadInput as err:
                raise BadInput(f"methods {m.name!r}: {err}") from err
    docs = prepare_docs(suite, checked.tokenizer, checked.max_context)
    sweep = suite.sweep
    if sweep and sweep.quality != "agreement_with_ar" and not any(
            sweep.quality in TASK_METRICS[c.task] for c in suite.corpora):
        raise BadInput(f"suite {suite_file}: sweep.quality {sweep.quality!r} is not scored on any corpus of the suite")
    return suite, docs


def analyse(rec: RunRecord, out_dir: Path) -> RunRecord:
    """Numbers per method, calibration (ECE columns on the batch-1 rows), the sweep and its chosen settings."""
    rec.rows = method_rows(rec.meas, rec.suite, rec.docs)
    rec.calibrations = calibrate(rec.meas.outputs, rec.suite.calibration_bins)
    for row in rec.rows:
        if row["setting"] == "batch-1" and row["scope"] == "all":
            row.update(ece_columns(rec.calibrations, row["method"]))
    rec.points = sweep_points(rec.rows, rec.meas, rec.suite)
    if rec.suite.sweep is not None and not rec.suite.models.dummy:  # no settings are chosen on a random model
        rec.chosen = choose(rec.points, rec.suite.sweep.min_quality)
    if rec.chosen is not None:
        rec.chosen_path = str(write_settings(rec.chosen, rec.suite, out_dir / "chosen_settings.yaml", rec.run_id))
    return rec


def history_rows(rec: RunRecord) -> list[dict[str, Any]]:
    """This run's rows for the history: run, code, models and machine, the method's settings, every number."""
    meta = {"run_id": rec.run_id, "started": rec.started, "suite": rec.suite.name, "docs_key": rec.key,
            "git_commit": rec.code.get("git_commit"), "target": rec.suite.models.target,
            "drafter": rec.suite.models.drafter, "load_format": rec.suite.models.load_format,
            **{k: rec.meas.machine.get(k) for k in MACHINE_KEYS}}
    info = rec.meas.info
    return [{**meta, **row, "settings": json.dumps(info[row["method"]].settings, sort_keys=True),
             "method_drafter": info[row["method"]].drafter} for row in rec.rows]


def write_outputs(rec: RunRecord, out_dir: Path) -> None:
    """summary.json, the per-document results and traces, the plots and the two reports."""
    summary = {"run_id": rec.run_id, "suite": rec.suite.name, "load_format": rec.suite.models.load_format,
               "started": rec.started, "code": rec.code,
               "machine": rec.meas.machine, "wall_s": rec.wall_s, "load_s": rec.meas.load_s,
               "measure_s": rec.meas.measure_s, "previous_run": rec.previous_id, "skipped": rec.meas.skipped,
               "regressions": [r.message() for r in rec.regressions],
               "warnings": [r.message() for r in rec.warnings], "rows": rec.rows,
               "chosen_settings": rec.chosen_path,
               "notes": [*([DUMMY_NOTE] if rec.suite.models.dummy else []), *rec.docs.notes, *rec.meas.notes]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    pq.write_table(results_table(rec.meas), out_dir / "results.parquet")
    traces = traces_table(rec.meas)
    if traces is not None:
        pq.write_table(traces, out_dir / "traces.parquet")
    folder = out_dir / "plots"
    plots = {"calibration": plot_calibration(rec.calibrations, folder),
             "k_histogram": plot_k_histogram(rec.meas.outputs, folder),
             "trend": plot_trend(rec.history, "speedup_vs_ar", folder)}
    if rec.points and rec.suite.sweep is not None:
        plots["pareto"] = plot_pareto(rec.points, rec.chosen, rec.suite.sweep.speed, rec.suite.sweep.quality, folder)
    write_report(rec, out_dir, plots)


def results_table(meas: Measurements) -> pa.Table:
    rows = [{"setting": o.setting, "method": o.method, "doc_id": o.doc_id, "corpus": o.corpus, "text": o.text,
             "token_ids": o.token_ids, **{k: v for k, v in o.stats.__dict__.items()}} for o in meas.outputs]
    return pa.Table.from_pylist(rows)


def traces_table(meas: Measurements) -> pa.Table | None:
    parts = [pa.table({"setting": [o.setting] * len(o.trace["c"]), "method": [o.method] * len(o.trace["c"]),
                       **o.trace}) for o in meas.outputs if o.trace and o.trace.get("c")]
    return pa.concat_tables(parts) if parts else None
