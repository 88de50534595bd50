"""The history of evaluations (Parquet) and the regression checks.

Each run appends one file, <history>/<run_id>.parquet, with one row per (setting, method, scope): every number
of the run plus the code version (git commit), the models, the machine and the method's settings. Reading the
history reads all files of the folder.

A regression is a checked method (not AR, not a peer unless the suite says so) that
  - misses a floor of the suite: speedup_vs_ar < min_speedup (min_speedup_batched at the suite's batch size,
    when given), agreement_with_ar < min_agreement (or, for a
    lossless method, < lossless_agreement), AR's score minus its score > max_quality_loss (per corpus and
    metric), or a significant quality loss (paired bootstrap, when floors.significance);
  - or got worse than in the previous run of the same suite on the same documents by more than the tolerances:
    speedup_vs_ar or tokens_per_call (relative), agreement_with_ar (absolute), a quality score (points).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.eval.docs import Doc
from jobs.eval.metrics import TASK_METRICS
from jobs.eval.suite import Floors, Suite

CHECKED_SETTINGS = ("batch-1",)  # plus the batched setting, added per suite
TIMING_METRICS = ("speedup_vs_ar",)  # the checks a busy machine can fail; the others are deterministic


@dataclass(frozen=True)
class Regression:
    method: str
    setting: str
    scope: str
    metric: str
    value: float
    bound: float
    rule: str  # what was broken, in words

    @property
    def timing(self) -> bool:
        return self.metric in TIMING_METRICS

    def message(self) -> str:
        return f"{self.method} [{self.setting}, {self.scope}]: {self.metric} {self.value:.4g} {self.rule}"


def docs_key(docs: tuple[Doc, ...], suite: Suite) -> str:
    """What must be equal for two runs to be comparable: the documents, their prompts, the models, the budget."""
    blob = json.dumps([[d.id, hashlib.sha256(str(d.prompt_ids).encode()).hexdigest()[:12]] for d in docs]
                      + [suite.models.target, suite.models.drafter, suite.base.max_new_tokens, suite.batch_size]
                      + ([suite.models.load_format] if suite.models.dummy else []))  # a dummy run is its own kind
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_history(folder: Path) -> list[dict[str, Any]]:
    """Every row of every run in the folder, oldest run first."""
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    tables = [pq.read_table(f) for f in files]
    if not tables:
        return []
    rows = pa.concat_tables(tables, promote_options="permissive").to_pylist()
    return sorted(rows, key=lambda r: (r.get("started") or "", r.get("run_id") or ""))


def append_history(folder: Path, run_id: str, rows: list[dict[str, Any]]) -> Path:
    """Write this run's rows as <folder>/<run_id>.parquet (under a temporary name, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.parquet"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path


def previous_run(history: list[dict[str, Any]], suite: str, key: str, run_id: str) -> list[dict[str, Any]]:
    """The rows of the latest earlier run of this suite on the same documents ([] when there is none)."""
    earlier = [r for r in history if r.get("suite") == suite and r.get("docs_key") == key and r.get("run_id") != run_id]
    if not earlier:
        return []
    last = earlier[-1]["run_id"]
    return [r for r in earlier if r["run_id"] == last]


def regressions(rows: list[dict[str, Any]], previous: list[dict[str, Any]], suite: Suite) -> list[Regression]:
    """Every floor missed and every number worse than the previous run's beyond tolerance, for checked methods."""
    settings = set(CHECKED_SETTINGS) | ({f"batch-{suite.batch_size}"} if suite.batch_size > 1 else set())
    ar = {(r["setting"], r["scope"]): r for r in rows if r["method"] == suite.ar.name}
    before = {(r["setting"], r["method"], r["scope"]): r for r in previous}
    found: list[Regression] = []
    for row in rows:
        floors = suite.floors_for(row["method"])
        if floors is None or row["setting"] not in settings:
            continue
        found += floor_misses(row, ar.get((row["setting"], row["scope"])), floors)
        old = before.get((row["setting"], row["method"], row["scope"]))
        if old is not None:
            found += worse_than_before(row, old, suite)
    return found


def floor_misses(row: dict[str, Any], ar: dict[str, Any] | None, floors: Floors) -> list[Regression]:
    out = []
    where = (row["method"], row["setting"], row["scope"])
    if row["scope"] == "all":
        lossless = floors.lossless_agreement if row.get("lossless") else None
        batched = row["setting"] != "batch-1" and floors.min_speedup_batched is not None
        speed = ("min_speedup_batched", floors.min_speedup_batched) if batched else ("min_speedup", floors.min_speedup)
        for metric, bound, name in (("speedup_vs_ar", speed[1], speed[0]),
                                    ("agreement_with_ar", floors.min_agreement, "min_agreement"),
                                    ("agreement_with_ar", lossless, "lossless_agreement")):
            value = row.get(metric)
            if bound is not None and value is not None and value < bound:
                out.append(Regression(*where, metric, value, bound, f"< floor {name} {bound:g}"))
        return out
    for metric in _quality_metrics(row):
        loss = (ar or {}).get(metric, row[metric]) - row[metric]
        if floors.max_quality_loss is not None and loss > floors.max_quality_loss:
            out.append(Regression(*where, metric, row[metric], floors.max_quality_loss,
                                  f"is {loss:.2f} points below AR's (max_quality_loss {floors.max_quality_loss:g})"))
        p = row.get(f"p_{metric}")
        if floors.significance and p is not None and row[f"delta_{metric}"] < 0 and p < floors.alpha:
            out.append(Regression(*where, metric, row[metric], floors.alpha,
                                  f"is significantly below AR's (delta {row[f'delta_{metric}']:.2f}, "
                                  f"paired bootstrap p={p:.3f} < {floors.alpha:g})"))
    return out


def worse_than_before(row: dict[str, Any], old: dict[str, Any], suite: Suite) -> list[Regression]:
    tol, out = suite.tolerances, []
    where = (row["method"], row["setting"], row["scope"])
    checks = [("speedup_vs_ar", "relative", tol.speedup), ("tokens_per_call", "relative", tol.tokens_per_call),
              ("agreement_with_ar", "absolute", tol.agreement)] if row["scope"] == "all" else \
        [(m, "absolute", tol.quality) for m in _quality_metrics(row)]
    for metric, how, tolerance in checks:
        new, was = row.get(metric), old.get(metric)
        if new is None or was is None:
            continue
        bound = was * (1 - tolerance) if how == "relative" else was - tolerance
        if new < bound:
            out.append(Regression(*where, metric, new, bound, f"< {bound:.4g}: was {was:.4g} in run "
                                  f"{old.get('run_id')} (tolerance {tolerance:g} {how})"))
    return out


def _quality_metrics(row: dict[str, Any]) -> list[str]:
    return [m for m in TASK_METRICS["plain"] if row.get(m) is not None]
