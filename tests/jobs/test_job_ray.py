"""Whole jobs on a real local Ray: bad rows, a killed worker, an interrupted driver, a second node.

Every test checks the product's promise: every good row is in exactly one result file, refused rows are in
the errors files, nothing is lost or written twice. The two-node test comes last in this module.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from jobs.batch.driver import actor_name, cpu_share
from jobs.errors import JobFailed
from jobs.batch.lifecycle import JobResult, create, load_job, resume, status, submit
from jobs.batch.manifest import unfinished
from jobs.batch.progress import LogProgress
from jobs.batch.reducer import reduce_job
from jobs.batch.report import NO_DRAFTS
from jobs.batch.spec import JobSpec
from tests.raytest import articles, error_records, result_ids, write_jsonl
from workers.protocol import ShardTask, WorkerInfo
from workers.store import JobStore

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.ray


def job_spec(corpus: Path, target: Path, out: Path, **execution: Any) -> JobSpec:
    return JobSpec.from_dict({
        "corpus": {"path": str(corpus)}, "models": {"target": str(target), "drafter": "ngram", "device": "cpu"},
        "decode": {"method": "cmasd", "max_new_tokens": 12, "batch_size": 4},
        "execution": {"actors": 2, "shards": 3, **execution}, "output": {"dir": str(out)}})


def assert_each_once(job_dir: str, expected: list[str]) -> None:
    counts = collections.Counter(result_ids(job_dir))
    assert sorted(counts) == sorted(expected), "every good row is in the results"
    assert set(counts.values()) == {1}, f"rows written twice: {[k for k, v in counts.items() if v > 1]}"


class Recorder(LogProgress):
    """The log lines, plus which shards started; `on_start` may act on the worker (kill it)."""

    def __init__(self, on_start: Any = None) -> None:
        super().__init__(0, 0, sys.stderr)
        self.started: list[ShardTask] = []
        self.on_start = on_start

    def shard_started(self, task: ShardTask, worker: WorkerInfo) -> None:
        super().shard_started(task, worker)
        self.started.append(task)
        if self.on_start:
            self.on_start(task, worker)


GOOD = articles(10)
BAD = [{"id": "empty", "source": "  "}, {"id": "number", "source": 12345}, {"id": "nothing"},
       {"id": "long", "source": "very long article " * 250, "reference": "r"}, {"id": "doc-003", "source": "dup"}]


@pytest.fixture(scope="module")
def bad_rows_job(tmp_path_factory: pytest.TempPathFactory, tiny_target: Path, ray_local: str) -> JobResult:
    folder = tmp_path_factory.mktemp("bad-rows")
    rows = GOOD[:3] + BAD[:2] + GOOD[3:7] + BAD[2:] + GOOD[7:]
    corpus = write_jsonl(folder / "docs.jsonl", rows)
    return submit(job_spec(corpus, tiny_target, folder / "runs", tune=False), observer=Recorder())  # as the spec says


def test_actors_share_the_cpus_by_default(ray_local: str) -> None:
    """execution.cpus_per_actor auto on the tests' 2-CPU Ray: one actor decodes with both cores, two take one each,
    and more actors than CPUs still get one each."""
    assert [cpu_share(actors) for actors in (1, 2, 3)] == [2, 1, 1]


def test_a_job_with_bad_rows_completes(bad_rows_job: JobResult) -> None:
    job = Path(bad_rows_job.uri)
    assert_each_once(bad_rows_job.uri, [r["id"] for r in GOOD])
    errors = {e["id"]: e for e in error_records(job)}
    assert sorted(errors) == ["doc-003", "empty", "long", "nothing", "number"]
    assert errors["empty"]["reason"] == "empty 'source'" and errors["number"]["row"] == 4
    assert errors["long"]["reason"].startswith("too long for the model")
    assert errors["doc-003"]["reason"].startswith("duplicate id 'doc-003'")
    summary = json.loads((job / "summary.json").read_text())
    assert summary["docs"] == 10 and summary["errors"] == 5 and len(summary["per_shard"]) == 3
    overall = summary["overall"]
    assert overall["new_tokens"] == sum(s["new_tokens"] for s in summary["per_shard"]) == 10 * 12
    assert overall["tokens_per_call"] == pytest.approx(overall["new_tokens"] / overall["target_calls"])
    assert overall["rouge1"] is not None and overall["scored_docs"] == 10 and overall["bleu"] is None
    baseline = summary["baseline"]  # the default --baseline 8: two groups of batch_size 4, in shards 0 and 1
    assert 1 <= baseline["docs"] <= 8 and baseline["ar_tokens_per_s"] > 0
    assert overall["agreement_with_ar"] == 1.0 and overall["speedup_vs_ar"] > 0  # strict: AR's output exactly
    assert summary["per_shard"][2]["speedup_vs_ar"] is None
    assert "Against AR on" in (job / "report.md").read_text()
    assert summary["run"]["sum_decode_s"] > 0 and summary["run"]["wall_s"] > 0
    weights = summary["run"]["workers"][0]["weights_mb"]  # the tiny target: 49152 x 32 tied floats and 2 layers
    assert 6 < weights < 7 and weights < summary["run"]["actor_peak_rss_mb"] < 4096


def test_the_job_directory_holds_what_design_md_lists(bad_rows_job: JobResult) -> None:
    job = Path(bad_rows_job.uri)
    for name in ("spec.yaml", "manifest.json", "summary.json", "report.md", "report.html", "plots/throughput.png"):
        assert (job / name).is_file(), name
    report = (job / "report.md").read_text()  # a draft plot, or (the measured verify budget left no draft at batch 4)
    for name, what in (("k_histogram", "draft-length histogram"), ("confidence_acceptance",  # a line saying why not
                                                                   "confidence-vs-acceptance plot")):
        drafted = json.loads((job / "summary.json").read_text())["overall"]["mean_k"] > 0
        assert (job / f"plots/{name}.png").is_file() == drafted != (NO_DRAFTS.format(what=what) in report), name
    manifest = json.loads((job / "manifest.json").read_text())
    refused = {}
    for shard in manifest["shards"]:
        rows, refused[shard["index"]] = JobStore(str(job)).result_counts(shard["result"])
        assert pq.read_metadata(job / shard["result"]).num_rows == rows == shard["rows"] - refused[shard["index"]]
        assert (job / shard["path"].replace("shards/", "traces/").replace(".arrow", ".parquet")).is_file()
    assert sorted(refused.values()) == [0, 0, 1], "the long row, refused by its worker"
    assert manifest["models"]["target"]["fingerprint"] and manifest["code"]["ray"]
    info = status(bad_rows_job.uri)
    assert info["state"] == "done" and info["rows_refused"] == 5 and len(info["error_files"]) == 4
    for result in (job / "results").glob("shard-*.parquet"):
        lengths = [len(s) for s in pq.read_table(result).column("source").to_pylist()]
        assert lengths == sorted(lengths), "rows are sorted by length inside a shard"


def test_the_reducer_refuses_a_row_written_twice_or_lost(bad_rows_job: JobResult, tmp_path: Path) -> None:
    copy = tmp_path / "job"
    shutil.copytree(bad_rows_job.uri, copy)
    store, spec, manifest = load_job(str(copy))
    first, second = (copy / "results" / f"shard-0000{i}.parquet" for i in (0, 1))
    a, b = pq.read_table(first), pq.read_table(second)
    pq.write_table(b.slice(0, b.num_rows - 1).append_column if False else
                   __import__("pyarrow").concat_tables([b.slice(0, b.num_rows - 1), a.slice(0, 1)]), second)
    with pytest.raises(JobFailed, match="does not match"):
        reduce_job(store, manifest, spec, None)
    first.unlink()
    assert [e.index for e in unfinished(store, manifest)] == [0]
    with pytest.raises(JobFailed, match="not done"):
        reduce_job(store, manifest, spec, None)


def test_a_killed_worker_is_replaced_and_its_shard_retried(tmp_path: Path, tiny_target: Path,
                                                          ray_local: str) -> None:
    corpus = write_jsonl(tmp_path / "docs.jsonl", articles(16))
    killed: list[int] = []

    def kill_once(task: ShardTask, worker: WorkerInfo) -> None:
        if not killed and task.index == 1:
            os.kill(worker.pid, signal.SIGKILL)  # the worker process dies with shard 1 in flight
            killed.append(worker.pid)

    spec = job_spec(corpus, tiny_target, tmp_path / "runs", shards=4).with_("decode", max_new_tokens=24)
    result = submit(spec, observer=Recorder(kill_once))
    assert killed
    assert_each_once(result.uri, [r["id"] for r in articles(16)])
    run = result.summary["run"]
    assert run["actors_replaced"] >= 1 and run["retries"] >= 1 and not run["failed"]
    attempts = pq.read_table(Path(result.uri) / "results" / "shard-00001.parquet").column("attempt").to_pylist()
    assert set(attempts) == {2}


def test_actors_that_cannot_load_the_model_fail_the_job_with_a_reason(tmp_path: Path, tiny_target: Path,
                                                                      ray_local: str) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_target, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # config and tokenizer fine: the driver's check passes
    corpus = write_jsonl(tmp_path / "docs.jsonl", articles(4))
    spec = job_spec(corpus, broken, tmp_path / "runs", actors=1, retries=0)
    with pytest.raises(JobFailed, match="worker actors fail to start"):
        submit(spec, observer=Recorder())
    [job] = (tmp_path / "runs").iterdir()
    assert status(str(job))["unfinished"] == [0, 1, 2]


def test_an_interrupted_job_resumes_only_the_unfinished_shards(tmp_path: Path, tiny_target: Path,
                                                              ray_local: str) -> None:
    corpus = write_jsonl(tmp_path / "docs.jsonl", articles(32, words=40))
    job = tmp_path / "runs" / "interrupted"
    command = [sys.executable, "-m", "jobs", "submit", "--corpus", str(corpus), "--target", str(tiny_target),
               "--out", str(tmp_path / "runs"), "--job-id", "interrupted", "--shards", "8", "--actors", "1",
               "--max-new-tokens", "48", "--batch-size", "2", "--address", ray_local]
    log = tmp_path / "driver.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(list((job / "results").glob("shard-*.parquet"))) >= 2, driver, log=log)
    finally:
        driver.kill()  # the driver dies; Ray kills its actors
        driver.wait()
    time.sleep(2)  # let an actor that was mid-write finish or die
    left = status(str(job))["unfinished"]
    assert 0 < len(left) < 8, "interrupted after some shards"
    before = {p.name: p.stat().st_mtime_ns for p in (job / "results").glob("shard-*.parquet")}
    recorder = Recorder()
    result = resume(str(job), observer=recorder)
    assert sorted(t.index for t in recorder.started) == left
    assert result.summary["run"]["shards_run"] == left
    for name, mtime in before.items():
        assert (job / "results" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert_each_once(str(job), [r["id"] for r in articles(32)])


def test_a_prepared_job_runs_on_resume(tmp_path: Path, tiny_target: Path, ray_local: str) -> None:
    corpus = write_jsonl(tmp_path / "docs.jsonl", articles(4))
    store, _, manifest = create(job_spec(corpus, tiny_target, tmp_path / "runs", shards=2))  # --prepare-only
    assert status(store.uri)["unfinished"] == [0, 1] and not (Path(store.uri) / "results").exists()
    result = resume(store.uri, observer=Recorder())
    assert result.summary["run"]["shards_run"] == [0, 1] and result.summary["docs"] == 4
    assert_each_once(result.uri, [r["id"] for r in articles(4)])


def test_a_job_with_dummy_weights_says_so_and_scores_no_quality(tmp_path: Path, ray_local: str) -> None:
    """`--load-format dummy` on the smollm2-135m shape: the actor builds random weights of that shape (no weights
    read), the report's first line says so, and summary.json has no quality numbers, only a note why."""
    from click.testing import CliRunner

    from jobs.batch.quality import DUMMY_NOTE, DUMMY_TITLE
    from jobs.cli import main

    corpus = write_jsonl(tmp_path / "docs.jsonl", articles(3, words=12))
    result = CliRunner().invoke(main, [
        "submit", "--corpus", str(corpus), "--target", "smollm2-135m", "--load-format", "dummy", "--method", "cmasd",
        "--max-new-tokens", "8", "--actors", "1", "--shards", "1", "--baseline", "1", "--no-tune", "--set",
        "models.device=cpu", "--out", str(tmp_path / "runs"), "--job-id", "dummy"])
    assert result.exit_code == 0, result.output
    job = tmp_path / "runs" / "dummy"
    assert result.output.strip().splitlines()[-1] == str(job) and "dummy weights" in result.output
    for report in ("report.md", "report.html"):
        first = (job / report).read_text().splitlines()[0]
        assert f"Job dummy ({DUMMY_TITLE})" in first, first
    summary = json.loads((job / "summary.json").read_text())
    assert summary["load_format"] == "dummy" and summary["notes"] == [DUMMY_NOTE] and summary["docs"] == 3
    overall = summary["overall"]
    assert all(overall[k] is None for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"))
    assert overall["scored_docs"] == 0
    assert overall["new_tokens"] > 0 and overall["tokens_per_s"] > 0
    assert overall["agreement_with_ar"] == 1.0  # strict: the dummy model's own AR output, exactly
    manifest = json.loads((job / "manifest.json").read_text())
    assert manifest["models"]["load_format"] == "dummy" and manifest["models"]["target"]["name"] == "smollm2-135m"


def wait_for(condition: Any, process: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended early: {log.read_text()[-3000:] if log else ''}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def second_node(ray_local: str) -> Any:
    """A second Ray node process on this machine (`ray start --address`), removed afterwards."""
    import ray

    ray_cli = Path(sys.executable).parent / "ray"
    node = subprocess.Popen([str(ray_cli), "start", f"--address={ray_local}", "--num-cpus=1", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, node, timeout=60)
        yield node
    finally:
        node.send_signal(signal.SIGTERM)  # drains, then stops the node's own processes
        try:
            node.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        marker = Path("/tmp/ray/ray_current_cluster")  # `ray start` records the address; it was ours
        if marker.is_file() and marker.read_text().strip() == ray_local:
            marker.unlink()


def test_a_job_spreads_its_shards_over_two_nodes(second_node: Any, tmp_path: Path, tiny_target: Path) -> None:
    """Two actors, spread one per node; the first shard waits until both actors are up, so both get work."""
    import ray

    corpus = write_jsonl(tmp_path / "docs.jsonl", articles(12))
    spec = job_spec(corpus, tiny_target, tmp_path / "runs", shards=8).with_("output", job_id="two-nodes")

    def wait_for_both_actors(task: ShardTask, worker: WorkerInfo) -> None:
        if task.index == 0:
            ray.get([ray.get_actor(actor_name(spec, n)).info.remote() for n in range(2)])

    result = submit(spec, observer=Recorder(wait_for_both_actors))
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {w["node_id"] for w in result.summary["run"]["workers"]} == nodes and len(nodes) == 2
    assert_each_once(result.uri, [r["id"] for r in articles(12)])
    used = set(pq.read_table(Path(result.uri) / "results").column("node_id").to_pylist())
    assert used == nodes
    assert result.summary["nodes"] == sorted(nodes)


def test_a_finished_job_projects_onto_another_devices_curve(bad_rows_job: JobResult, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cmsd.costs import Curve
    from jobs.batch.projection import job_arm
    from jobs.cli import main

    arm = job_arm(JobStore(bad_rows_job.uri))
    results = [pq.read_table(p).to_pylist() for p in sorted(Path(bad_rows_job.uri, "results").glob("*.parquet"))]
    docs = [row for table in results for row in table]
    assert (arm.method, arm.drafter, arm.docs) == ("cmasd", "ngram", len(docs))
    assert (arm.new_tokens, arm.iterations, arm.drafted) == tuple(sum(d[k] for d in docs) for k in (
        "new_tokens", "iterations", "drafted"))
    assert sum(arm.runs.values()) <= arm.iterations  # a pass that drafted, at most one a verify pass
    flat = {(r, t, 256): 0.01 * max(1.0, r * t / 32) for r in (1, 8, 32) for t in (1, 2, 4, 8)}  # a GPU's pass
    curve = tmp_path / "curve.json"
    Curve("gpu-like", "a GPU", "bfloat16", True, flat, {64: 0.002, 512: 0.01}).save(curve)
    out = CliRunner().invoke(main, ["project", bad_rows_job.uri, "--curve", str(curve), "--batches", "1,8"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("Projection (not a measurement)")
    assert all(f"| {label} |" in out.output for label in ("ar b1", "ar b8", "cmasd/ngram b1", "cmasd/ngram b8"))
    bad = CliRunner().invoke(main, ["project", bad_rows_job.uri, "--curve", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and "none.json: cannot read it" in bad.output
