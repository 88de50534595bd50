"""The reducer: check that every good row is in exactly one result file, then write summary.json.

It reads one shard's results at a time, so that its memory follows the shard size, not the job's: each
shard is checked against its own input (its result rows and the rows its worker refused are the shard's rows,
each once; none is also in the driver's errors), shards cover disjoint corpus ranges (the manifest's start and
stop, which every shard row lies in), and the shard's numbers are added up. Numbers follow DESIGN.md's table:
the per-document DocStats counts are summed (per shard, per job) and the rates are computed once from the
sums; quality scores come from summed sufficient statistics (jobs.batch.quality), none for dummy weights (null, with
a note in `notes`). agreement_with_ar and speedup_vs_ar come from the job's baseline documents, which the workers
also decoded with AR (execution.baseline): AR's decode seconds over the method's on those documents (as `cmsd-jobs
eval` computes it), and the matching token positions over all positions; null where there are none (--baseline 0,
or --method ar). A tuned job decodes none twice: its numbers are its tuning's (the chosen configuration against AR
at AR's best batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cmsd.stats import DocStats
from jobs.errors import JobFailed
from jobs.batch.manifest import SUMMARY, Manifest, ShardEntry, done_counts
from jobs.batch.quality import DUMMY_NOTE, QualityStats, quality_stats
from jobs.batch.spec import JobSpec
from workers.records import BASELINE_COLUMNS
from workers.store import JobStore, error_path, read_ipc, worker_error_path

COUNTS = tuple(f.name for f in fields(DocStats))
RESULT_COLUMNS = ["row", "hypothesis", "reference", "node_id", "attempt", *COUNTS, *BASELINE_COLUMNS]  # read


@dataclass(frozen=True)
class Baseline:
    """Sums over the documents that were also decoded with AR."""

    docs: int = 0
    own_s: float = 0.0  # the method's decode seconds on them
    own_tokens: int = 0
    ar_s: float = 0.0  # AR's
    ar_tokens: int = 0
    matches: int = 0  # token positions where the method's output equals AR's
    positions: int = 0

    @classmethod
    def of(cls, table: pa.Table) -> Baseline:
        rows = table.filter(pc.is_valid(table.column("ar_decode_s")))
        total = {name: pc.sum(rows.column(column)).as_py() or 0 for name, column in (
            ("own_s", "decode_s"), ("own_tokens", "new_tokens"), ("ar_s", "ar_decode_s"),
            ("ar_tokens", "ar_new_tokens"), ("matches", "ar_matches"), ("positions", "ar_positions"))}
        return cls(docs=rows.num_rows, **total)

    def __add__(self, other: Baseline) -> Baseline:
        return Baseline(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def numbers(self) -> dict[str, Any]:
        return {"speedup_vs_ar": self.ar_s / self.own_s if self.docs and self.own_s > 0 else None,
                "agreement_with_ar": self.matches / self.positions if self.positions else None}

    def summary(self) -> dict[str, Any]:
        return {"docs": self.docs, **self.numbers(),
                "tokens_per_s": self.own_tokens / self.own_s if self.own_s > 0 else None,
                "ar_tokens_per_s": self.ar_tokens / self.ar_s if self.ar_s > 0 else None}


def numbers(stats: DocStats, quality: QualityStats, baseline: Baseline = Baseline()) -> dict[str, Any]:
    """Summed counts, rates from the sums, quality scores, and the comparison with AR, for any set of result rows."""
    return {**stats.to_dict(), **quality.scores(), **baseline.numbers()}


def table_stats(table: pa.Table, task: str, scored: bool = True) -> tuple[DocStats, QualityStats]:
    """The summed counts and the quality statistics of some result rows (none where not `scored`: dummy weights)."""
    sums = {name: pc.sum(table.column(name)).as_py() or 0 for name in COUNTS}
    if not scored:
        return DocStats(**sums), QualityStats()
    hyps, refs = table.column("hypothesis").to_pylist(), table.column("reference").to_pylist()
    return DocStats(**sums), quality_stats(task, hyps, refs)


def check_shard(store: JobStore, entry: ShardEntry, results: pa.Table, refused: int) -> None:
    """The shard's rows are its result rows and its worker-refused rows, each once, all in the shard's range;
    none of them is also refused by the driver."""
    expected = sorted(read_ipc(store.read_bytes(entry.path)).column("row").to_pylist())
    refusals = worker_error_path(entry.index)
    by_worker = [r["row"] for r in store.read_jsonl(refusals)] if refused and store.exists(refusals) else []
    got = sorted(results.column("row").to_pylist() + by_worker)
    if got != expected:
        lost, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise JobFailed(f"{entry.result} does not match {entry.path}: rows missing {lost[:5]}, unexpected "
                        f"{extra[:5]}, {results.num_rows} rows and {len(by_worker)} refused for {len(expected)}")
    outside = [row for row in expected[:1] + expected[-1:] if not entry.start <= row < entry.stop]
    if outside:
        raise JobFailed(f"{entry.path}: row {outside[0]} outside the shard's range {entry.start}..{entry.stop - 1}")
    if entry.errors:
        also = set(expected) & {r["row"] for r in store.read_jsonl(error_path(entry.index))}
        if also:
            raise JobFailed(f"row {min(also)} is in {entry.path} and also in {error_path(entry.index)}")


def check_ranges(manifest: Manifest) -> None:
    """Shards cover disjoint corpus ranges, in order: no row can be in two shards."""
    for before, after in zip(manifest.shards, manifest.shards[1:]):
        if after.start < before.stop:
            raise JobFailed(f"shards {before.index} and {after.index} overlap: rows {after.start}..{before.stop - 1}")


def reduce_job(store: JobStore, manifest: Manifest, spec: JobSpec, run: dict[str, Any] | None) -> dict[str, Any]:
    """Check the results and write summary.json; `run` is the last driver run's report, if any."""
    counts = [done_counts(store, e) for e in manifest.shards]
    missing = [e.result for e, c in zip(manifest.shards, counts) if c is None]
    if missing:
        raise JobFailed(f"{len(missing)} shard(s) not done ({', '.join(missing[:3])}...): run `cmsd-jobs resume`")
    check_ranges(manifest)
    task, stats, quality, baseline, per_shard = spec.task.name, DocStats(), QualityStats(), Baseline(), []
    io = (run or {}).get("shard_io_s", {})  # the shards this run decoded (an earlier run's are in its summary)
    for entry, (_, refused) in zip(manifest.shards, counts):  # type: ignore[misc]
        table = store.read_parquet(entry.result, RESULT_COLUMNS)
        check_shard(store, entry, table, refused)
        shard_stats, shard_quality = table_stats(table, task, scored=not spec.models.dummy)
        shard_baseline = Baseline.of(table)
        stats, quality, baseline = stats + shard_stats, quality + shard_quality, baseline + shard_baseline
        per_shard.append({"shard": entry.index, "rows": table.num_rows, "refused": refused,
                          "nodes": sorted(set(table.column("node_id").to_pylist())),
                          "attempt": pc.max(table.column("attempt")).as_py(), "io_s": io.get(str(entry.index)),
                          **numbers(shard_stats, shard_quality, shard_baseline)})
    if not stats.docs:
        refused = sum(e.errors for e in manifest.shards) + sum(s["refused"] for s in per_shard)
        raise JobFailed(f"no document could be decoded: all {refused} rows were refused (errors/ says why, e.g. "
                        "prompts too long for the model with decode.max_new_tokens added)")
    overall = numbers(stats, quality, baseline)
    tuning = tuning_summary(run)
    if tuning and not baseline.docs:  # a tuned job's comparison is its tuning's: the chosen configuration against
        # AR at AR's own best batch (1.0 where that is the choice), measured by real decodes where they fit
        overall.update(speedup_vs_ar=tuning["speedup_vs_ar"], agreement_with_ar=tuning["chosen"]["agreement_with_ar"])
    summary = {
        "job_id": manifest.job_id, "task": task, "method": spec.decode.method, "verify": spec.decode.verify,
        "target": spec.models.target, "drafter": spec.models.drafter, "load_format": spec.models.load_format,
        "notes": [DUMMY_NOTE] if spec.models.dummy else [], "corpus": manifest.corpus,
        "docs": sum(s["rows"] for s in per_shard),
        "errors": sum(e.errors for e in manifest.shards) + sum(s["refused"] for s in per_shard),
        "shards": len(manifest.shards), "nodes": sorted({n for s in per_shard for n in s["nodes"]}),
        "overall": overall, "baseline": baseline.summary(), "per_method": {spec.decode.method: overall},
        "per_shard": per_shard,
        "run": _run_numbers(run, overall), "tuning": tuning,
    }
    store.write_json(SUMMARY, summary)
    return summary


