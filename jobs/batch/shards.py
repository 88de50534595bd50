"""Deterministic sharding, written as the corpus streams by: the same corpus and spec give the same shards, byte
for byte.

The good rows are cut, in corpus order, into contiguous shards: `execution.shard_rows` rows each (the last one
shorter) or, when the user sets `execution.shards` or the corpus has fewer than two shards per actor, that many
nearly equal shards (`shard_sizes`). A shard is written as the corpus streams by and renamed into place as
soon as the next good row shows it is complete; inside it rows are sorted by the characters of their source (a
cheap proxy for prompt length, so that a batch pads little), then row, in windows of WINDOW_ROWS rows (the whole
shard unless it is larger). A refused row goes to the errors file of the shard whose corpus range holds it:
from the shard's first good row up to the next shard's first good row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from jobs.batch.rows import BadRow, GoodRow
from jobs.batch.spec import ExecutionSpec
from workers.records import SHARD_SCHEMA
from workers.store import JobStore, error_path, result_path, shard_path

Checked = GoodRow | BadRow
WINDOW_ROWS = 4096  # a shard's rows are sorted by length in windows of this many rows
HELD_ROWS = 16384  # the most good rows held back to learn whether a corpus has two shards per actor


def shard_count(good_rows: int, execution: ExecutionSpec) -> int:
    """execution.shards, or one shard per shard_rows rows and at least two per actor; never above the rows."""
    wanted = execution.shards or max(math.ceil(good_rows / execution.shard_rows), 2 * execution.actors)
    return max(1, min(wanted, good_rows))


def equal_sizes(good_rows: int, shards: int) -> list[int]:
    """Good rows per shard when `good_rows` are cut into `shards` nearly equal contiguous shards."""
    return [(i + 1) * good_rows // shards - i * good_rows // shards for i in range(shards)]


def shard_sizes(execution: ExecutionSpec, rows: Iterator[Checked],
                count: Callable[[], int]) -> tuple[Iterator[int], Iterator[Checked]]:
    """The good rows each shard gets, and the rows to write them from.

    Shards of shard_rows good rows, unless execution.shards is set or the corpus has fewer than two shards per
    actor (2 x actors x shard_rows good rows): then nearly equal shards. Whether it has is learnt by holding
    that many rows back, or, past HELD_ROWS, and always with execution.shards, by `count()` (a counting pass).
    """
    ahead = 2 * execution.actors * execution.shard_rows
    if execution.shards or ahead > HELD_ROWS:
        good = count()
    else:
        held, good = [], 0
        for row in rows:
            held.append(row)
            good += isinstance(row, GoodRow)
            if good >= ahead:
                break
        rows = itertools.chain(held, rows)
    if execution.shards or good < ahead:
        return iter(equal_sizes(good, shard_count(good, execution))), rows
    return itertools.repeat(execution.shard_rows), rows


def shard_table(rows: list[GoodRow]) -> pa.Table:
    ordered = sorted(rows, key=lambda r: (len(r.source), r.row))
    return pa.table({name: [getattr(r, name) for r in ordered] for name in SHARD_SCHEMA.names}, schema=SHARD_SCHEMA)


@dataclass
class ShardWriter:
    """Takes checked rows in corpus order and writes each shard (and its errors file) once it is complete.

    A shard's rows are written in windows of at most `window` rows, each sorted by length: what the writer
    holds is one window and the open shard's refused rows, however large the shard.
    """

    store: JobStore
    sizes: Iterator[int]  # good rows per shard, in shard order
    window: int = WINDOW_ROWS
    entries: list[dict[str, Any]] = field(default_factory=list)  # the manifest's shard entries, as written
    rows_read: int = 0  # corpus rows seen so far
    good: int = 0
    bad: int = 0
    first_bad: BadRow | None = None
    _start: int = 0  # the first corpus row of the open shard's range
    _size: int = -1  # the good rows the open shard takes (-1: not drawn yet)
    _rows: int = 0  # the good rows the open shard has
    _pending: list[GoodRow] = field(default_factory=list)  # its good rows not written yet (one window at most)
    _errors: list[BadRow] = field(default_factory=list)  # the refused rows of its range
    _file: ExitStack = field(default_factory=ExitStack)  # its shard file while it is open
    _ipc: pa.ipc.RecordBatchFileWriter | None = None

    def add(self, row: Checked) -> None:
        self.rows_read = row.row + 1
        if isinstance(row, BadRow):
            self.bad += 1
            self.first_bad = self.first_bad or row
            self._errors.append(row)
            return
        if self._size < 0:
            self._size = next(self.sizes)
        if self._rows == self._size:  # the open shard is complete: this row starts the next one
            self._close(stop=row.row)
            self._start, self._size = row.row, next(self.sizes)
        if len(self._pending) == self.window:
            self._flush()
        self.good += 1
        self._rows += 1
        self._pending.append(row)

    def add_all(self, rows: Iterable[Checked]) -> None:
        for row in rows:
            self.add(row)

    def finish(self) -> list[dict[str, Any]]:
        """Write the last shard (its range runs to the end of the corpus); return every shard's entry."""
        if self._rows:
            self._close(stop=self.rows_read)
        return self.entries

    def _flush(self) -> None:
        if self._ipc is None:
            stream = self._file.enter_context(self.store.open_output(shard_path(len(self.entries))))
            self._ipc = pa.ipc.new_file(stream, SHARD_SCHEMA)
        self._ipc.write_table(shard_table(self._pending))
        self._pending = []

    def _close(self, stop: int) -> None:
        index = len(self.entries)
        self._flush()
        assert self._ipc is not None
        self._ipc.close()
        self._file.close()  # the shard file is renamed into place
        if self._errors:
            self.store.write_jsonl(error_path(index), [e.to_record() for e in self._errors])
        self.entries.append({"index": index, "path": shard_path(index), "rows": self._rows,
                             "checksum": self.store.checksum(shard_path(index)), "errors": len(self._errors),
                             "result": result_path(index), "start": self._start, "stop": stop})
        self._rows, self._errors, self._ipc = 0, [], None
