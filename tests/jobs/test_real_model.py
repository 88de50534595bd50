"""End to end on the real offline model: the demo spec, cut to a few rows, through the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main

pytestmark = [pytest.mark.real_model, pytest.mark.ray]


def test_the_demo_job_on_smollm2(tmp_path: Path, ray_local: str) -> None:
    args = ["submit", "--demo", "--limit", "4", "--shards", "2", "--max-new-tokens", "16", "--out", str(tmp_path),
            "--set", "decode.verify_tokens=4"]  # a budget measured under load may leave no draft, and no cmasd candidate
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    job = Path(lines[-1])
    assert job.parent == tmp_path and lines[-2] == f"report: {job}/report.md"
    summary = json.loads((job / "summary.json").read_text())
    overall = summary["overall"]
    assert summary["docs"] == 4 and summary["target"] == "smollm2" and summary["drafter"] == "ngram"
    assert 0 < overall["new_tokens"] <= 4 * 16 and overall["tokens_per_call"] >= 1
    assert 0 <= overall["acceptance_rate"] <= 1 and overall["rougeL"] is not None
    tuning = summary["tuning"]  # tuned by measurement (the default): what it ran and why
    assert tuning["chosen"]["label"] in [c["label"] for c in tuning["candidates"]]
    assert any(c["label"] == "cmasd/ngram b1" and c["measured"] for c in tuning["candidates"])
    assert summary["baseline"]["docs"] == 0  # no document decoded twice: the comparison is the tuning's
    assert overall["speedup_vs_ar"] == tuning["speedup_vs_ar"] > 0  # against AR at its own best batch
    assert overall["agreement_with_ar"] == 1.0  # the demo's cmasd is strict: AR's output exactly
    hypotheses = pq.read_table(job / "results", columns=["hypothesis"]).column("hypothesis").to_pylist()
    assert len(hypotheses) == 4 and all(h.strip() for h in hypotheses)
    report = (job / "report.md").read_text()
    drawn = {p.name for p in (job / "plots").glob("*.png")}
    assert (job / "report.html").is_file() and {"throughput.png", "tuning.png"} <= drawn
    assert drawn == set(re.findall(r"\(plots/(\w+\.png)\)", report))  # every plot drawn is in the report
