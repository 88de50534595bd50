"""The job directory on any pyarrow filesystem (a local path or an object-store URI such as s3://bucket/runs).

A reader sees a whole file or none, by the means each kind of storage has:
- on a local (or mounted) disk, a file is written under a temporary name in its final folder and renamed into place
  (a rename is atomic there); a temporary file an interrupted attempt left behind is never listed or read as a
  result, and `remove_temporary` clears them when a job resumes;
- on an object store there is no rename (pyarrow's move is a copy and a delete), but an object PUT is atomic: the
  object appears whole when its upload completes, or not at all. So the file is built in memory and written to its
  final key in one upload, started only once the whole file is there: an attempt that fails or dies before then
  writes nothing, and no temporary object is ever made. Two attempts of one shard (a retried shard whose first
  attempt still runs) write the same key, each whole: the last one stands, and both hold the same documents.
A shard is done when its result file exists, reads as Parquet and accounts for the manifest's row count: its rows
plus the rows the worker refused (too long for the model), which its metadata counts and
errors/shard-NNNNN.worker.jsonl lists (written before the result file). Object-store requests are retried with the
AWS SDK's standard backoff (S3_ATTEMPTS), so a store that is away for a few seconds does not fail a shard.
Credentials come from the environment (the AWS_* variables, a Kubernetes Secret) or pyarrow's usual sources, never
from a spec: nothing here prints or stores them.
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

TMP_PREFIX = ".tmp-"  # files being written (local disks only); never read as results
S3_ATTEMPTS = 6  # tries per S3 request: the SDK's standard retries wait up to 1, 2, 4, 8 s (with jitter) in between
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


class StoreError(Exception):
    """A job directory that cannot be used: its store unreachable, its bucket missing, access denied."""


def open_filesystem(uri: str, attempts: int = S3_ATTEMPTS) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and path for a local path or URI; an S3 filesystem retries each request `attempts`
    times (pyarrow's own default is 3, a fraction of a second in all)."""
    fs, root = pafs.FileSystem.from_uri(uri)
    if fs.type_name == "s3":
        options = fs.__reduce__()[1][0]  # what from_uri resolved (endpoint, region, scheme, ...)
        options = {**options, "region": fs.region}
        fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    return fs, root


def check_store(uri: str) -> None:
    """Fail fast (StoreError, naming the URI and the cause) where a job directory on an object store cannot be
    written: the endpoint unreachable, the bucket missing, the credentials refused. Local paths pass."""
    uri = normalize_uri(uri)
    if "://" not in uri or uri.startswith("file://"):
        return
    try:
        fs, root = open_filesystem(uri, attempts=2)
        bucket = root.split("/")[0]
        info = fs.get_file_info(bucket)
    except (OSError, pa.ArrowInvalid) as err:
        raise StoreError(_store_error(uri, err)) from None
    if info.type == pafs.FileType.NotFound:
        raise StoreError(f"{uri}: bucket {bucket!r} does not exist (cmsd-jobs creates no bucket: create it first)")


def _store_error(uri: str, err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "ACCESS_DENIED" in text or "INVALID_ACCESS_KEY" in text or "SIGNATURE" in text.upper():
        return (f"{uri}: access denied ({text}): check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "in the environment, or the Kubernetes Secret) and the bucket's policy")
    if "NETWORK_CONNECTION" in text or "connect" in text.lower() or "resolve" in text.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f" at {endpoint} (AWS_ENDPOINT_URL)" if endpoint else ""
        return f"{uri}: cannot reach the object store{where}: {text}"
    return f"{uri}: {text}"


class JobStore:
    """Reads and writes files relative to one job directory, through pyarrow.fs."""

    def __init__(self, uri: str) -> None:
        self.uri = normalize_uri(uri)
        self.fs, self.root = open_filesystem(self.uri)
        self.renames = isinstance(self.fs, pafs.LocalFileSystem)  # atomic renames: local disks (not object stores)

    def __reduce__(self) -> tuple[type, tuple[str]]:  # picklable for Ray: rebuilt from the URI
        return (JobStore, (self.uri,))

    def _full(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._full(rel)).type != pafs.FileType.NotFound

    def list(self, folder: str) -> list[str]:
        """Names of the committed files in a folder (temporary files left out), sorted."""
        return sorted(name for name in self._file_names(folder) if not name.startswith(TMP_PREFIX))

    def _file_names(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self._full(folder), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._full(rel)) as stream:
            return stream.read()

    @contextmanager
    def open_output(self, rel: str) -> Iterator[pa.NativeFile]:
        """A stream that writes `rel` all or nothing, once the block ends without an error: on a local disk under a
        temporary name in the same folder, then renamed; on an object store into memory, then one upload."""
        folder, _, name = rel.rpartition("/")
        if not self.renames:
            sink = pa.BufferOutputStream()
            yield sink
            data = sink.getvalue()  # the whole file: only now does its upload start
            with self.fs.open_output_stream(self._full(rel)) as stream:
                stream.write(data)
            return
        self.fs.create_dir(self._full(folder), recursive=True)
        tmp = self._full(f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}" if folder else f"{TMP_PREFIX}{name}")
        with self.fs.open_output_stream(tmp) as stream:
            yield stream
        self.fs.move(tmp, self._full(rel))

    def remove_temporary(self, folder: str) -> None:
        """Delete what interrupted writes left in a folder: temporary files, on a local disk (an object store never
        has any). Only for a job no attempt is writing to (a resume: the driver's actors died with it)."""
        if not self.renames:
            return
        for name in self._file_names(folder):
            if name.startswith(TMP_PREFIX):
                self.fs.delete_file(self._full(f"{folder}/{name}"))

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
        try:
            with self.fs.open_input_file(self._full(rel)) as handle:
                meta = pq.ParquetFile(handle).metadata
        except pa.ArrowInvalid:  # not a whole Parquet file (written by other means than this store): not done
            return None
        return meta.num_rows, int((meta.metadata or {}).get(REFUSED_KEY, b"0"))


def ipc_bytes(table: pa.Table) -> bytes:
    """An Arrow IPC file in memory: the same table always gives the same bytes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.py_buffer(data)).read_all()
