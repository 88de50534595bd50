"""The reducer: check that every good row is in exactly one result file, then write summary.json.

Numbers follow DESIGN.md's table: the per-document DocStats counts are summed (per shard, per job) and the
rates are computed once from the sums. agreement_with_ar and speedup_vs_ar need an AR run over the same
documents (the nightly eval does that); a single job leaves them null.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cmsd.stats import DocStats
from jobs.errors import JobFailed
from jobs.batch.manifest import SUMMARY, Manifest
from jobs.batch.quality import quality
from jobs.batch.spec import JobSpec
from workers.store import JobStore, error_path, read_ipc

COUNTS = tuple(f.name for f in fields(DocStats))


def numbers(table: pa.Table, task: str) -> dict[str, Any]:
    """Summed counts, rates from the sums, and quality scores, for any set of result rows."""
    sums = {name: pc.sum(table.column(name)).as_py() or 0 for name in COUNTS}
    out: dict[str, Any] = DocStats(**sums).to_dict()
    out.update(quality(task, table.column("hypothesis").to_pylist(), table.column("reference").to_pylist()))
    out.update(agreement_with_ar=None, speedup_vs_ar=None)
    return out


def read_results(store: JobStore, manifest: Manifest) -> list[pa.Table]:
    missing = [e.result for e in manifest.shards if store.parquet_rows(e.result) != e.rows]
    if missing:
        raise JobFailed(f"{len(missing)} shard(s) not done ({', '.join(missing[:3])}...): run `cmsd-jobs resume`")
    return [store.read_parquet(e.result) for e in manifest.shards]


def check_integrity(store: JobStore, manifest: Manifest, results: list[pa.Table]) -> None:
    """Every good row of every shard is in its result file, once; no row is in two files or refused too."""
    seen: dict[int, int] = {}
    refused = {r["row"] for e in manifest.shards if e.errors for r in store.read_jsonl(error_path(e.index))}
    for entry, table in zip(manifest.shards, results):
        expected = sorted(read_ipc(store.read_bytes(entry.path)).column("row").to_pylist())
        got = sorted(table.column("row").to_pylist())
        if got != expected:
            lost, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            raise JobFailed(f"{entry.result} does not match {entry.path}: rows missing {lost[:5]}, "
                            f"unexpected {extra[:5]}, {len(got)} rows for {len(expected)}")
        for row in got:
            if row in seen or row in refused:
                where = f"shard {seen[row]}" if row in seen else "errors"
                raise JobFailed(f"row {row} is in {entry.result} and also in {where}")
            seen[row] = entry.index


def reduce_job(store: JobStore, manifest: Manifest, spec: JobSpec, run: dict[str, Any] | None) -> dict[str, Any]:
    """Check the results and write summary.json; `run` is the last driver run's report, if any."""
    results = read_results(store, manifest)
    check_integrity(store, manifest, results)
    task, overall = spec.task.name, numbers(pa.concat_tables(results), spec.task.name)
    per_shard = [{"shard": e.index, "rows": t.num_rows, "nodes": sorted(set(t.column("node_id").to_pylist())),
                  "attempt": max(t.column("attempt").to_pylist()), **numbers(t, task)}
                 for e, t in zip(manifest.shards, results)]
    summary = {
        "job_id": manifest.job_id, "task": task, "method": spec.decode.method, "verify": spec.decode.verify,
        "target": spec.models.target, "drafter": spec.models.drafter, "corpus": manifest.corpus,
        "docs": sum(t.num_rows for t in results), "errors": sum(e.errors for e in manifest.shards),
        "shards": len(manifest.shards), "nodes": sorted({n for s in per_shard for n in s["nodes"]}),
        "overall": overall, "per_method": {spec.decode.method: overall}, "per_shard": per_shard,
        "run": _run_numbers(run, overall),
    }
    store.write_json(SUMMARY, summary)
    return summary


def _run_numbers(run: dict[str, Any] | None, overall: dict[str, Any]) -> dict[str, Any] | None:
    """The driver's own cost: job wall time against the decode time it bought."""
    if run is None:
        return None
    wall = run["wall_s"]
    return {**run, "job_tokens_per_s": overall["new_tokens"] / wall if wall > 0 else None,
            "decode_parallelism": run["sum_decode_s"] / wall if wall > 0 else None}
