"""What the driver and a worker actor exchange: small frozen dataclasses, cheap to pickle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cmsd import DecodeSettings, PromptTemplate


@dataclass(frozen=True)
class TuneConfig:
    """How an actor tunes its configuration before its first shard (cmsd.tuning)."""

    objective: str = "throughput"  # throughput | latency
    task: str = ""  # part of the plan's key
    sample: int = 1  # documents of its first shard decoded at batch 1 by the method and by AR
    max_batch: int = 64  # the largest shard's rows: no batch can hold more
    docs: int | None = None  # the documents an actor decodes (what tuning may spend is a share of their time)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything an actor needs to build its drafter/target pair and decoder, once."""

    job_uri: str  # the job directory (local path or pyarrow filesystem URI)
    target: str  # "smollm2", a directory or a hub name
    drafter: str | None  # "ngram", "self", a directory or hub name; None for AR
    decode: DecodeSettings
    prompt: PromptTemplate  # renders a shard row (source, src_lang, tgt_lang) into the prompt
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"  # dummy: random weights of the models' shapes (cmsd.models)
    threads: int = 1  # torch intra-op threads (the actor's CPU share)
    tune: TuneConfig | None = None  # None: decode exactly as `decode` says

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class ShardTask:
    """One shard to decode: where it is and what the manifest promises about it."""

    index: int
    rows: int
    checksum: str  # of the shard's Arrow IPC bytes
    attempt: int = 1
    baseline: int = 0  # of its documents, how many are also decoded with AR (the job's own speedup)


@dataclass(frozen=True)
class WorkerInfo:
    """Where an actor runs, learnt once it has loaded its models."""

    pid: int
    node_id: str
    device: str
    load_s: float  # model load wall seconds in the actor's constructor
    weights_mb: float = 0.0  # bytes of the target's and the drafter's weights and buffers, in MiB


@dataclass(frozen=True)
class ShardOutcome:
    """What a worker reports after committing a shard (its numbers are also in the result file)."""

    index: int
    rows: int  # rows decoded
    attempt: int
    node_id: str
    pid: int
    decode_s: float  # wall seconds inside Decoder.generate
    wall_s: float  # the whole call: read, decode, write
    stats: dict[str, float] = field(default_factory=dict)  # the shard's DocStats, summed
    peak_rss_mb: float = 0.0  # the actor process's peak resident memory so far, in MiB
    refused: int = 0  # rows refused as too long for the model (errors/shard-NNNNN.worker.jsonl)
    io_s: float = 0.0  # of wall_s, seconds reading the shard and writing its files (the job store's share)
    tuning: dict | None = None  # the actor's plan (cmsd.tuning.Plan.to_dict), with the first shard it decoded


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them where k >= n)."""
    k = min(k, n)
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2] if k == 1 else []
