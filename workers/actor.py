"""The Ray actor that holds one drafter/target pair and decodes whole shards.

The models are loaded once, in the constructor; torch, transformers and cmsd are imported there too, so that
importing this module (as the driver does) stays light. The driver wraps the class with `ray.remote`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from workers.protocol import ShardOutcome, ShardTask, WorkerConfig, WorkerInfo
from workers.records import result_table, trace_table
from workers.store import JobStore, checksum, read_ipc, result_path, shard_path, trace_path

if TYPE_CHECKING:
    import pyarrow as pa


class ShardWorker:
    """Decodes shards of one job: read the shard, decode it in batches, commit traces then results."""

    def __init__(self, config: WorkerConfig) -> None:
        start = time.perf_counter()
        import torch  # heavy imports here, in the actor process only

        from cmsd import Decoder, load_pair

        torch.set_num_threads(config.threads)
        self._pair = load_pair(target=config.target, drafter=config.drafter, device=config.device,
                               dtype=config.dtype)
        self._decoder = Decoder(self._pair, config.decode)
        self._store = JobStore(config.job_uri)
        self._info = WorkerInfo(pid=os.getpid(), node_id=_node_id(), device=str(self._pair.device),
                                load_s=time.perf_counter() - start, weights_mb=_weights_mb(self._pair))

    def info(self) -> WorkerInfo:
        return self._info

    def pid(self) -> int:
        return self._info.pid

    def run_shard(self, task: ShardTask) -> ShardOutcome:
        from cmsd import DocStats  # already loaded by the constructor

        start = time.perf_counter()
        shard = self._read_shard(task)
        t0 = time.perf_counter()
        generations = self._decoder.generate(shard.column("prompt").to_pylist(), shard.column("id").to_pylist())
        decode_s = time.perf_counter() - t0
        extra = {"shard": task.index, "attempt": task.attempt, "node_id": self._info.node_id}
        results = result_table(shard, generations, extra)
        self._store.write_parquet(trace_path(task.index), trace_table(generations))
        self._store.write_parquet(result_path(task.index), results)  # last: the commit
        total = DocStats.total([g.stats for g in generations])
        return ShardOutcome(index=task.index, rows=results.num_rows, attempt=task.attempt,
                            node_id=self._info.node_id, pid=self._info.pid, decode_s=decode_s,
                            wall_s=time.perf_counter() - start, stats=total.to_dict(), peak_rss_mb=_peak_rss_mb())

    def _read_shard(self, task: ShardTask) -> pa.Table:
        data = self._store.read_bytes(shard_path(task.index))
        if checksum(data) != task.checksum:
            raise ValueError(f"{shard_path(task.index)}: checksum {checksum(data)} != manifest {task.checksum}")
        shard = read_ipc(data)
        if shard.num_rows != task.rows:
            raise ValueError(f"{shard_path(task.index)}: {shard.num_rows} rows, manifest says {task.rows}")
        return shard


def _weights_mb(pair) -> float:
    models = [pair.target.model] + ([pair.drafter.model] if hasattr(pair.drafter, "model") else [])
    tensors = [t for m in models for t in [*m.parameters(), *m.buffers()]]
    return sum({t.data_ptr(): t.nbytes for t in tensors}.values()) / 2**20  # tied weights counted once


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
