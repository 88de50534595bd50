"""The driver: connect to Ray, keep every worker actor busy from a queue of shards, replace dead actors.

An actor that dies (its process killed, out of memory, its node lost) is replaced, and its shard goes back
on the queue for any actor to take, up to `retries` more attempts. A shard whose decode raised goes back on
the queue the same way. A shard's result file is its commit, so a shard decoded twice is written once.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import ray
from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

from jobs.errors import JobFailed
from jobs.batch.spec import ExecutionSpec, JobSpec
from workers import ShardWorker
from workers.protocol import ShardOutcome, ShardTask, TuneConfig, WorkerConfig, WorkerInfo

ACTOR_DEATHS = (RayActorError, OutOfMemoryError, WorkerCrashedError)
TUNE_DOCS_PER_SAMPLE = 24  # an actor's tuning sample: one document per this many it decodes ...
TUNE_SAMPLE_MAX = 8  # ... and at most this many
PROGRESS_EVERY_S = 2.0  # how often the driver asks decoding actors for their documents done
# Passed to the workers of a cluster when the user has them set (a local Ray inherits the environment): where the
# models and the object store are, never a credential (a runtime_env is shown by Ray's dashboard and job API; a
# cluster's workers get their keys from their own environment, on Kubernetes the Secret `k8s render` wires).
PASSTHROUGH_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "CMSD_CACHE",
                   "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class Observer(Protocol):
    """Hears what the driver does: progress display, logs, tests."""

    def actor_ready(self, info: WorkerInfo) -> None: ...

    def shard_started(self, task: ShardTask, worker: WorkerInfo) -> None: ...

    def shard_finished(self, outcome: ShardOutcome) -> None: ...

    def shard_progress(self, task: ShardTask, docs: int) -> None: ...

    def shard_failed(self, task: ShardTask, error: str, retry: bool) -> None: ...


@dataclass
class RunReport:
    """What one driver run did."""

    outcomes: list[ShardOutcome] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard -> last error, past its retries
    workers: list[WorkerInfo] = field(default_factory=list)
    retries: int = 0  # shard attempts after a failure
    replaced: int = 0  # actors that died and were replaced
    wall_s: float = 0.0  # from the first actor requested to the last shard committed
    ready_s: float = 0.0  # from the first actor requested until the last actor had loaded its models

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "actors_ready_s": self.ready_s, "shards_run": sorted(o.index for o in self.outcomes),
                "retries": self.retries, "actors_replaced": self.replaced, "failed": self.failed,
                "sum_decode_s": sum(o.decode_s for o in self.outcomes),
                "sum_shard_s": sum(o.wall_s for o in self.outcomes),
                "sum_io_s": sum(o.io_s for o in self.outcomes),
                "shard_io_s": {str(o.index): o.io_s for o in self.outcomes},
                "tuning": {f"{o.node_id}/{o.pid}": o.tuning for o in self.outcomes if o.tuning},  # a plan per actor
                "actor_peak_rss_mb": max((o.peak_rss_mb for o in self.outcomes), default=None),
                "workers": [{"pid": w.pid, "node_id": w.node_id, "device": w.device, "load_s": w.load_s,
                             "weights_mb": w.weights_mb} for w in self.workers]}


@dataclass
class _Worker:
    handle: Any  # ray ActorHandle
    info: WorkerInfo | None = None  # known once the actor has loaded its models


class Scheduler:
    """A queue of shard tasks served by a pool of actors made by `spawn`."""

    def __init__(self, spawn: Callable[[], Any], actors: int, retries: int, observer: Observer) -> None:
        self.spawn, self.actors, self.retries, self.observer = spawn, actors, retries, observer
        self.report = RunReport()
        self._queue: deque[ShardTask] = deque()
        self._calls: dict[Any, tuple[_Worker, ShardTask | None]] = {}  # ObjectRef -> (worker, shard or info)
        self._idle: list[_Worker] = []
        self._start_failures = 0
        self._start = 0.0

    def run(self, tasks: list[ShardTask]) -> RunReport:
        self._start = time.perf_counter()
        self._queue.extend(tasks)
        for _ in range(min(self.actors, len(tasks))):
            self._start_worker()
        try:
            while self._queue or self._shards_running():
                self._dispatch()
                ready, _ = ray.wait(list(self._calls), num_returns=1, timeout=PROGRESS_EVERY_S)
                if ready:
                    self._settle(ready[0], *self._calls.pop(ready[0]))
                else:
                    self._poll_progress()
        finally:
            for worker in self._idle + [w for w, _ in self._calls.values()]:
                ray.kill(worker.handle)
        self.report.wall_s = time.perf_counter() - self._start
        return self.report

    def _poll_progress(self) -> None:
        """Ask every actor decoding a shard how many of its documents are done (an actor answers while it decodes);
        an actor that does not answer in time, or died, is skipped (its shard's call tells)."""
        asked = {w.handle.progress.remote(): task for w, task in self._calls.values() if task is not None}
        if not asked:
            return
        ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=PROGRESS_EVERY_S)
        for ref in ready:
            try:
                shard, docs = ray.get(ref)
            except ACTOR_DEATHS + (RayTaskError,):
                continue
            if shard == asked[ref].index:
                self.observer.shard_progress(asked[ref], docs)

    def _shards_running(self) -> bool:
        return any(task is not None for _, task in self._calls.values())

    def _start_worker(self) -> None:
        worker = _Worker(self.spawn())
        self._calls[worker.handle.info.remote()] = (worker, None)

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            worker, task = self._idle.pop(), self._queue.popleft()
            assert worker.info is not None
            self._calls[worker.handle.run_shard.remote(task)] = (worker, task)
            self.observer.shard_started(task, worker.info)

    def _settle(self, ref: Any, worker: _Worker, task: ShardTask | None) -> None:
        try:
            value = ray.get(ref)
        except ACTOR_DEATHS as err:
            if task is not None:
                self._retry(task, f"actor died: {_reason(err)}")
            self._replace(worker, err)
            return
        except RayTaskError as err:  # the decode raised; the actor is alive
            self._idle.append(worker)
            if task is not None:
                self._retry(task, _reason(err))
            return
        self._idle.append(worker)
        if task is None:
            worker.info = value
            self.report.ready_s = time.perf_counter() - self._start
            self.report.workers.append(value)
            self.observer.actor_ready(value)
        else:
            self.report.outcomes.append(value)
            self.observer.shard_finished(value)

    def _replace(self, worker: _Worker, err: Exception) -> None:
        """A dead actor is replaced while there is work for it."""
        ray.kill(worker.handle)
        self.report.replaced += 1
        if worker.info is None:  # it died while loading its models
            self._start_failures += 1
            if self._start_failures > self.retries:
                raise JobFailed(f"worker actors fail to start ({self._start_failures} failed, "
                                f"execution.retries={self.retries}): {_reason(err)}")
        if self._queue:
            self._start_worker()

    def _retry(self, task: ShardTask, error: str) -> None:
        retry = task.attempt <= self.retries
        self.observer.shard_failed(task, error, retry)
        if retry:
            self.report.retries += 1
            self._queue.append(replace(task, attempt=task.attempt + 1))
        else:
            self.report.failed[task.index] = error


