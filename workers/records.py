"""Result and trace tables of one shard, built from the decoder's generations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from workers.store import REFUSED_KEY

if TYPE_CHECKING:
    from cmsd.decode import Generation

# One row per drafted token (DESIGN.md); the names are cmsd's TRACE_COLUMNS.
TRACE_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("iteration", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("c_ent", pa.float32()), ("c_margin", pa.float32()), ("c_soft", pa.float32()), ("c", pa.float32()),
    ("k_j", pa.int32()), ("tau_t", pa.float32()), ("accepted", pa.bool_()), ("target_top1", pa.int32()),
])

# Input columns of a shard (written by the driver, read by the worker, which renders the prompts).
SHARD_SCHEMA = pa.schema([
    ("row", pa.int64()),  # 0-based row of the corpus
    ("id", pa.string()),
    ("source", pa.string()),
    ("reference", pa.string()),  # null where the corpus has no reference
    ("src_lang", pa.string()),  # the languages the prompt names (null: the template's default wording)
    ("tgt_lang", pa.string()),
])


# Per document, for the documents also decoded with AR (the job's baseline; null elsewhere): AR's new tokens and
# decode seconds, and the positions where the method's tokens match AR's (cmsd.stats.token_agreement).
BASELINE_COLUMNS = ("ar_new_tokens", "ar_decode_s", "ar_matches", "ar_positions")


def result_table(shard: pa.Table, generations: list[Generation], extra: dict[str, Any], refused: int = 0,
                 baseline: dict[str, Generation] | None = None) -> pa.Table:
    """id, source, reference, hypothesis and the per-document numbers, in the shard's row order.

    shard: the rows decoded (the shard less the refused ones); extra: constant columns (shard index, attempt,
    node id) repeated on every row; refused: the shard's rows the worker refused, kept in the file's metadata;
    baseline: AR's generations of some of the documents, by id (BASELINE_COLUMNS).
    """
    from cmsd.stats import DocStats, token_agreement  # loaded with the decoder already

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
    for name, default in DocStats().to_dict().items():  # typed, so that a shard with no rows has every column
        columns[name] = pa.array([n[name] for n in numbers], pa.int64() if isinstance(default, int) else pa.float64())
    ar = [(baseline or {}).get(g.doc_id) for g in gens]
    agree = [token_agreement([(g.token_ids, a.token_ids)]) if a else None for g, a in zip(gens, ar)]
    columns["ar_new_tokens"] = pa.array([len(a.token_ids) if a else None for a in ar], pa.int64())
    columns["ar_decode_s"] = pa.array([a.stats.decode_s if a else None for a in ar], pa.float64())
    columns["ar_matches"] = pa.array([m[0] if m else None for m in agree], pa.int64())
    columns["ar_positions"] = pa.array([m[1] if m else None for m in agree], pa.int64())
    for name, value in extra.items():
        columns[name] = pa.array([value] * len(gens), pa.scalar(value).type)
    return pa.table(columns).replace_schema_metadata({REFUSED_KEY: str(refused)})


def trace_table(generations: list[Generation]) -> pa.Table:
    """All drafted tokens of a shard; an empty table (same schema) where nothing was drafted."""
    parts = [pa.table({name: trace[name] for name in TRACE_SCHEMA.names}, schema=TRACE_SCHEMA)
             for trace in (g.trace for g in generations) if trace]
    return pa.concat_tables(parts) if parts else TRACE_SCHEMA.empty_table()
