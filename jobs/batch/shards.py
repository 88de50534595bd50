"""Deterministic sharding: the same corpus and settings always give the same shards, byte for byte.

The good rows are cut, in corpus order, into contiguous shards of nearly equal size; inside a shard rows are
sorted by prompt length (then row) so that a batch pads little. A refused row goes to the errors file of the
shard whose corpus range holds it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from jobs.batch.rows import BadRow, GoodRow
from jobs.batch.spec import ExecutionSpec
from workers.records import SHARD_SCHEMA
from workers.store import JobStore, checksum, error_path, ipc_bytes, result_path, shard_path


@dataclass(frozen=True)
class ShardPlan:
    index: int
    rows: list[GoodRow]  # sorted by (prompt_tokens, row)
    errors: list[BadRow]


def shard_count(good_rows: int, execution: ExecutionSpec) -> int:
    """execution.shards, or one shard per shard_rows rows and at least two per actor; never above the rows."""
    wanted = execution.shards or max(math.ceil(good_rows / execution.shard_rows), 2 * execution.actors)
    return max(1, min(wanted, good_rows))


def plan_shards(good: list[GoodRow], bad: list[BadRow], n_shards: int) -> list[ShardPlan]:
    assert good, "a job needs at least one good row"
    chunks = [good[i * len(good) // n_shards:(i + 1) * len(good) // n_shards] for i in range(n_shards)]
    starts = [0] + [chunk[0].row for chunk in chunks[1:]]  # the first corpus row each shard covers
    errors: list[list[BadRow]] = [[] for _ in chunks]
    for row in bad:
        errors[bisect.bisect_right(starts, row.row) - 1].append(row)
    return [ShardPlan(i, sorted(chunk, key=lambda r: (r.prompt_tokens, r.row)), errors[i])
            for i, chunk in enumerate(chunks)]


def shard_table(plan: ShardPlan) -> pa.Table:
    columns = {name: [getattr(r, name) for r in plan.rows] for name in SHARD_SCHEMA.names}
    return pa.table(columns, schema=SHARD_SCHEMA)


def write_shards(store: JobStore, plans: list[ShardPlan]) -> list[dict[str, Any]]:
    """Write every shard and errors file; return the manifest's shard entries."""
    entries = []
    for plan in plans:
        data = ipc_bytes(shard_table(plan))
        store.write_bytes(shard_path(plan.index), data)
        if plan.errors:
            store.write_jsonl(error_path(plan.index), [e.to_record() for e in plan.errors])
        entries.append({"index": plan.index, "path": shard_path(plan.index), "rows": len(plan.rows),
                        "checksum": checksum(data), "errors": len(plan.errors), "result": result_path(plan.index)})
    return entries
