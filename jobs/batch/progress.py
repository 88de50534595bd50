"""Progress while a job runs: a tqdm bar over documents on a terminal, one log line per event otherwise (and a
line with the documents done every LOG_EVERY_S while shards are decoding)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from workers.protocol import ShardOutcome, ShardTask, WorkerInfo

LOG_EVERY_S = 30.0


def _rate(outcome: ShardOutcome) -> float:
    return outcome.stats.get("new_tokens", 0) / outcome.decode_s if outcome.decode_s > 0 else 0.0


class LogProgress:
    """One line per event on a stream (for logs and pipes)."""

    def __init__(self, shards: int, rows: int, stream: TextIO = sys.stderr) -> None:
        self.shards, self.rows, self.stream = shards, rows, stream
        self.done_shards = self.done_rows = 0
        self.running: dict[int, int] = {}  # shard -> documents done so far, while it decodes
        self.start = self.said = time.perf_counter()

    def _say(self, text: str) -> None:
        self.said = time.perf_counter()
        print(f"[{self.said - self.start:7.1f}s] {text}", file=self.stream, flush=True)

    def actor_ready(self, info: WorkerInfo) -> None:
        self._say(f"actor pid {info.pid} ready on node {info.node_id[:8]} ({info.device}, "
                  f"models loaded in {info.load_s:.1f}s)")

    def shard_started(self, task: ShardTask, worker: WorkerInfo) -> None:
        self._say(f"shard {task.index} ({task.rows} rows) -> actor pid {worker.pid}"
                  + (f", attempt {task.attempt}" if task.attempt > 1 else ""))

    def shard_finished(self, outcome: ShardOutcome) -> None:
        self._said_shard(outcome.index)
        self.done_shards += 1
        self.done_rows += outcome.rows + outcome.refused
        refused = f" ({outcome.refused} too long, refused)" if outcome.refused else ""
        self._say(f"shard {outcome.index} done: {outcome.rows} rows{refused}, {_rate(outcome):.1f} tokens/s "
                  f"({self.done_shards}/{self.shards} shards, {self.done_rows}/{self.rows} rows)")

    def shard_progress(self, task: ShardTask, docs: int) -> None:
        """A decoding shard has finished `docs` of its documents (reported every few seconds)."""
        self.running[task.index] = docs
        if time.perf_counter() - self.said >= LOG_EVERY_S:
            self._say(f"{self.done_rows + sum(self.running.values())}/{self.rows} documents done")

    def _said_shard(self, index: int) -> int:
        """Forget a shard's running count (it finished or failed); returns it."""
        return self.running.pop(index, 0)

    def shard_failed(self, task: ShardTask, error: str, retry: bool) -> None:
        self._said_shard(task.index)
        self._say(f"shard {task.index} attempt {task.attempt} failed: {error}"
                  + ("; retrying" if retry else "; no retries left"))

    def close(self) -> None:
        pass


class BarProgress(LogProgress):
    """A bar over documents; failures and actor events are written above it."""

    def __init__(self, shards: int, rows: int, stream: TextIO = sys.stderr) -> None:
        super().__init__(shards, rows, stream)
        self.bar = tqdm(total=rows, unit="doc", file=stream, dynamic_ncols=True)

    def _say(self, text: str) -> None:
        self.bar.write(text, file=self.stream)

    def shard_started(self, task: ShardTask, worker: WorkerInfo) -> None:
        pass

    def shard_progress(self, task: ShardTask, docs: int) -> None:
        self.bar.update(docs - self.running.get(task.index, 0))
        self.running[task.index] = docs

    def shard_failed(self, task: ShardTask, error: str, retry: bool) -> None:
        self.bar.update(-self.running.get(task.index, 0))  # its documents are decoded again
        super().shard_failed(task, error, retry)

    def shard_finished(self, outcome: ShardOutcome) -> None:
        self.done_shards += 1
        self.bar.update(outcome.rows + outcome.refused - self._said_shard(outcome.index))
        self.bar.set_postfix(shards=f"{self.done_shards}/{self.shards}", tok_s=f"{_rate(outcome):.1f}")

    def close(self) -> None:
        self.bar.close()


def make_progress(shards: int, rows: int, stream: TextIO = sys.stderr) -> LogProgress:
    return BarProgress(shards, rows, stream) if stream.isatty() else LogProgress(shards, rows, stream)
