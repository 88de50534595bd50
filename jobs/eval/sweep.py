"""The sweep: a grid over (alpha, gamma, tau_base, k_max) decoded on the validation documents next to AR, the
Pareto front of speed against quality, and the chosen point written as a ready-to-use settings file.

The chosen point is the fastest point whose quality is at least sweep.min_quality (the best-quality point when
none is). Its file is DecodeSettings.to_dict(): `DecodeSettings.from_dict(yaml.safe_load(...))` loads it, and
it is also a job spec's `decode:` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.eval.measure import SWEEP_PREFIX, Measurements, point_label
from jobs.eval.suite import Suite


@dataclass(frozen=True)
class SweepPoint:
    name: str  # the runner name: "sweep alpha=1 gamma=1 tau_base=0.3 k_max=8"
    knobs: dict[str, float]
    speed: float | None
    quality: float | None
    docs: int
    settings: dict[str, Any]  # DecodeSettings.to_dict()
    pareto: bool = False


def sweep_points(rows: list[dict[str, Any]], meas: Measurements, suite: Suite) -> list[SweepPoint]:
    """Every grid point that ran, with its speed and quality on the validation documents, Pareto front marked."""
    if suite.sweep is None:
        return []
    spec, found = suite.sweep, []
    for knobs in spec.points():
        name = SWEEP_PREFIX + point_label(knobs)
        mine = [r for r in rows if r["setting"] == "sweep" and r["method"] == name]
        overall = next((r for r in mine if r["scope"] == "all"), None)
        if overall is None:
            continue
        found.append(SweepPoint(name, knobs, overall.get(spec.speed), _quality(mine, spec.quality),
                                int(overall["docs"]), meas.info[name].settings))
    return mark_pareto(found)


def _quality(rows: list[dict[str, Any]], metric: str) -> float | None:
    """agreement over all documents; a corpus metric (rougeL, bleu, chrf) averaged over the corpora that have it."""
    if metric == "agreement_with_ar":
        return next(r[metric] for r in rows if r["scope"] == "all")
    values = [r[metric] for r in rows if r["scope"] != "all" and r.get(metric) is not None]
    return sum(values) / len(values) if values else None


def mark_pareto(points: list[SweepPoint]) -> list[SweepPoint]:
    """A point is on the front when no other point is at least as fast and as good, and better in one."""
    def dominated(p: SweepPoint) -> bool:
        return any(q.speed >= p.speed and q.quality >= p.quality and (q.speed > p.speed or q.quality > p.quality)
                   for q in scored if q is not p)

    scored = [p for p in points if p.speed is not None and p.quality is not None]
    front = {id(p) for p in scored if not dominated(p)}
    return [SweepPoint(**{**p.__dict__, "pareto": id(p) in front}) for p in points]


def choose(points: list[SweepPoint], min_quality: float) -> SweepPoint | None:
    scored = [p for p in points if p.speed is not None and p.quality is not None]
    good = [p for p in scored if p.quality >= min_quality]
    if good:
        return max(good, key=lambda p: (p.speed, p.quality))
    return max(scored, key=lambda p: (p.quality, p.speed), default=None)


def write_settings(point: SweepPoint, suite: Suite, path: Path, run_id: str) -> Path:
    """The chosen point as a settings YAML (DecodeSettings.from_dict loads it), at the suite's batch size."""
    assert suite.sweep is not None
    settings = {**point.settings, "batch_size": suite.batch_size}
    header = (f"# Chosen by `cmsd-jobs eval` (suite {suite.name}, run {run_id}) from a sweep of "
              f"{len(suite.sweep.points())} points on {point.docs} validation documents:\n"
              f"# {point_label(point.knobs)}: {suite.sweep.speed} {_fmt(point.speed)}, "
              f"{suite.sweep.quality} {_fmt(point.quality)} (min_quality {suite.sweep.min_quality}).\n"
              "# Load: DecodeSettings.from_dict(yaml.safe_load(open(this file))), or use it as a job spec's "
              "`decode:` section.\n")
    path.write_text(header + yaml.safe_dump(settings, sort_keys=False))
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