def tuning_summary(run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan the actors tuned (cmsd.tuning): the first actor's that measured in this job (else the first's), with
    every actor's choice ("node/pid": label; the actors of one machine may choose apart, nodes of different kinds
    do). An actor that starts after another of its machine kept a plan reuses it, so the job measured if any did."""
    plans = (run or {}).get("tuning") or {}
    if not plans:
        return None
    order = sorted(plans, key=lambda actor: (plans[actor]["source"] != "measured", actor))
    shown = plans[order[0]]
    notes = shown.get("notes", []) + [f"actor {actor}: {note}" for actor in order[1:]
                                      for note in plans[actor].get("notes", []) if note not in shown.get("notes", [])]
    # (why another actor chose apart)
    return {**shown, "notes": notes,
            "actors": {actor: plan["chosen"]["label"] for actor, plan in sorted(plans.items())}}


def _run_numbers(run: dict[str, Any] | None, overall: dict[str, Any]) -> dict[str, Any] | None:
    """The driver's own cost: job wall time against the decode time it bought."""
    if run is None:
        return None
    wall = run["wall_s"]
    shard_s = run.get("sum_shard_s", 0.0)
    run = {k: v for k, v in run.items() if k != "tuning"}  # summary["tuning"] has it
    return {**run, "job_tokens_per_s": overall["new_tokens"] / wall if wall > 0 else None,
            "decode_parallelism": run["sum_decode_s"] / wall if wall > 0 else None,
            "io_share": run.get("sum_io_s", 0.0) / shard_s if shard_s > 0 else None}
