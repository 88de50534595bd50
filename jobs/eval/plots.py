"""The evaluation's plots (matplotlib, Agg): Pareto front, calibration, draft lengths, trend over the history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jobs.eval.calibration import METRICS, Calibration
from jobs.eval.runners import Output
from jobs.eval.sweep import SweepPoint


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    figure.savefig(folder / name, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return f"{folder.name}/{name}"


def plot_pareto(points: list[SweepPoint], chosen: SweepPoint | None, speed: str, quality: str, folder: Path) -> str:
    figure, ax = _pyplot().subplots(figsize=(6, 4))
    scored = [p for p in points if p.speed is not None and p.quality is not None]
    ax.scatter([p.speed for p in scored], [p.quality for p in scored], color="tab:grey", label="grid point")
    front = sorted((p for p in scored if p.pareto), key=lambda p: p.speed)
    ax.plot([p.speed for p in front], [p.quality for p in front], color="tab:red", marker="o", label="Pareto front")
    if chosen is not None and chosen.speed is not None:
        ax.scatter([chosen.speed], [chosen.quality], marker="*", s=250, color="tab:orange", label="chosen", zorder=3)
    if speed == "speedup_vs_ar":
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":", label="AR")
    ax.set(xlabel=speed, ylabel=quality, title="Sweep: speed against quality (validation documents)")
    _legend(ax, fontsize=8)
    return _save(figure, folder, "pareto.png")


def _legend(ax: Any, **options: Any) -> None:
    """A legend where something is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def plot_calibration(calibrations: list[Calibration], folder: Path) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4), sharey=True)
    for ax, metric in zip(axes, METRICS):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        for c in (c for c in calibrations if c.metric == metric and c.bins):
            ax.plot([b.confidence for b in c.bins], [b.acceptance for b in c.bins], marker="o", markersize=3,
                    label=f"{c.method} (ECE {c.ece:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel=f"drafter confidence {metric}", title=metric)
        _legend(ax, fontsize=6)
    axes[0].set_ylabel("empirical acceptance")
    return _save(figure, folder, "calibration.png")


def plot_k_histogram(outputs: list[Output], folder: Path, setting: str = "batch-1") -> str:
    """Draft length k_j per draft-verify iteration (one count per iteration that drafted), per method."""
    ks: dict[str, list[int]] = {}
    for o in outputs:
        if o.setting == setting and o.trace and o.trace.get("k_j"):
            seen = dict.fromkeys(zip(o.trace["iteration"], o.trace["k_j"]))
            ks.setdefault(o.method, []).extend(k for _, k in seen)
    figure, ax = _pyplot().subplots(figsize=(7, 3.5))
    top = max((max(v) for v in ks.values()), default=1)
    edges = np.arange(0, top + 2) - 0.5
    for method, values in ks.items():
        ax.hist(values, bins=edges, histtype="step", linewidth=1.5, label=method)
    if not ks:
        ax.text(0.5, 0.5, "nothing drafted", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="draft length k_j", ylabel="iterations", title=f"Draft lengths ({setting})")
    _legend(ax, fontsize=7)
    return _save(figure, folder, "k_histogram.png")


def plot_trend(history: list[dict[str, Any]], metric: str, folder: Path) -> str:
    """`metric` (scope all, batch 1, or the batched setting of a suite without batch 1) of each method over the
    runs of this suite, oldest first."""
    runs = list(dict.fromkeys(r["run_id"] for r in history))
    settings = sorted({r.get("setting") for r in history if r.get("setting")}, key=lambda s: s != "batch-1")
    setting = settings[0] if settings else "batch-1"
    series: dict[str, dict[int, float]] = {}
    for r in history:
        if r.get("setting") == setting and r.get("scope") == "all" and r.get(metric) is not None:
            series.setdefault(r["method"], {})[runs.index(r["run_id"])] = r[metric]
    figure, ax = _pyplot().subplots(figsize=(7, 3.5))
    for method, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", markersize=3, label=method)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([r[:15] for r in runs], rotation=45, ha="right", fontsize=6)
    ax.set(ylabel=metric, title=f"{metric} over the history ({setting.replace('-', ' ')}, all documents)")
    _legend(ax, fontsize=6, ncol=2)
    return _save(figure, folder, f"trend_{metric}.png")
