"""Result and trace tables of one shard, built from the decoder's generations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from cmsd.decoder import Generation

# One row per drafted token (DESIGN.md); the names are cmsd's TRACE_COLUMNS.
TRACE_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("iteration", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("c_ent", pa.float32()), ("c_margin", pa.float32()), ("c_soft", pa.float32()), ("c", pa.float32()),
    ("k_j", pa.int32()), ("tau_t", pa.float32()), ("accepted", pa.bool_()), ("target_top1", pa.int32()),
])

# Input columns of a shard (written by the driver, read by the worker).
SHARD_SCHEMA = pa.schema([
    ("row", pa.int64()),  # 0-based row of the corpus
    ("id", pa.string()),
    ("source", pa.string()),
    ("reference", pa.string()),  # null where the corpus has no reference
    ("prompt", pa.string()),  # the rendered prompt the model sees
    ("prompt_tokens", pa.int32()),
])


def result_table(shard: pa.Table, generations: list[Generation], extra: dict[str, Any]) -> pa.Table:
    """id, source, reference, hypothesis and the per-document numbers, in the shard's row order.

    extra: constant columns (shard index, attempt, node id) repeated on every row.
    """
    by_id = {g.doc_id: g for g in generations}
    ids = shard.column("id").to_pylist()
    assert len(by_id) == len(ids) == len(generations), "one generation per shard row"
    gens = [by_id[doc_id] for doc_id in ids]
    columns: dict[str, Any] = {
        "row": shard.column("row"), "id": shard.column("id"), "source": shard.column("source"),
        "reference": shard.column("reference"),
        "hypothesis": pa.array([g.text for g in gens], pa.string()),
        "prompt_tokens": pa.array([g.prompt_tokens for g in gens], pa.int32()),
    }
    numbers = [g.stats.to_dict() for g in gens]
    for name in numbers[0] if numbers else ():
        columns[name] = pa.array([n[name] for n in numbers])
    for name, value in extra.items():
        columns[name] = pa.array([value] * len(gens))
    return pa.table(columns)


def trace_table(generations: list[Generation]) -> pa.Table:
    """All drafted tokens of a shard; an empty table (same schema) where nothing was drafted."""
    parts = [pa.table({name: trace[name] for name in TRACE_SCHEMA.names}, schema=TRACE_SCHEMA)
             for trace in (g.trace for g in generations) if trace]
    return pa.concat_tables(parts) if parts else TRACE_SCHEMA.empty_table()
