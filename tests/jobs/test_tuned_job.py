"""Jobs that tune by measurement (the default) on a real local Ray: the plan in summary.json and the report, the same
output as AR's under strict verification, every document once, the plan reused by the next job, `--objective
latency` at batch 1, and `cmsd-jobs tune`.

The actors time with the wall clock (they are Ray's processes), so these tests assert what holds whatever was
picked; what is picked from given costs is tests/cmsd/test_tuning.py's. Plans are kept per decode settings: each
test makes its settings its own with a stop string no output holds, so a plan from an earlier run is never reused
where a test needs one measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.batch.lifecycle import submit
from jobs.batch.report import NO_DRAFTS
from jobs.errors import BadInput
from tests.jobs.test_job_ray import Recorder, assert_each_once, job_spec
from tests.raytest import articles, write_jsonl

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.ray
CANDIDATE_FIELDS = {"method", "drafter", "batch_size", "tokens_per_s", "doc_s", "tokens_per_call", "acceptance_rate",
                    "agreement_with_ar", "kv_mb", "measured", "label"}


def hypotheses(job_dir: str) -> dict[str, str]:
    out = {}
    for path in sorted(Path(job_dir, "results").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "hypothesis"]).to_pylist()
        out.update((r["id"], r["hypothesis"]) for r in table)
    return out


def unique_stop() -> list[str]:
    return [f"<never-{uuid.uuid4().hex}>"]


def test_a_tuned_job_explains_its_choice_and_decodes_as_ar(tmp_path: Path, tiny_target: Path, ray_local: str) -> None:
    docs = articles(12)
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    spec = job_spec(corpus, tiny_target, tmp_path / "runs").with_("decode", stop=unique_stop(), verify_tokens=8)
    # (a verify budget of 8 tokens: the actors time with the wall clock, and a budget measured under load may leave
    # no draft at batch 1, where no speculative candidate competes)
    assert spec.execution.tune and spec.execution.objective == "throughput"  # the defaults
    ar = submit(spec.with_("execution", tune=False).with_("decode", method="ar").with_("output", job_id="ar"),
                observer=Recorder())
    first = submit(spec.with_("output", job_id="first"), observer=Recorder())
    assert_each_once(first.uri, [d["id"] for d in docs])
    assert hypotheses(first.uri) == hypotheses(ar.uri)  # strict: whatever it picked decodes as AR does
    tuning = first.summary["tuning"]
    assert tuning["source"] == "measured" and tuning["seconds"] > 0 and tuning["objective"] == "throughput"
    assert all(CANDIDATE_FIELDS <= set(c) for c in tuning["candidates"])
    labels = [c["label"] for c in tuning["candidates"]]
    assert "ar b1" in labels and "cmasd/ngram b1" in labels and tuning["chosen"]["label"] in labels
    assert max(c["batch_size"] for c in tuning["candidates"]) == 4  # 12 documents in 3 shards: 4 a batch at most
    for c in tuning["candidates"]:  # a batch > 1 is measured only by a confirming decode (the spare documents of a
        # shard of 4 with 1 sampled fit none of 4)
        confirmed = c["predicted_tokens_per_s"] is not None
        assert c["measured"] == (c["batch_size"] == 1 and c["method"] != "ar" or confirmed)
    spec_b1 = next(c for c in tuning["candidates"] if c["label"] == "cmasd/ngram b1")
    assert spec_b1["agreement_with_ar"] == 1.0 and spec_b1["tokens_per_call"] >= 1
    assert set(tuning["actors"].values()) <= set(labels)
    # no document decoded twice: the job's comparison with AR is its tuning's (AR at its own best batch)
    assert first.summary["baseline"]["docs"] == 0
    assert first.summary["overall"]["speedup_vs_ar"] == tuning["speedup_vs_ar"]
    if tuning["chosen"]["method"] == "ar":
        assert tuning["speedup_vs_ar"] == 1.0  # AR at AR's own best batch: itself
    job = Path(first.uri)
    report = (job / "report.md").read_text()
    assert "## Tuning" in report and "plots/tuning.png" in report and (job / "plots/tuning.png").is_file()
    for name, what in (("k_histogram", "draft-length histogram"), ("confidence_acceptance",
                                                                   "confidence-vs-acceptance plot")):
        drawn = f"plots/{name}.png" in report and (job / f"plots/{name}.png").is_file()
        assert drawn != (NO_DRAFTS.format(what=what) in report), name  # a plot with data, or a line saying why not
    second = submit(spec.with_("output", job_id="second"), observer=Recorder())
    assert second.summary["tuning"]["source"] == "reused"  # the plan kept on this machine: no measuring
    # the plan one of the first job's actors kept (each measured on its own, by the wall clock: they may differ)
    assert second.summary["tuning"]["chosen"]["label"] in set(tuning["actors"].values())
    assert hypotheses(second.uri) == hypotheses(ar.uri)


def test_objective_latency_decodes_one_document_at_a_time(tmp_path: Path, tiny_target: Path, ray_local: str) -> None:
    docs = articles(8)
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    spec = job_spec(corpus, tiny_target, tmp_path / "runs", objective="latency").with_("decode", stop=unique_stop())
    done = submit(spec, observer=Recorder())
    assert_each_once(done.uri, [d["id"] for d in docs])
    tuning = done.summary["tuning"]
    assert tuning["objective"] == "latency" and tuning["chosen"]["batch_size"] == 1
    assert tuning["ar"]["label"] == "ar b1"
    # no document decoded twice: the job's comparison with AR is its tuning's
    assert done.summary["baseline"]["docs"] == 0 and done.summary["overall"]["speedup_vs_ar"] == tuning["speedup_vs_ar"]


def test_tune_prints_the_plan_and_keeps_it(tmp_path: Path, tiny_target: Path) -> None:
    corpus = write_jsonl(tmp_path / "docs.jsonl", articles(5))
    env = {**os.environ, "CMSD_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "jobs", "tune", "--corpus", str(corpus), "--target", str(tiny_target),
               "--max-new-tokens", "8", "--set", "decode.verify_tokens=8", "--docs", "2"]  # (as above)
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Tuned for throughput (measured now" in first.stdout and "| cmasd/ngram b1 |" in first.stdout
    kept = list((tmp_path / "cache" / "plans").glob("*.json"))
    assert len(kept) == 1 and str(kept[0]) in first.stdout
    plan = json.loads(kept[0].read_text())["plan"]
    assert plan["chosen"]["label"] in [c["label"] for c in plan["candidates"]]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "(reused: measured before)" in again.stdout and "reused, measured" in again.stdout
    bad = subprocess.run(command[:-2] + ["--docs", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--docs must be >= 1" in bad.stderr


def test_the_tuning_sample_grows_with_the_job_and_no_tune_turns_it_off(tmp_path: Path) -> None:
    from jobs.batch.driver import tune_config
    from jobs.batch.spec import JobSpec

    spec = JobSpec.from_dict({"corpus": {"path": "docs.jsonl"}, "execution": {"actors": 2}})
    small = [12] * 4  # 48 documents: 24 an actor
    big = [64] * 15_625  # a million
    assert tune_config(spec, small).sample == 1 and tune_config(spec, small).max_batch == 12
    assert tune_config(spec, small).docs == 24 and tune_config(spec, big).docs == 500_000
    assert tune_config(spec, big).sample == 8 and tune_config(spec, big).max_batch == 64
    assert tune_config(spec, small).objective == "throughput" and tune_config(spec, small).task == "summarization"
    latency = spec.with_("execution", objective="latency")  # its sample decodes are the documents' own: the most
    assert tune_config(latency, small).sample == 8 and tune_config(latency, small).objective == "latency"
    assert tune_config(spec.with_("execution", tune=False), small) is None
    with pytest.raises(BadInput, match="execution.objective must be one of throughput, latency"):
        JobSpec.from_dict({"corpus": {"path": "docs.jsonl"}, "execution": {"objective": "fast"}})
