"""The job directory on any pyarrow filesystem (a local path or an object-store URI).

Every file is written under a temporary name in its final folder and then renamed (moved): a reader sees
a whole file or none. A shard is done when its result file exists and accounts for the manifest's row count:
its rows plus the rows the worker refused (too long for the model), which its metadata counts and
errors/shard-NNNNN.worker.jsonl lists (written before the result file).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"  # files being written; never read as results
REFUSED_KEY = b"cmsd.refused_rows"  # result file metadata: the shard's rows the worker refused


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_path(index: int) -> str:
    return f"shards/{shard_name(index)}.arrow"


def result_path(index: int) -> str:
    return f"results/{shard_name(index)}.parquet"


def trace_path(index: int) -> str:
    return f"traces/{shard_name(index)}.parquet"


def error_path(index: int) -> str:
    """The rows the driver refused while preparing the job, in this shard's range of the corpus."""
    return f"errors/{shard_name(index)}.jsonl"


def worker_error_path(index: int) -> str:
    """The shard's rows the worker refused (too long for the model)."""
    return f"errors/{shard_name(index)}.worker.jsonl"


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def normalize_uri(location: str) -> str:
    """A local path becomes absolute; a URI (scheme://...) is kept as it is."""
    if "://" in location:
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location))


class JobStore:
    """Reads and writes files relative to one job directory, through pyarrow.fs."""

    def __init__(self, uri: str) -> None:
        self.uri = normalize_uri(uri)
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # picklable for Ray: rebuilt from the URI
        return (JobStore, (self.uri,))

    def _full(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._full(rel)).type != pafs.FileType.NotFound

    def list(self, folder: str) -> list[str]:
        """Names of the committed files in a folder (temporary files left out), sorted."""
        selector = pafs.FileSelector(self._full(folder), allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(name for name in names if not name.startswith(TMP_PREFIX))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._full(rel)) as stream:
            return stream.read()

    @contextmanager
    def open_output(self, rel: str) -> Iterator[pa.NativeFile]:
        """A stream that writes `rel` under a temporary name in the same folder, renamed once the block ends
        without an error: all or nothing."""
        folder, _, name = rel.rpartition("/")
        self.fs.create_dir(self._full(folder), recursive=True)
        tmp = self._full(f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}" if folder else f"{TMP_PREFIX}{name}")
        with self.fs.open_output_stream(tmp) as stream:
            yield stream
        self.fs.move(tmp, self._full(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_output(rel) as stream:
            stream.write(data)

    def checksum(self, rel: str) -> str:
        """The checksum of a file's bytes (what `checksum` gives), read in blocks."""
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self._full(rel)) as stream:
            while block := stream.read(1 << 22):
                digest.update(block)
        return "sha256:" + digest.hexdigest()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())

    def write_jsonl(self, rel: str, records: list[dict[str, Any]]) -> None:
        self.write_bytes(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())

    def read_jsonl(self, rel: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read_bytes(rel).decode().splitlines() if line.strip()]

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.write_bytes(rel, sink.getvalue())

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self._full(rel), columns=columns, filesystem=self.fs)

    def delete(self, rel: str = "") -> None:
        """Remove a folder and everything in it (the whole job directory by default)."""
        self.fs.delete_dir(self._full(rel))

    def result_counts(self, rel: str) -> tuple[int, int] | None:
        """(rows, rows the worker refused) of a committed result file, or None when it is not there."""
        if not self.exists(rel):
            return None
        with self.fs.open_input_file(self._full(rel)) as handle:
            meta = pq.ParquetFile(handle).metadata
        return meta.num_rows, int((meta.metadata or {}).get(REFUSED_KEY, b"0"))


def ipc_bytes(table: pa.Table) -> bytes:
    """An Arrow IPC file in memory: the same table always gives the same bytes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.py_buffer(data)).read_all()
