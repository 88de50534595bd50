"""A job's life: create (check, write the job directory), submit (create, run, reduce, report), resume, status.
The CLI calls these."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from jobs.batch.driver import Observer, run_shards
from jobs.errors import BadInput, JobFailed
from jobs.batch.manifest import SPEC, SUMMARY, Manifest, done_counts, load_manifest, unfinished
from jobs.batch.prepare import create_job, prepare
from jobs.batch.progress import make_progress
from jobs.batch.reducer import reduce_job
from jobs.batch.report import write_report
from jobs.batch.spec import JobSpec, apply_overrides
from workers.store import JobStore, StoreError, check_store, error_path, worker_error_path


@dataclass(frozen=True)
class JobResult:
    uri: str  # the job directory
    summary: dict[str, Any]
    report: str  # report.md


def create(spec: JobSpec, stream: TextIO = sys.stderr) -> tuple[JobStore, JobSpec, Manifest]:
    """Check the job and write its directory (spec, manifest, shards, errors); `resume` runs it."""
    store, spec, manifest = create_job(prepare(spec))
    print(f"job {manifest.job_id}: {manifest.rows} documents in {len(manifest.shards)} shards, "
          f"{manifest.corpus['bad']} rows refused -> {store.uri}", file=stream, flush=True)
    return store, spec, manifest


def submit(spec: JobSpec, observer: Observer | None = None, stream: TextIO = sys.stderr) -> JobResult:
    store, spec, manifest = create(spec, stream)
    return execute(store, spec, manifest, observer, stream)


def load_job(job_dir: str, overrides: dict[str, Any] | None = None) -> tuple[JobStore, JobSpec, Manifest]:
    try:
        check_store(job_dir)
    except StoreError as err:
        raise BadInput(str(err)) from None
    store = JobStore(job_dir)
    manifest = load_manifest(store)
    try:
        data = yaml.safe_load(store.read_bytes(SPEC))
    except (OSError, yaml.YAMLError) as err:
        raise BadInput(f"cannot read {store.uri}/{SPEC}: {err}") from err
    return store, JobSpec.from_dict(apply_overrides(data, overrides or {})), manifest


def resume(job_dir: str, overrides: dict[str, Any] | None = None, observer: Observer | None = None,
           stream: TextIO = sys.stderr) -> JobResult:
    """Run only the shards that are not done, then reduce and report."""
    store, spec, manifest = load_job(job_dir, overrides)
    return execute(store, spec, manifest, observer, stream)


def execute(store: JobStore, spec: JobSpec, manifest: Manifest, observer: Observer | None = None,
            stream: TextIO = sys.stderr) -> JobResult:
    for folder in ("results", "traces", "errors"):  # what writes interrupted with an earlier run left (local disks)
        store.remove_temporary(folder)
    todo = unfinished(store, manifest)
    print(f"{len(manifest.shards) - len(todo)} of {len(manifest.shards)} shards done; running {len(todo)}",
          file=stream, flush=True)
    run = None
    if todo:
        progress = make_progress(len(todo), sum(e.rows for e in todo), stream) if observer is None else None
        try:
            plan = baseline_plan(spec, manifest)
            tasks = [e.task(baseline=plan.get(e.index, 0)) for e in todo]
            report = run_shards(spec, store.uri, tasks, observer or progress, [e.rows for e in manifest.shards])
        except KeyboardInterrupt:
            print(f"interrupted: finish the job with `cmsd-jobs resume {store.uri}`", file=stream, flush=True)
            raise
        finally:
            if progress:
                progress.close()
        if report.failed:
            failed = ", ".join(f"shard {i}: {err}" for i, err in sorted(report.failed.items()))
            raise JobFailed(f"{len(report.failed)} shard(s) failed after {spec.execution.retries} retries "
                            f"({failed}); fix the cause and run `cmsd-jobs resume {store.uri}`")
        run = report.to_dict()
    summary = reduce_job(store, manifest, spec, run)
    return JobResult(uri=store.uri, summary=summary, report=write_report(store, manifest, summary))


def baseline_plan(spec: JobSpec, manifest: Manifest) -> dict[int, int]:
    """Shard -> how many of its documents are also decoded with AR: execution.baseline documents in groups of
    decode.batch_size (so the comparison runs at the job's batch size), the groups spread evenly over the shards.
    The same for a job and its resumption; none for AR itself, nor for a tuned job (its tuning measured AR)."""
    wanted = spec.execution.baseline if spec.decode.method != "ar" and not spec.execution.tune else 0
    shards = manifest.shards
    if not wanted or not shards:
        return {}
    group = min(spec.decode.batch_size, wanted)
    groups = -(-wanted // group)
    plan: dict[int, int] = {}
    for g in range(groups):
        entry = shards[g * len(shards) // groups]
        size = min(group, wanted - g * group)
        plan[entry.index] = min(entry.rows, plan.get(entry.index, 0) + size)
    return plan


def report_only(job_dir: str) -> JobResult:
    """Rewrite summary.json (when missing) and the report of a finished job."""
    store, spec, manifest = load_job(job_dir)
    summary = store.read_json(SUMMARY) if store.exists(SUMMARY) else reduce_job(store, manifest, spec, None)
    return JobResult(uri=store.uri, summary=summary, report=write_report(store, manifest, summary))


def status(job_dir: str) -> dict[str, Any]:
    """Shards and rows done; rows refused by the driver and, in the shards done, by the workers."""
    store, spec, manifest = load_job(job_dir)
    counts = {e.index: done_counts(store, e) for e in manifest.shards}
    done = [e for e in manifest.shards if counts[e.index]]
    by_workers = {i: c[1] for i, c in counts.items() if c}
    return {"job": store.uri, "job_id": manifest.job_id, "method": spec.decode.method,
            "shards_done": len(done), "shards": len(manifest.shards),
            "rows_done": sum(e.rows for e in done), "rows": manifest.rows,
            "rows_refused": sum(e.errors for e in manifest.shards) + sum(by_workers.values()),
            "error_files": [error_path(e.index) for e in manifest.shards if e.errors]
            + [worker_error_path(i) for i, n in by_workers.items() if n],
            "unfinished": [i for i, c in counts.items() if not c],
            "summary": store.exists(SUMMARY), "state": "done" if len(done) == len(manifest.shards) else "unfinished"}
