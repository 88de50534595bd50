"""manifest.json: the job's shards (path, rows, checksum), its corpus, and model and code versions.

It is written last when a job is created, so a directory with a manifest is a whole job. A shard is done when
its result file exists and accounts for the row count the manifest gives (its rows plus those the worker
refused as too long for the model).
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from jobs.errors import BadInput
from workers.protocol import ShardTask
from workers.store import JobStore

MANIFEST = "manifest.json"
SPEC = "spec.yaml"
SUMMARY = "summary.json"
FORMAT_VERSION = 2  # 2: shards cover corpus ranges (start, stop); workers render prompts and refuse long ones


@dataclass(frozen=True)
class ShardEntry:
    index: int
    path: str  # shards/shard-00000.arrow
    rows: int  # good rows in the shard = rows its result file has + rows the worker refused
    checksum: str  # sha256 of the shard file's bytes
    errors: int  # rows refused by the driver, written to errors/shard-00000.jsonl
    result: str  # results/shard-00000.parquet
    start: int  # the corpus rows this shard covers (its rows and its errors): start <= row < stop
    stop: int

    def task(self, attempt: int = 1, baseline: int = 0) -> ShardTask:
        return ShardTask(index=self.index, rows=self.rows, checksum=self.checksum, attempt=attempt,
                         baseline=baseline)


@dataclass(frozen=True)
class Manifest:
    job_id: str
    created: str  # ISO time
    corpus: dict[str, Any]  # path, format, rows, good, bad
    shards: tuple[ShardEntry, ...]
    models: dict[str, Any]
    code: dict[str, Any]
    format: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(**{**data, "shards": tuple(ShardEntry(**s) for s in data["shards"])})


def load_manifest(store: JobStore) -> Manifest:
    if not store.exists(MANIFEST):
        raise BadInput(f"{store.uri} is not a job directory (no {MANIFEST})")
    try:
        data = store.read_json(MANIFEST)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')}, this version reads {FORMAT_VERSION}")
        return Manifest.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise BadInput(f"{store.uri}/{MANIFEST} is not a manifest this version can read: {err}") from err


def done_counts(store: JobStore, entry: ShardEntry) -> tuple[int, int] | None:
    """(rows decoded, rows the worker refused) of a done shard; None when the shard is not done."""
    counts = store.result_counts(entry.result)
    return counts if counts is not None and sum(counts) == entry.rows else None


def is_done(store: JobStore, entry: ShardEntry) -> bool:
    return done_counts(store, entry) is not None


def unfinished(store: JobStore, manifest: Manifest) -> list[ShardEntry]:
    return [entry for entry in manifest.shards if not is_done(store, entry)]


def code_versions() -> dict[str, Any]:
    """The versions of this code and of the libraries the numbers depend on."""
    out: dict[str, Any] = {"python": platform.python_version(), "git_commit": _git_commit()}
    for package in ("cmsd-jobs", "torch", "transformers", "ray", "pyarrow", "sacrebleu", "rouge-score"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def _git_commit() -> str | None:
    """The commit of the checkout this code runs from (None when it is not a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None
