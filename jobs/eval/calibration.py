"""Calibration: the drafter's confidence C against the empirical acceptance of the drafted tokens, in bins, for
each confidence metric (c_ent, c_margin, c_soft) and the ensemble c, from the batch-1 traces of each method.

Only tokens the target judged count: an iteration's accepted prefix and its first rejected token. The tokens
after a rejection are discarded unjudged (they follow a token the target refused), so they are left out.

    ECE = sum over bins of (tokens in bin / tokens) * |acceptance in bin - mean confidence in bin|
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jobs.eval.runners import Output

METRICS = ("c_ent", "c_margin", "c_soft", "c")


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    tokens: int
    confidence: float  # mean confidence of the bin's tokens
    acceptance: float  # share of them accepted


@dataclass(frozen=True)
class Calibration:
    method: str
    metric: str
    tokens: int
    ece: float
    bins: tuple[CalibrationBin, ...]  # bins with tokens only


def calibrate(outputs: list[Output], bins: int, setting: str = "batch-1") -> list[Calibration]:
    """One Calibration per (method with traces, metric), methods in order of appearance."""
    traces: dict[str, list[dict[str, list]]] = {}
    for o in outputs:
        if o.setting == setting and o.trace and o.trace.get("c"):
            traces.setdefault(o.method, []).append(o.trace)
    out = []
    for method, parts in traces.items():
        keep = np.concatenate([judged(t) for t in parts])
        accepted = np.concatenate([np.asarray(t["accepted"], dtype=float) for t in parts])[keep]
        for metric in METRICS:
            conf = np.concatenate([np.asarray(t[metric], dtype=float) for t in parts])[keep]
            out.append(binned(method, metric, conf, accepted, bins))
    return out


def judged(trace: dict[str, list]) -> np.ndarray:
    """[N] bool: the drafted tokens verification judged (accepted, or the first rejected of an iteration)."""
    keep, previous, rejected = [], None, False
    for doc, iteration, ok in zip(trace["doc_id"], trace["iteration"], trace["accepted"]):
        if (doc, iteration) != previous:
            previous, rejected = (doc, iteration), False
        keep.append(bool(ok) or not rejected)
        rejected = rejected or not ok
    return np.asarray(keep, dtype=bool)


def binned(method: str, metric: str, conf: np.ndarray, accepted: np.ndarray, bins: int) -> Calibration:
    """Equal-width bins of confidence over [0, 1] and the expected calibration error."""
    conf = np.clip(conf, 0.0, 1.0)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    found, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        mean_c, acc = float(conf[mask].mean()), float(accepted[mask].mean())
        found.append(CalibrationBin(b / bins, (b + 1) / bins, int(mask.sum()), mean_c, acc))
        ece += mask.sum() / len(conf) * abs(acc - mean_c)
    return Calibration(method, metric, int(len(conf)), float(ece), tuple(found))


def ece_columns(calibrations: list[Calibration], method: str) -> dict[str, float]:
    """ece_<metric> for one method (for its table / history row)."""
    return {f"ece_{c.metric}": c.ece for c in calibrations if c.method == method}
