"""Timing every method and peer on the same documents, alternating, so that machine drift hits all alike.

Protocol (one process holds the models; loading is not timed):
  1. each runner decodes a few tokens of the first document once, untimed (first-call costs; refusals show)
  2. batch 1 (unless the suite says single: false): for each document, every runner decodes it in turn; the
     order rotates by one per document
  3. batch B (the suite's batch_size): the same over groups of B documents (batch_docs: groups of more, B rows
     at a time), for runners that batch, in execution.batched_rounds rounds (each runner keeps its fastest time
     per group)
  4. sweep: AR and every grid point, alternating the same way, on the validation documents
  In each pass, units disturbed by a burst of other work are timed again (RoundRobin).
With execution.actors > 1 (on Ray), each actor does all of this on its share of the documents.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.eval.docs import Doc
from jobs.eval.peers import PeerSkipped, make_peer
from jobs.eval.runners import CmsdRunner, Output, Runner, RunnerInfo, timed
from jobs.eval.suite import Suite

Log = Callable[[str], None]
CALIBRATION_TOKENS = 384  # tokens per document SpecBound's calibration runs (as `cmsd-jobs calibrate`)
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
    retimed: list[str] = field(default_factory=list)  # units timed again (a burst of other work on the machine)
    loads: list[float] = field(default_factory=list)  # 1-minute load average after each timed unit
    notes: list[str] = field(default_factory=list)  # what the run did besides timing (a calibration it fitted)

    def merge(self, other: Measurements) -> Measurements:
        return Measurements(self.outputs + other.outputs, {**self.info, **other.info},
                            {**self.skipped, **other.skipped}, self.machine or other.machine,
                            max(self.load_s, other.load_s), max(self.measure_s, other.measure_s),
                            self.retimed + other.retimed, self.loads + other.loads,
                            self.notes + [n for n in other.notes if n not in self.notes])

    @property
    def busy(self) -> float:
        """Mean load average per CPU while timing (about threads / CPUs when nothing else runs)."""
        cpus = self.machine.get("cpu_count") or 1
        return sum(self.loads) / len(self.loads) / cpus if self.loads else 0.0


def stderr_log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(suite: Suite, test: tuple[Doc, ...], validation: tuple[Doc, ...], log: Log = stderr_log) -> Measurements:
    """Load the models once, then time every runner on `test` (and the sweep on `validation`)."""
    start = time.perf_counter()
    pair = load_models(suite)
    load_s = time.perf_counter() - start
    log(f"models loaded in {load_s:.1f}s on {pair.device}")
    notes = calibrate_self_drafting(suite, pair, validation or test, log)
    runners, skipped = build_runners(suite, pair)
    runners = warm_up(runners, list(test[0].prompt_ids), skipped, log)
    ex = suite.execution
    passes = [(runners, chunks(test, 1), "batch-1", 1)] if suite.single else []
    if suite.batch_size > 1:
        passes.append(([r for r in runners if r.info.batched], chunks(test, suite.batch_docs or suite.batch_size),
                       f"batch-{suite.batch_size}", ex.batched_rounds))
    sweep = sweep_runners(suite, pair) if suite.sweep and validation else []
    if sweep:
        ar = next(r for r in runners if r.name == suite.ar.name)
        passes.append(([ar, *sweep], chunks(validation, 1), "sweep", 1))
    outputs, retimed, loads = [], [], []
    for group, units, setting, rounds in passes:
        timer = RoundRobin(group, setting, pair.tokenizer, log, suite.ar.name, ex.retime_factor, rounds)
        outputs += timer.run(units)
        retimed, loads = retimed + timer.retimed, loads + timer.loads
    info = {r.name: r.info for r in [*runners, *sweep]}
    machine = {**machine_info(pair), "load_avg_mean": sum(loads) / len(loads), "load_avg_max": max(loads)}
    return Measurements(outputs, info, skipped, machine, load_s, time.perf_counter() - start - load_s, retimed,
                        loads, notes)


def load_models(suite: Suite) -> Any:
    import torch

    from cmsd import load_pair

    if suite.execution.threads:
        torch.set_num_threads(suite.execution.threads)
    m = suite.models
    return load_pair(m.target, m.drafter, device=m.device, dtype=m.dtype, load_format=m.load_format)


def calibrate_self_drafting(suite: Suite, pair: Any, docs: tuple[Doc, ...], log: Log) -> list[str]:
    """SpecBound runs on its target's calibration (exit layer, temperatures, whether it pays at all). Where the suite
    has a SpecBound method and none is stored beside the target (a fresh machine), fit it on `docs` (the validation
    documents where there are some) and store it there, as `cmsd-jobs calibrate` does: the next run reuses it.
    execution.calibrate: false leaves an uncalibrated target as it is. Returns a note for the report."""
    from cmsd.drafters.selfspec import calibration_path
    from cmsd.train.calibrate import fit_and_store

    methods = [m for m in suite.methods if m.settings.method == "specbound"]
    if not methods or not suite.execution.calibrate or calibration_path(pair.target.home).is_file():
        return []
    start = time.perf_counter()
    k_max = max(m.settings.control.k_max for m in methods)
    cal, path = fit_and_store(pair.target, [list(d.prompt_ids) for d in docs], suite.models.target, k_max,
                              CALIBRATION_TOKENS)
    note = (f"SpecBound was not calibrated for {suite.models.target}: calibrated on {len(docs)} documents in "
            f"{time.perf_counter() - start:.0f} s (exit layer {cal.exit_layer}, predicted "
            f"{cal.predicted_speedup:.2f}x), stored in {path}")
    log(note)
    return [note]


def build_runners(suite: Suite, pair: Any) -> tuple[list[Runner], dict[str, str]]:
    """A runner per method (in suite order), then per peer; peers that cannot run here are skipped."""
    from cmsd import ModelPair
    from cmsd.models import load_drafter

    runners: list[Runner] = []
    skipped: dict[str, str] = {}
    drafters = {suite.models.drafter: pair.drafter}  # each drafter model is loaded once
    for m in suite.methods:
        if m.drafter not in (None, *drafters):
            drafters[m.drafter] = load_drafter(pair.target, m.drafter)
        own = pair if m.drafter is None else ModelPair(pair.target, drafters[m.drafter])
        own = ModelPair(pair.target, "self") if m.settings.method == "specbound" else own
        runner = CmsdRunner(m.name, own, m.settings, batched=m.batch, limit=m.limit, batch_size=suite.batch_size)
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


UnitTimes = dict[str, tuple[list[Output], float]]  # runner name -> (its outputs for the unit, wall seconds)


class RoundRobin:
    """Each unit (a document, or a batch) is decoded by every runner in turn; the order rotates per unit.

    Then units whose timings disagree with the rest are timed again: for each runner, its wall time on a unit
    divided by the baseline's (AR's) on that unit, against the runner's median of that ratio over all units; a
    unit where some runner is off by more than `retime_factor` (a burst of other work on the machine) is decoded
    again by every runner, and each keeps its faster time. At most a quarter of the units are timed again.
    With rounds > 1 every unit is timed that many times (the order rotating again), each runner keeping its
    fastest: for passes of few units (one batch of 8), where one slow call would decide the ratio.
    """

    def __init__(self, runners: list[Runner], setting: str, tokenizer: Any, log: Log, baseline: str,
                 retime_factor: float, rounds: int = 1) -> None:
        self.runners, self.setting, self.tokenizer, self.log = runners, setting, tokenizer, log
        self.baseline, self.retime_factor, self.rounds = baseline, retime_factor, rounds
        self.retimed: list[str] = []
        self.loads: list[float] = []  # the 1-minute load average after each unit

    def run(self, units: list[list[Doc]]) -> list[Output]:
        rank = _ranks([d for unit in units for d in unit])
        started = time.perf_counter()
        results: list[UnitTimes] = [{} for _ in units]
        for r in range(self.rounds):
            for u, unit in enumerate(units):
                results[u] = _fastest(results[u], self._unit(unit, u + r, rank))
                self.loads.append(os.getloadavg()[0])
                walls = ", ".join(f"{n} {w:.1f}s" for n, (_, w) in results[u].items())
                self.log(f"[{time.perf_counter() - started:7.1f}s] {self.setting} {u + 1}/{len(units)} "
                         f"({len(unit)} docs){f', round {r + 1}' if self.rounds > 1 else ''}: {walls}")
        for u, factor in self._disturbed(results):
            results[u] = _fastest(results[u], self._unit(units[u], u + self.rounds, rank))
            self.retimed.append(f"{self.setting} unit {u + 1} (off by {factor:.1f}x)")
            self.log(f"{self.setting} {u + 1}/{len(units)} timed again: a runner was off by {factor:.1f}x")
        return [o for unit in results for outs, _ in unit.values() for o in outs]

    def _unit(self, unit: list[Doc], u: int, rank: dict[str, int]) -> UnitTimes:
        shift = u % max(1, len(self.runners))
        out: UnitTimes = {}
        for runner in self.runners[shift:] + self.runners[:shift]:
            docs = [d for d in unit if runner.limit is None or rank[d.id] < runner.limit]
            if docs:
                out[runner.name] = timed(runner, docs, self.setting, self.tokenizer)
        return out

    def _disturbed(self, results: list[UnitTimes]) -> list[tuple[int, float]]:
        """(unit, factor) of the units to time again, worst first."""
        if self.retime_factor <= 1 or len(results) < 2:
            return []
        ratios: dict[str, dict[int, float]] = {}
        for u, unit in enumerate(results):
            base = unit.get(self.baseline, (None, 0.0))[1]
            for name, (_, wall) in unit.items():
                if base > 0 and wall > 0:
                    ratios.setdefault(name, {})[u] = wall / base
        off = [0.0] * len(results)
        for values in ratios.values():
            middle = float(np.median(list(values.values())))
            for u, ratio in values.items():
                off[u] = max(off[u], abs(math.log(ratio / middle)))
        worst = sorted(range(len(results)), key=lambda u: -off[u])[:max(1, len(results) // 4)]
        return [(u, math.exp(off[u])) for u in worst if off[u] > math.log(self.retime_factor)]


def _fastest(old: UnitTimes, new: UnitTimes) -> UnitTimes:
    """Each runner's faster timing of the same unit."""
    return {name: min(old[name], times, key=lambda t: t[1]) if name in old else times for name, times in new.items()}


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

    from jobs.batch.driver import ray_connection  # the job system's: join `address`, or start a local Ray
    from jobs.batch.spec import ExecutionSpec as JobExecution

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
