"""Timing every method and peer on the same documents, alternating, so that machine drift hits all alike.

Protocol (one process holds the models; loading is not timed):
  1. each runner decodes a few tokens of the first document once, untimed (first-call costs; refusals show)
  2. batch 1: for each document, every runner decodes it in turn; the order rotates by one per document
  3. batch B (the suite's batch_size): the same over groups of B documents, for runners that batch
  4. sweep: AR and every grid point, alternating the same way, on the validation documents
With execution.actors > 1 (on Ray), each actor does all of this on its share of the documents.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobs.eval_docs import Doc
from jobs.eval_peers import PeerSkipped, make_peer
from jobs.eval_runners import CmsdRunner, Output, Runner, RunnerInfo, timed
from jobs.eval_suite import Suite

Log = Callable[[str], None]
# what cmsd or transformers raise for a method or peer that cannot run with these models: skip it, say why
SKIPPABLE = (ValueError, NotImplementedError, TypeError, RuntimeError, AttributeError, KeyError)
SWEEP_PREFIX = "sweep "


@dataclass
class Measurements:
    outputs: list[Output] = field(default_factory=list)
    info: dict[str, RunnerInfo] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it did not run
    machine: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    measure_s: float = 0.0

    def merge(self, other: Measurements) -> Measurements:
        return Measurements(self.outputs + other.outputs, {**self.info, **other.info},
                            {**self.skipped, **other.skipped}, self.machine or other.machine,
                            max(self.load_s, other.load_s), max(self.measure_s, other.measure_s))


def stderr_log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(suite: Suite, test: tuple[Doc, ...], validation: tuple[Doc, ...], log: Log = stderr_log) -> Measurements:
    """Load the models once, then time every runner on `test` (and the sweep on `validation`)."""
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    pair = load_models(suite)
    load_s = time.perf_counter() - start
    log(f"models loaded in {load_s:.1f}s on {pair.device}")
    runners, skipped = build_runners(suite, pair)
    runners = warm_up(runners, list(test[0].prompt_ids), skipped, log)
    tokenizer = pair.tokenizer
    outputs = round_robin(runners, chunks(test, 1), "batch-1", tokenizer, log)
    if suite.batch_size > 1:
        batched = [r for r in runners if r.info.batched]
        outputs += round_robin(batched, chunks(test, suite.batch_size), f"batch-{suite.batch_size}", tokenizer, log)
    sweep = sweep_runners(suite, pair) if suite.sweep and validation else []
    if sweep:
        ar = next(r for r in runners if r.name == suite.ar.name)
        outputs += round_robin([ar, *sweep], chunks(validation, 1), "sweep", tokenizer, log)
    info = {r.name: r.info for r in [*runners, *sweep]}
    machine = {**machine_info(pair), "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}
    return Measurements(outputs, info, skipped, machine, load_s, time.perf_counter() - start - load_s)


def load_models(suite: Suite) -> Any:
    import torch

    from cmsd import load_pair

    if suite.execution.threads:
        torch.set_num_threads(suite.execution.threads)
    m = suite.models
    return load_pair(m.target, m.drafter, device=m.device, dtype=m.dtype)


def build_runners(suite: Suite, pair: Any) -> tuple[list[Runner], dict[str, str]]:
    """A runner per method (in suite order), then per peer; peers that cannot run here are skipped."""
    from cmsd import ModelPair

    runners: list[Runner] = []
    skipped: dict[str, str] = {}
    for m in suite.methods:
        own = ModelPair(pair.target, "self") if m.settings.method == "specbound" else pair
        runner = CmsdRunner(m.name, own, m.settings, batched=m.batch, limit=m.limit)
        runner.optional = m.optional
        runners.append(runner)
    for peer in suite.peers:
        try:
            runners.append(make_peer(peer, pair.target, pair.drafter, suite.base.max_new_tokens))
        except PeerSkipped as err:
            skipped[peer.name] = str(err)
    return runners, skipped


def sweep_runners(suite: Suite, pair: Any) -> list[Runner]:
    assert suite.sweep is not None
    out: list[Runner] = []
    for point in suite.sweep.points():
        settings = suite.sweep.point_settings(suite.base, point)
        out.append(CmsdRunner(SWEEP_PREFIX + point_label(point), pair, settings, batched=False))
    return out


def point_label(point: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in point.items())


def warm_up(runners: list[Runner], prompt: list[int], skipped: dict[str, str], log: Log) -> list[Runner]:
    """One short untimed decode per runner; an optional runner that fails is skipped with the reason."""
    kept = []
    for runner in runners:
        try:
            runner.warmup(prompt)
        except SKIPPABLE as err:
            if not runner.optional:
                raise
            skipped[runner.name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"skipped {runner.name}: {skipped[runner.name]}")
            continue
        kept.append(runner)
    return kept


def chunks(docs: tuple[Doc, ...], size: int) -> list[list[Doc]]:
    return [list(docs[i:i + size]) for i in range(0, len(docs), size)]


def round_robin(runners: list[Runner], units: list[list[Doc]], setting: str, tokenizer: Any, log: Log) -> list[Output]:
    """Each unit (a document, or a batch) is decoded by every runner in turn; the order rotates per unit."""
    rank = _ranks([d for unit in units for d in unit])
    outputs: list[Output] = []
    started = time.perf_counter()
    for u, unit in enumerate(units):
        shift = u % max(1, len(runners))
        walls = []
        for runner in runners[shift:] + runners[:shift]:
            docs = [d for d in unit if runner.limit is None or rank[d.id] < runner.limit]
            if docs:
                outs, wall = timed(runner, docs, setting, tokenizer)
                outputs += outs
                walls.append(f"{runner.name} {wall:.1f}s")
        log(f"[{time.perf_counter() - started:7.1f}s] {setting} {u + 1}/{len(units)} ({len(unit)} docs): "
            + ", ".join(walls))
    return outputs


def _ranks(docs: list[Doc]) -> dict[str, int]:
    """Each document's index within its corpus (for per-method limits)."""
    seen: dict[str, int] = {}
    out = {}
    for doc in docs:
        out[doc.id] = seen.get(doc.corpus, 0)
        seen[doc.corpus] = out[doc.id] + 1
    return out


def machine_info(pair: Any) -> dict[str, Any]:
    import torch
    import transformers

    device = pair.device
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(device), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(pair.target.model.dtype).replace("torch.", "")}


def measure_on_ray(suite: Suite, test: tuple[Doc, ...], validation: tuple[Doc, ...], log: Log) -> Measurements:
    """execution.actors Ray tasks, each timing every method on its share of the documents."""
    import ray

    from jobs.driver import ray_connection  # the job system's: join `address`, or start a local Ray
    from jobs.spec import ExecutionSpec as JobExecution

    ex = suite.execution
    with ray_connection(JobExecution(address=ex.address)):
        gpus = ex.gpus_per_actor
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=ex.cpus_per_actor, num_gpus=gpus, max_retries=0)(measure)
        n = min(ex.actors, len(test))
        log(f"timing on Ray ({ray.get_runtime_context().gcs_address}): {n} task(s), {gpus} GPU each; "
            "their progress is in the Ray workers' logs")
        parts = ray.get([task.remote(suite, test[i::n], validation[i::n]) for i in range(n)])
    out = Measurements()
    for part in parts:
        out = out.merge(part)
    return out
