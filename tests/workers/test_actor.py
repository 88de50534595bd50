"""The worker actor: one drafter/target pair loaded once, a shard decoded and committed (traces, then results)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmsd import DecodeSettings
from workers import ShardTask, ShardWorker, WorkerConfig
from workers.records import SHARD_SCHEMA, TRACE_SCHEMA
from workers.store import checksum, ipc_bytes, result_path, shard_path, trace_path

SOURCES = ["the cat sat on the mat and the cat sat on the mat", "a b c d a b c d a b", "one two three one two"]


def write_shard(job: Path, tokenizer, index: int = 0) -> ShardTask:
    """A shard as the driver writes it: rows sorted by prompt length, with the rendered prompt."""
    rows = sorted(({"row": i, "id": f"d{i}", "source": s, "reference": "ref" if i else None, "prompt": s,
                    "prompt_tokens": len(tokenizer(s)["input_ids"])} for i, s in enumerate(SOURCES)),
                  key=lambda r: (r["prompt_tokens"], r["row"]))
    data = ipc_bytes(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
    (job / "shards").mkdir(parents=True, exist_ok=True)
    (job / shard_path(index)).write_bytes(data)
    return ShardTask(index=index, rows=len(rows), checksum=checksum(data))


def config(job: Path, target: Path, method: str = "cmasd") -> WorkerConfig:
    settings = DecodeSettings(method=method, max_new_tokens=8, batch_size=2)
    drafter = None if method == "ar" else "ngram"
    return WorkerConfig(job_uri=str(job), target=str(target), drafter=drafter, decode=settings, device="cpu")


def test_importing_workers_loads_neither_torch_nor_ray() -> None:
    code = "import sys, workers; print(sorted(m for m in ('torch', 'ray', 'transformers', 'jobs') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"


def test_worker_decodes_a_shard_and_commits_results_and_traces(tmp_path: Path, tiny_target: Path) -> None:
    worker = ShardWorker(config(tmp_path, tiny_target))  # the class itself, without Ray
    task = write_shard(tmp_path, worker._pair.tokenizer)
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


def test_a_shard_that_does_not_match_the_manifest_is_refused(tmp_path: Path, tiny_target: Path) -> None:
    worker = ShardWorker(config(tmp_path, tiny_target))
    task = write_shard(tmp_path, worker._pair.tokenizer)
    with pytest.raises(ValueError, match="checksum"):
        worker.run_shard(ShardTask(index=0, rows=task.rows, checksum="sha256:0"))
    assert not (tmp_path / "results").exists()


def test_worker_as_a_ray_actor(tmp_path: Path, tiny_target: Path, ray_local: str) -> None:
    import ray

    actor = ray.remote(ShardWorker).options(num_cpus=1).remote(config(tmp_path, tiny_target, method="ar"))
    info = ray.get(actor.info.remote())
    assert info.pid != os.getpid() and info.node_id == ray.get_runtime_context().get_node_id()
    from transformers import AutoTokenizer

    task = write_shard(tmp_path, AutoTokenizer.from_pretrained(tiny_target))
    outcome = ray.get(actor.run_shard.remote(task))
    ray.kill(actor)
    assert outcome.node_id == info.node_id and outcome.pid == info.pid
    assert pq.read_metadata(tmp_path / result_path(0)).num_rows == 3
    assert pq.read_table(tmp_path / trace_path(0)).num_rows == 0  # AR drafts nothing
