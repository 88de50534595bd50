"""The GPU check (scripts/gpu_check.sh) runs with --device cpu and small settings, so that it cannot rot: what it
writes (cost curves, decodes with their syncs per iteration, the projection of the real model's traces) is checked
for its content, never for its timings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "check"
    run = subprocess.run([str(ROOT / "scripts/gpu_check.sh"), "--device", "cpu", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    (shape,) = report["shapes"]
    curve, settings = shape["curve"], report["settings"]
    assert shape["shape"] == "smollm2-135m" and curve["dummy"] and curve["dtype"] == "float32"
    assert len(curve["steps"]) == len(settings["batches"]) * len(settings["tokens"]) * len(settings["contexts"])
    assert all(step["s"] > 0 for step in curve["steps"]) and len(curve["prefill"]) == len(settings["prefill"])
    loops = {(loop["method"], loop["drafter"], loop["rows"]): loop for loop in curve["loops"]}
    arms = [("ar", None), ("cmasd", "ngram"), ("cmasd", "head")]  # the head: a dummy one of the shipped head's shape
    assert set(loops) == {(m, d, b) for m, d in arms for b in settings["batches"]}
    for (method, drafter, rows), loop in loops.items():
        assert loop["new_tokens"] == rows * settings["new_tokens"]  # a random model runs to the budget
        assert loop["syncs"] <= (1.0 if drafter != "head" else 5.0)  # tests/cmsd/test_syncs.py: why the head's
    traces = json.loads((ROOT / "scripts/data/smollm2-135m.traces.json").read_text())
    projected = {(row["label"], row["batch_size"]) for row in report["projection"]["rows"]}
    labels = {arm["method"] if arm["method"] == "ar" else f"{arm['method']}/{arm['drafter']}" for arm in traces["arms"]}
    assert projected == {(f"{label} b{b}", b) for label in labels for b in settings["batches"]}  # no budget: a GPU's
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.splitlines()[0].startswith("# GPU check") and "dummy weights" in markdown.splitlines()[0]
    assert "## Projection" in markdown and "A projection, not a measurement" in markdown