def _reason(err: BaseException) -> str:
    """The last line of a Ray error: the remote exception's own message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


@contextmanager
def ray_connection(execution: ExecutionSpec) -> Iterator[None]:
    """Use the Ray this process already joined, or start a local one (no address), or join `address`."""
    if ray.is_initialized():
        yield
        return
    env = worker_env(os.environ)
    common: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    if execution.address:
        ray.init(address=execution.address, runtime_env={"env_vars": env} if env else None, **common)
    else:
        ray.init(address="local", num_cpus=execution.num_cpus, include_dashboard=False, **common)  # a new one
    try:
        yield
    finally:
        ray.shutdown()


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What a cluster's workers are given of the driver's environment (PASSTHROUGH_ENV, where set)."""
    return {name: environ[name] for name in PASSTHROUGH_ENV if name in environ}


def tune_config(spec: JobSpec, rows: list[int]) -> TuneConfig | None:
    """What the actors tune with (None: execution.tune off), from the rows of every shard of the job (a resumed job
    keeps its plan's key): a sample that grows with the documents each actor decodes (1 for a few dozen, at most
    TUNE_SAMPLE_MAX; for `latency` TUNE_SAMPLE_MAX: its sample decodes at batch 1 are the documents' own decodes,
    so a larger sample costs nothing but each document's greedy check), batches up to the largest shard."""
    if not spec.execution.tune or not rows:
        return None
    per_actor = sum(rows) // spec.execution.actors
    return TuneConfig(objective=spec.execution.objective, task=spec.task.name,
                      sample=TUNE_SAMPLE_MAX if spec.execution.objective == "latency" else
                      max(1, min(TUNE_SAMPLE_MAX, per_actor // TUNE_DOCS_PER_SAMPLE)), max_batch=max(rows),
                      docs=per_actor)


def actor_spawner(spec: JobSpec, job_uri: str, tune: TuneConfig | None = None) -> Callable[[], Any]:
    """A function that starts one worker actor: one GPU where the cluster has GPUs, CPUs otherwise."""
    execution = spec.execution
    gpus = execution.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    have = ray.cluster_resources()
    cpus = execution.cpus_per_actor or cpu_share(execution.actors)
    if execution.address is None and (have.get("CPU", 0) < cpus or have.get("GPU", 0) < gpus):
        raise JobFailed(f"an actor needs {cpus} CPU and {gpus} GPU but this machine's Ray has "
                        f"{have.get('CPU', 0)} CPU and {have.get('GPU', 0)} GPU: lower execution.cpus_per_actor "
                        "or execution.gpus_per_actor")
    config = WorkerConfig(job_uri=job_uri, target=spec.models.target, drafter=spec.models.drafter,
                          decode=spec.decode, prompt=spec.template(), device=spec.models.device,
                          dtype=spec.models.dtype, load_format=spec.models.load_format, threads=max(1, int(cpus)),
                          tune=tune)
    actor_class = ray.remote(ShardWorker)
    options = {"num_cpus": cpus, "num_gpus": gpus, "scheduling_strategy": "SPREAD",
               "max_restarts": 0, "max_task_retries": 0, "max_concurrency": 2}  # progress() answers mid-shard
    numbers = itertools.count()
    return lambda: actor_class.options(name=actor_name(spec, next(numbers)), **options).remote(config)


def cpu_share(actors: int) -> int:
    """execution.cpus_per_actor auto: the cluster's CPUs divided among the actors, at least 1 and at most the CPUs
    of its largest node (one actor alone on a 2-core machine decodes with both cores; two take one each)."""
    nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources().get("CPU", 0)
    return max(1, int(min(total // actors, max(nodes, default=1))))


def actor_name(spec: JobSpec, number: int) -> str:
    """The n-th actor a driver starts for a job (as `ray list actors` shows it)."""
    return f"cmsd-{spec.output.job_id}-{number}"


def run_shards(spec: JobSpec, job_uri: str, tasks: list[ShardTask], observer: Observer,
               shard_rows: list[int] | None = None) -> RunReport:
    """Decode `tasks` on Ray; shard_rows: the rows of every shard of the job (what tuning plans for), default the
    tasks'."""
    with ray_connection(spec.execution):
        spawn = actor_spawner(spec, job_uri, tune_config(spec, shard_rows or [t.rows for t in tasks]))
        scheduler = Scheduler(spawn, spec.execution.actors, spec.execution.retries, observer)
        return scheduler.run(tasks)
