"""A job's life: submit (check, create, run, reduce, report), resume, status. The CLI calls these."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from jobs.batch.driver import Observer, run_shards
from jobs.errors import BadInput, JobFailed
from jobs.batch.manifest import SPEC, SUMMARY, Manifest, is_done, load_manifest, unfinished
from jobs.batch.prepare import create_job, prepare
from jobs.batch.progress import make_progress
from jobs.batch.reducer import reduce_job
from jobs.batch.report import write_report
from jobs.batch.spec import JobSpec, apply_overrides
from workers.store import JobStore, error_path


@dataclass(frozen=True)
class JobResult:
    uri: str  # the job directory
    summary: dict[str, Any]
    report: str  # report.md


def submit(spec: JobSpec, observer: Observer | None = None, stream: TextIO = sys.stderr) -> JobResult:
    prepared = prepare(spec)  # every check; nothing written yet
    store, manifest = create_job(prepared)
    print(f"job {manifest.job_id}: {manifest.rows} documents in {len(manifest.shards)} shards, "
          f"{manifest.corpus['bad']} rows refused -> {store.uri}", file=stream, flush=True)
    return execute(store, prepared.spec, manifest, observer, stream)


def load_job(job_dir: str, overrides: dict[str, Any] | None = None) -> tuple[JobStore, JobSpec, Manifest]:
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
    todo = unfinished(store, manifest)
    print(f"{len(manifest.shards) - len(todo)} of {len(manifest.shards)} shards done; running {len(todo)}",
          file=stream, flush=True)
    run = None
    if todo:
        progress = make_progress(len(todo), sum(e.rows for e in todo), stream) if observer is None else None
        try:
            report = run_shards(spec, store.uri, [e.task() for e in todo], observer or progress)
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


def report_only(job_dir: str) -> JobResult:
    """Rewrite summary.json (when missing) and the report of a finished job."""
    store, spec, manifest = load_job(job_dir)
    summary = store.read_json(SUMMARY) if store.exists(SUMMARY) else reduce_job(store, manifest, spec, None)
    return JobResult(uri=store.uri, summary=summary, report=write_report(store, manifest, summary))


def status(job_dir: str) -> dict[str, Any]:
    store, spec, manifest = load_job(job_dir)
    done = [e for e in manifest.shards if is_done(store, e)]
    return {"job": store.uri, "job_id": manifest.job_id, "method": spec.decode.method,
            "shards_done": len(done), "shards": len(manifest.shards),
            "rows_done": sum(e.rows for e in done), "rows": manifest.rows,
            "rows_refused": sum(e.errors for e in manifest.shards),
            "error_files": [error_path(e.index) for e in manifest.shards if e.errors],
            "unfinished": [e.index for e in manifest.shards if e not in done],
            "summary": store.exists(SUMMARY), "state": "done" if len(done) == len(manifest.shards) else "unfinished"}
