"""The job directory store: atomic writes through pyarrow.fs, local paths and URIs alike."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from workers.store import REFUSED_KEY, JobStore, TMP_PREFIX, checksum, ipc_bytes, normalize_uri, read_ipc


@pytest.fixture(params=["path", "uri"])
def store(request: pytest.FixtureRequest, tmp_path) -> JobStore:
    folder = tmp_path / "job"
    return JobStore(str(folder) if request.param == "path" else f"file://{folder}")


def test_write_is_atomic_and_leaves_no_temporary_file(store: JobStore, tmp_path) -> None:
    store.write_bytes("results/a.bin", b"one")
    store.write_bytes("results/a.bin", b"two")  # a rewrite replaces the file whole
    assert store.read_bytes("results/a.bin") == b"two"
    assert [p.name for p in (tmp_path / "job" / "results").iterdir()] == ["a.bin"]


def test_list_skips_files_being_written(store: JobStore, tmp_path) -> None:
    store.write_bytes("results/b.parquet", b"x")
    (tmp_path / "job" / "results" / f"{TMP_PREFIX}123-c.parquet").write_bytes(b"half")
    assert store.list("results") == ["b.parquet"]
    assert store.list("nothing-here") == []


def test_result_counts_are_the_commit_check(store: JobStore) -> None:
    assert store.result_counts("results/shard-00000.parquet") is None
    store.write_parquet("results/shard-00000.parquet", pa.table({"id": ["a", "b", "c"]}))
    assert store.result_counts("results/shard-00000.parquet") == (3, 0)
    assert store.read_parquet("results/shard-00000.parquet").column("id").to_pylist() == ["a", "b", "c"]
    refused = pa.table({"id": ["a"]}).replace_schema_metadata({REFUSED_KEY: "2"})  # 2 rows refused by the worker
    store.write_parquet("results/shard-00001.parquet", refused)
    assert store.result_counts("results/shard-00001.parquet") == (1, 2)


def test_delete_removes_the_job_directory(store: JobStore, tmp_path) -> None:
    store.write_bytes("shards/shard-00000.arrow", b"x")
    store.delete()
    assert not store.exists() and not (tmp_path / "job").exists()


def test_json_and_jsonl_round_trip(store: JobStore) -> None:
    store.write_json("manifest.json", {"a": [1, 2]})
    store.write_jsonl("errors/shard-00001.jsonl", [{"row": 1, "reason": "empty"}, {"row": 5, "reason": "é"}])
    assert store.read_json("manifest.json") == {"a": [1, 2]}
    assert [r["row"] for r in store.read_jsonl("errors/shard-00001.jsonl")] == [1, 5]


def test_store_pickles_by_uri(store: JobStore) -> None:
    again = pickle.loads(pickle.dumps(store))
    assert again.uri == store.uri and again.root == store.root


def test_relative_paths_become_absolute(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert normalize_uri("runs/x") == str(tmp_path / "runs" / "x")
    assert normalize_uri("s3://bucket/runs/") == "s3://bucket/runs"


def test_ipc_bytes_are_deterministic() -> None:
    table = pa.table({"row": [3, 1], "id": ["c", "a"]})
    assert ipc_bytes(table) == ipc_bytes(pa.table({"row": [3, 1], "id": ["c", "a"]}))
    assert checksum(ipc_bytes(table)).startswith("sha256:")
    assert read_ipc(ipc_bytes(table)).equals(table)


def test_remove_temporary_clears_what_an_interrupted_write_left(store: JobStore, tmp_path) -> None:
    store.write_bytes("results/shard-00000.parquet", b"whole")
    (tmp_path / "job" / "results" / f"{TMP_PREFIX}abc-shard-00001.parquet").write_bytes(b"half")
    store.remove_temporary("results")
    assert [p.name for p in (tmp_path / "job" / "results").iterdir()] == ["shard-00000.parquet"]
    store.remove_temporary("nothing-here")  # a folder that does not exist is fine
