"""Commit made-up results for every shard of a prepared job, through the workers' own writer code, so that the
reducer and the report can be measured at corpus scale without decoding anything.

    python scripts/make_corpus.py /tmp/corpus-200k.jsonl --rows 200000
    cmsd-jobs submit --corpus /tmp/corpus-200k.jsonl --prepare-only --out /tmp/runs --job-id bench
    python scripts/fake_results.py /tmp/runs/bench
    /usr/bin/time -v cmsd-jobs report /tmp/runs/bench     # the reducer and the report: peak RSS, wall time

Each row's hypothesis is the first words of its source, with fixed per-document counts and `--trace-tokens`
drafted tokens in the traces; files are written as a worker writes them (workers.records, JobStore).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmsd import TRACE_COLUMNS, DocStats, Generation  # noqa: E402
from workers.records import result_table, trace_table  # noqa: E402
from workers.store import JobStore, read_ipc, result_path, trace_path  # noqa: E402


def fake_generation(doc_id: str, source: str, trace_tokens: int) -> Generation:
    stats = DocStats(docs=1, new_tokens=48, decode_s=1.5, latency_s=1.5, target_calls=20, drafted=40, accepted=28,
                     iterations=20, rollbacks=6)
    trace = {name: [0.5 if name.startswith("c") or name == "tau_t" else 1 for _ in range(trace_tokens)]
             for name in TRACE_COLUMNS}
    trace.update(doc_id=[doc_id] * trace_tokens, iteration=[i // 2 for i in range(trace_tokens)],
                 accepted=[i % 3 != 0 for i in range(trace_tokens)])
    return Generation(doc_id, list(range(48)), 100, stats, "length", " ".join(source.split()[:30]), trace)


def write_fake_results(job_dir: str, trace_tokens: int = 16) -> int:
    """Commit results and traces for every shard of the job in job_dir; returns the rows written."""
    store = JobStore(job_dir)
    rows = 0
    for entry in store.read_json("manifest.json")["shards"]:
        shard = read_ipc(store.read_bytes(entry["path"]))
        ids, sources = shard.column("id").to_pylist(), shard.column("source").to_pylist()
        generations = [fake_generation(i, s, trace_tokens) for i, s in zip(ids, sources)]
        store.write_parquet(trace_path(entry["index"]), trace_table(generations))
        extra = {"shard": entry["index"], "attempt": 1, "node_id": "fake"}
        store.write_parquet(result_path(entry["index"]), result_table(shard, generations, extra))
        rows += shard.num_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_dir")
    parser.add_argument("--trace-tokens", type=int, default=16, help="drafted tokens per document in the traces")
    args = parser.parse_args()
    print(f"{write_fake_results(args.job_dir, args.trace_tokens)} result rows written in {args.job_dir}")


if __name__ == "__main__":
    main()
