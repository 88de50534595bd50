"""The reducer, one shard at a time: the same numbers as over all results at once, and the integrity check with
rows the workers refused. Results are made up (scripts/fake_results.py), not decoded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.batch.lifecycle import create, status
from jobs.batch.quality import quality
from jobs.batch.reducer import reduce_job
from jobs.batch.spec import JobSpec
from jobs.errors import JobFailed
from tests.raytest import articles, write_jsonl
from workers.store import REFUSED_KEY, JobStore, result_path, worker_error_path

ROOT = Path(__file__).parents[2]


def fake_results_module():
    spec = importlib.util.spec_from_file_location("fake_results", ROOT / "scripts" / "fake_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def job(tmp_path: Path, tiny_target: Path) -> tuple[JobStore, JobSpec, object]:
    rows = articles(20)
    for i, row in enumerate(rows):
        row["reference"] = " ".join(row["source"].split()[i % 5:20])  # references that overlap unevenly
    corpus = write_jsonl(tmp_path / "docs.jsonl", rows)
    spec = JobSpec.from_dict({"corpus": {"path": str(corpus)}, "task": {"name": "plain"},
                              "models": {"target": str(tiny_target)}, "execution": {"shards": 3},
                              "output": {"dir": str(tmp_path / "runs"), "job_id": "fake"}})
    store, spec, manifest = create(spec)
    fake_results_module().write_fake_results(store.uri, trace_tokens=4)
    return store, spec, manifest


def test_shard_by_shard_numbers_equal_those_over_all_results(job) -> None:
    store, spec, manifest = job
    summary = reduce_job(store, manifest, spec, None)
    table = pa.concat_tables([pq.read_table(Path(store.uri) / e.result) for e in manifest.shards])
    whole = quality("plain", table.column("hypothesis").to_pylist(), table.column("reference").to_pylist())
    overall = summary["overall"]
    for name in ("bleu", "chrf", "bleu_signature", "chrf_signature", "scored_docs"):
        assert overall[name] == whole[name], name  # sacrebleu's corpus scores from summed statistics: exact
    for name in ("rouge1", "rouge2", "rougeL"):
        assert overall[name] == pytest.approx(whole[name], rel=1e-12)
    assert overall["new_tokens"] == sum(table.column("new_tokens").to_pylist()) == 20 * 48
    assert [s["rows"] for s in summary["per_shard"]] == [6, 7, 7] and summary["docs"] == 20


def test_rows_refused_by_a_worker_count_once(job) -> None:
    store, spec, manifest = job
    path = Path(store.uri) / result_path(1)
    results = pq.read_table(path)
    dropped = results.column("row")[0].as_py()
    kept = results.slice(1).replace_schema_metadata({REFUSED_KEY: "1"})
    pq.write_table(kept, path)  # as a worker writes a shard with one row too long for the model
    with pytest.raises(JobFailed, match=rf"does not match .*rows missing \[{dropped}\]"):
        reduce_job(store, manifest, spec, None)  # the refusal is not in the worker's errors file
    store.write_jsonl(worker_error_path(1), [{"row": dropped, "id": "x", "reason": "too long for the model"}])
    summary = reduce_job(store, manifest, spec, None)
    assert summary["docs"] == 19 and summary["errors"] == 1 and summary["per_shard"][1]["refused"] == 1
    assert status(store.uri)["rows_refused"] == 1 and status(store.uri)["state"] == "done"


def test_a_job_whose_every_row_was_refused_fails_naming_why(job) -> None:
    store, spec, manifest = job
    for entry in manifest.shards:  # as workers write shards whose every prompt is too long for the model
        path = Path(store.uri) / entry.result
        results = pq.read_table(path)
        pq.write_table(results.slice(0, 0).replace_schema_metadata({REFUSED_KEY: str(results.num_rows)}), path)
        store.write_jsonl(worker_error_path(entry.index), [{"row": r, "id": "x", "reason": "too long for the model"}
                                                           for r in results.column("row").to_pylist()])
    with pytest.raises(JobFailed, match="no document could be decoded: all 20 rows were refused"):
        reduce_job(store, manifest, spec, None)


def test_a_job_measured_its_plan_when_any_of_its_actors_did() -> None:
    from jobs.batch.reducer import tuning_summary

    def plan(source: str, label: str) -> dict:
        return {"source": source, "seconds": 0.0 if source == "reused" else 2.5, "chosen": {"label": label}}

    # the actor that started second found the plan the first kept a moment before: the job still measured it
    run = {"tuning": {"node/1": plan("reused", "ar b4"), "node/2": plan("measured", "ar b4")}}
    summary = tuning_summary(run)
    assert summary["source"] == "measured" and summary["seconds"] == 2.5
    assert summary["actors"] == {"node/1": "ar b4", "node/2": "ar b4"}
    both = tuning_summary({"tuning": {"node/2": plan("reused", "ar b1"), "node/1": plan("reused", "ar b4")}})
    assert both["source"] == "reused" and both["chosen"]["label"] == "ar b4"  # the first actor's
    assert tuning_summary({}) is None and tuning_summary(None) is None
