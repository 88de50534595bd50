"""The worker actor: one drafter/target pair loaded once, a shard decoded and committed (traces, then results)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmsd import DecodeSettings, PromptTemplate
from workers import ShardTask, ShardWorker, WorkerConfig
from workers.records import SHARD_SCHEMA, TRACE_SCHEMA
from workers.store import JobStore, checksum, ipc_bytes, result_path, shard_path, trace_path, worker_error_path

SOURCES = ["the cat sat on the mat and the cat sat on the mat", "a b c d a b c d a b", "one two three one two"]


def write_shard(job: Path, index: int = 0, sources: list[str] = SOURCES) -> ShardTask:
    """A shard as the driver writes it: rows sorted by the length of their source."""
    rows = sorted(({"row": i, "id": f"d{i}", "source": s, "reference": "ref" if i else None, "src_lang": None,
                    "tgt_lang": None} for i, s in enumerate(sources)), key=lambda r: (len(r["source"]), r["row"]))
    data = ipc_bytes(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    (job / "shards").mkdir(parents=True, exist_ok=True)
    (job / shard_path(index)).write_bytes(data)
    return ShardTask(index=index, rows=len(rows), checksum=checksum(data))


def config(job: Path, target: Path, method: str = "cmasd") -> WorkerConfig:
    settings = DecodeSettings(method=method, max_new_tokens=8, batch_size=2)
    drafter = None if method == "ar" else "ngram"
    return WorkerConfig(job_uri=str(job), target=str(target), drafter=drafter, decode=settings,
                        prompt=PromptTemplate("plain", chat=False), device="cpu")


def test_importing_workers_loads_neither_torch_nor_ray() -> None:
    code = "import sys, workers; print(sorted(m for m in ('torch', 'ray', 'transformers', 'jobs') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"


def test_worker_decodes_a_shard_and_commits_results_and_traces(tmp_path: Path, tiny_target: Path) -> None:
    worker = ShardWorker(config(tmp_path, tiny_target))  # the class itself, without Ray
    task = write_shard(tmp_path)
    outcome = worker.run_shard(task)
    results = pq.read_table(tmp_path / result_path(0))
    assert outcome.rows == results.num_rows == 3
    assert sorted(results.column("id").to_pylist()) == ["d0", "d1", "d2"]
    assert results.column("reference").to_pylist().count(None) == 1
    for name in ("hypothesis", "new_tokens", "decode_s", "target_calls", "acceptance_rate", "node_id", "attempt"):
        assert name in results.column_names
    assert outcome.stats["new_tokens"] == sum(results.column("new_tokens").to_pylist()) == 3 * 8
    traces = pq.read_table(tmp_path / trace_path(0))
    assert traces.schema == TRACE_SCHEMA and traces.num_rows == outcome.stats["drafted"]
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".tmp")]
    assert JobStore(str(tmp_path)).result_counts(result_path(0)) == (3, 0) and not (tmp_path / "errors").exists()


@pytest.mark.parametrize("method, baseline, compared", [("cmasd", 2, 2), ("cmasd", 0, 0), ("ar", 2, 0)])
def test_baseline_documents_are_also_decoded_with_ar(tmp_path: Path, tiny_target: Path, method: str, baseline: int,
                                                     compared: int) -> None:
    worker = ShardWorker(config(tmp_path, tiny_target, method))
    task = write_shard(tmp_path)
    outcome = worker.run_shard(ShardTask(task.index, task.rows, task.checksum, baseline=baseline))
    results = pq.read_table(tmp_path / result_path(0)).to_pylist()
    ar = [r for r in results if r["ar_decode_s"] is not None]
    assert len(ar) == compared and outcome.rows == 3 and worker.progress() == (0, 3)  # documents, AR's not counted
    for row in ar:  # strict: the same tokens as AR
        assert row["ar_new_tokens"] == row["new_tokens"] == row["ar_matches"] == row["ar_positions"] == 8
        assert row["ar_decode_s"] > 0


def test_baseline_indices_spread_over_the_shard() -> None:
    from workers.protocol import spread

    assert spread(10, 3) == [0, 4, 9] and spread(10, 1) == [5] and spread(3, 8) == [0, 1, 2] and spread(5, 0) == []


def test_a_prompt_too_long_for_the_model_is_refused_once_and_the_shard_goes_on(tmp_path: Path,
                                                                               tiny_target: Path) -> None:
    """The tiny target's context is 512 tokens: 504 for the prompt with 8 new tokens."""
    worker = ShardWorker(config(tmp_path, tiny_target))
    long = "word " * 600
    task = write_shard(tmp_path, sources=[SOURCES[0], long, SOURCES[1], long + "more"])
    outcome = worker.run_shard(task)
    results = pq.read_table(tmp_path / result_path(0))
    assert sorted(results.column("row").to_pylist()) == [0, 2] and (outcome.rows, outcome.refused) == (2, 2)
    refused = JobStore(str(tmp_path)).read_jsonl(worker_error_path(0))
    assert [(r["row"], r["id"]) for r in refused] == [(1, "d1"), (3, "d3")]
    assert refused[0]["reason"].startswith("too long for the model: prompt of 60") and "> 504" in refused[0]["reason"]
    assert JobStore(str(tmp_path)).result_counts(result_path(0)) == (2, 2)  # the commit accounts for all 4 rows
    worker.run_shard(task)  # a retry writes the same files again: each refused row is listed once
    assert JobStore(str(tmp_path)).read_jsonl(worker_error_path(0)) == refused


def test_a_shard_of_refused_rows_only_commits_an_empty_result(tmp_path: Path, tiny_target: Path) -> None:
    worker = ShardWorker(config(tmp_path, tiny_target))
    outcome = worker.run_shard(write_shard(tmp_path, sources=["word " * 600]))
    results = pq.read_table(tmp_path / result_path(0))
    assert (outcome.rows, outcome.refused, results.num_rows) == (0, 1, 0)
    assert {"new_tokens", "decode_s", "acceptance_rate", "attempt"} <= set(results.column_names)


def test_a_shard_that_does_not_match_the_manifest_is_refused(tmp_path: Path, tiny_target: Path) -> None:
    worker = ShardWorker(config(tmp_path, tiny_target))
    task = write_shard(tmp_path)
    with pytest.raises(ValueError, match="checksum"):
        worker.run_shard(ShardTask(index=0, rows=task.rows, checksum="sha256:0"))
    assert not (tmp_path / "results").exists()


def test_worker_as_a_ray_actor(tmp_path: Path, tiny_target: Path, ray_local: str) -> None:
    import ray

    actor = ray.remote(ShardWorker).options(num_cpus=1).remote(config(tmp_path, tiny_target, method="ar"))
    info = ray.get(actor.info.remote())
    assert info.pid != os.getpid() and info.node_id == ray.get_runtime_context().get_node_id()
    task = write_shard(tmp_path)
    outcome = ray.get(actor.run_shard.remote(task))
    ray.kill(actor)
    assert outcome.node_id == info.node_id and outcome.pid == info.pid
    assert pq.read_metadata(tmp_path / result_path(0)).num_rows == 3
    assert pq.read_table(tmp_path / trace_path(0)).num_rows == 0  # AR drafts nothing
