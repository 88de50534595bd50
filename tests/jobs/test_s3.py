"""Jobs on object storage, against a real S3 server on 127.0.0.1 (moto's, over HTTP, signatures checked), reached
through pyarrow's own S3FileSystem (AWS_ENDPOINT_URL): corpora and job directories on s3://, what a platform
engineer runs on a cluster whose nodes share no disk. Each test uses its own bucket; the server is shared.

The guarantees are the local disk's: every good row in exactly one result, bad rows recorded, nothing lost or
written twice when a driver or a worker dies or the store goes away for a few seconds, and no temporary object
ever (an object PUT is atomic: results are written to their final keys, workers/store.py).
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.batch.lifecycle import create, report_only, resume, status, submit
from jobs.batch.spec import JobSpec
from jobs.errors import BadInput, JobFailed
from tests.jobs.test_job_ray import BAD, GOOD, Recorder, wait_for
from tests.raytest import S3Server, articles
from workers.protocol import ShardOutcome, ShardTask, WorkerInfo
from workers.store import TMP_PREFIX, JobStore

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.ray


def jsonl(records: list[Any]) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def s3_spec(corpus: str, target: Path, out: str, **execution: Any) -> JobSpec:
    return JobSpec.from_dict({
        "corpus": {"path": corpus}, "models": {"target": str(target), "drafter": "ngram", "device": "cpu"},
        "decode": {"method": "cmasd", "max_new_tokens": 8, "batch_size": 4},
        "execution": {"actors": 1, "shards": 3, "baseline": 0, **execution}, "output": {"dir": out}})


def result_ids_s3(job_uri: str) -> list[str]:
    """Every id in every committed result object, read back through pyarrow from the bucket (duplicates kept)."""
    fs, root = pafs.FileSystem.from_uri(job_uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/results", allow_not_found=True))
    names = sorted(i.path for i in infos if i.base_name.startswith("shard-") and i.base_name.endswith(".parquet"))
    return [doc_id for name in names for doc_id in pq.read_table(name, columns=["id"], filesystem=fs)
            .column("id").to_pylist()]


def assert_each_once_s3(job_uri: str, expected: list[str]) -> None:
    counts = collections.Counter(result_ids_s3(job_uri))
    assert sorted(counts) == sorted(expected), "every good row is in the results"
    assert set(counts.values()) == {1}, f"rows written twice: {[k for k, v in counts.items() if v > 1]}"


def assert_no_temporary(s3: S3Server, bucket: str) -> None:
    left = [key for key in s3.objects(bucket) if TMP_PREFIX in key]
    assert not left, f"temporary objects: {left}"


def error_ids(s3: S3Server, job_key: str) -> list[str]:
    return sorted(json.loads(line)["id"] or f"row {json.loads(line)['row']}" for key, data in s3.objects(f"{job_key}/errors").items()
                  for line in data.decode().splitlines() if line.strip())


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def s3_job(s3_server: S3Server, tiny_target: Path, ray_local: str) -> dict[str, Any]:
    """A job submitted from the command line with its JSONL corpus (good and bad rows) and its job directory on S3."""
    bucket = s3_server.bucket("jsonl-job")
    corpus = s3_server.put("jsonl-job/in/docs.jsonl", jsonl(GOOD[:3] + BAD[:2] + GOOD[3:7] + BAD[2:] + GOOD[7:]))
    done = cli("submit", "--corpus", corpus, "--target", str(tiny_target), "--out", f"{bucket}/runs",
               "--job-id", "first", "--max-new-tokens", "8", "--actors", "1", "--shards", "3", "--address", ray_local)
    return {"bucket": bucket, "uri": f"{bucket}/runs/first", "key": "jsonl-job/runs/first", "done": done}


def test_a_job_reads_and_writes_s3(s3_job: dict[str, Any], s3_server: S3Server) -> None:
    done = s3_job["done"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == s3_job["uri"]
    assert_each_once_s3(s3_job["uri"], [r["id"] for r in GOOD])
    assert error_ids(s3_server, s3_job["key"]) == ["doc-003", "empty", "long", "nothing", "number"]
    objects = s3_server.objects(s3_job["key"])
    for name in ("spec.yaml", "manifest.json", "summary.json", "report.md", "report.html", "plots/throughput.png"):
        assert f"{s3_job['key']}/{name}" in objects, name
    summary = json.loads(objects[f"{s3_job['key']}/summary.json"])
    assert summary["docs"] == 10 and summary["errors"] == 5
    assert all(s["io_s"] > 0 for s in summary["per_shard"])  # each shard's reads and writes, timed by its worker
    run = summary["run"]
    assert run["sum_io_s"] == pytest.approx(sum(s["io_s"] for s in summary["per_shard"]))
    assert 0 < run["io_share"] < 1 and "Reading shards and writing their results took" in \
        objects[f"{s3_job['key']}/report.md"].decode()
    assert_no_temporary(s3_server, "jsonl-job")


def test_status_and_report_of_a_job_on_s3(s3_job: dict[str, Any], s3_server: S3Server) -> None:
    info = status(s3_job["uri"])
    assert info["state"] == "done" and info["rows_refused"] == 5
    assert info["rows_done"] == 11  # the shards' rows: the long one is refused by its worker
    result = report_only(s3_job["uri"])
    assert result.summary["docs"] == 10 and result.report == f"{s3_job['uri']}/report.md"
    assert "first" in s3_server.objects(s3_job["key"])[f"{s3_job['key']}/report.md"].decode()
    shown = cli("status", s3_job["uri"], "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "done"


def test_no_credential_reaches_a_file_or_the_output(s3_job: dict[str, Any], s3_server: S3Server) -> None:
    """The credentials the job ran with (planted by the server fixture) are in none of the files the job wrote and
    nowhere in what it printed."""
    secrets = [s3_server.access_key.encode(), s3_server.secret_key.encode()]
    for key, data in s3_server.objects(s3_job["key"]).items():
        assert not any(s in data for s in secrets), f"a credential in {key}"
    printed = (s3_job["done"].stdout + s3_job["done"].stderr).encode()
    assert not any(s in printed for s in secrets)


def test_a_parquet_corpus_on_s3_prepared_then_resumed(s3_server: S3Server, tiny_target: Path,
                                                      ray_local: str) -> None:
    bucket = s3_server.bucket("parquet-job")
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(articles(6)), sink)
    corpus = s3_server.put("parquet-job/in/docs.parquet", sink.getvalue())
    store, _, _ = create(s3_spec(corpus, tiny_target, f"{bucket}/runs", shards=2))  # --prepare-only
    assert store.uri.startswith("s3://parquet-job/runs/")
    assert status(store.uri)["unfinished"] == [0, 1] and not store.list("results")
    result = resume(store.uri, observer=Recorder())
    assert result.summary["run"]["shards_run"] == [0, 1] and result.summary["docs"] == 6
    assert_each_once_s3(store.uri, [r["id"] for r in articles(6)])
    assert_no_temporary(s3_server, "parquet-job")


def test_a_killed_worker_is_replaced_on_s3(s3_server: S3Server, tiny_target: Path, ray_local: str) -> None:
    bucket = s3_server.bucket("worker-killed")
    corpus = s3_server.put("worker-killed/docs.jsonl", jsonl(articles(12)))
    killed: list[int] = []

    def kill_once(task: ShardTask, worker: WorkerInfo) -> None:
        if not killed and task.index == 1:
            os.kill(worker.pid, signal.SIGKILL)  # the worker process dies with shard 1 in flight
            killed.append(worker.pid)

    result = submit(s3_spec(corpus, tiny_target, f"{bucket}/runs", shards=3), observer=Recorder(kill_once))
    assert killed and result.summary["run"]["actors_replaced"] >= 1
    assert_each_once_s3(result.uri, [r["id"] for r in articles(12)])
    assert_no_temporary(s3_server, "worker-killed")


def test_a_driver_killed_mid_job_on_s3_resumes(s3_server: S3Server, tiny_target: Path, ray_local: str,
                                               tmp_path: Path) -> None:
    bucket = s3_server.bucket("driver-killed")
    rows = articles(24, words=40) + [{"id": "empty", "source": " "}, "{not json"]
    corpus = s3_server.put("driver-killed/docs.jsonl", jsonl(rows))
    uri = f"{bucket}/runs/interrupted"
    command = [sys.executable, "-m", "jobs", "submit", "--corpus", corpus, "--target", str(tiny_target),
               "--out", f"{bucket}/runs", "--job-id", "interrupted", "--shards", "6", "--actors", "1",
               "--max-new-tokens", "32", "--batch-size", "2", "--address", ray_local]
    log = tmp_path / "driver.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(s3_server.objects("driver-killed/runs/interrupted/results")) >= 2, driver, log=log)
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies; Ray kills its actors
        driver.wait()
    left = status(uri)["unfinished"]
    assert 0 < len(left) < 6, "interrupted after some shards"
    recorder = Recorder()
    result = resume(uri, observer=recorder)
    assert sorted(t.index for t in recorder.started) == sorted(left)
    assert_each_once_s3(uri, [r["id"] for r in articles(24)])
    refused = error_ids(s3_server, "driver-killed/runs/interrupted")  # the empty source, the line that is not JSON
    assert len(refused) == 2 and "empty" in refused
    assert result.summary["errors"] == 2
    assert_no_temporary(s3_server, "driver-killed")


def test_the_store_away_for_seconds_mid_job(s3_server: S3Server, tiny_target: Path, ray_local: str) -> None:
    """The S3 server stops as the first shard is committed and starts again 5 s later: the job's requests are
    retried with backoff and the job finishes, or it fails (exit 1) and resume finishes it; either way nothing is
    lost or written twice."""
    bucket = s3_server.bucket("store-away")
    corpus = s3_server.put("store-away/docs.jsonl", jsonl(articles(12)))
    spec = s3_spec(corpus, tiny_target, f"{bucket}/runs", shards=4, retries=1).with_("output", job_id="away")
    stopped = threading.Event()

    class StopTheStore(Recorder):
        def shard_finished(self, outcome: ShardOutcome) -> None:
            super().shard_finished(outcome)
            if not stopped.is_set():
                stopped.set()
                s3_server.stop()
                restart.start()

    restart = threading.Timer(5.0, s3_server.start)
    try:
        submit(spec, observer=StopTheStore())
    except JobFailed:
        restart.join()
        resume(f"{bucket}/runs/away", observer=Recorder())
    finally:
        restart.join()
    assert stopped.is_set()
    assert_each_once_s3(f"{bucket}/runs/away", [r["id"] for r in articles(12)])
    assert_no_temporary(s3_server, "store-away")


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "wrong credentials"])
def test_an_unusable_store_is_bad_input_and_nothing_is_written(case: str, s3_server: S3Server,
                                                                tiny_target: Path) -> None:
    bucket = s3_server.bucket(f"unusable-{case.split()[0]}")
    corpus = s3_server.put(f"{bucket[5:]}/docs.jsonl", jsonl(articles(2)))
    out, env = f"{bucket}/runs", {}
    if case == "missing bucket":
        out = "s3://no-such-bucket/runs"
    elif case == "unreachable endpoint":
        env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    else:
        env = {"AWS_SECRET_ACCESS_KEY": "planted-wrong-secret-1234"}
    before = s3_server.objects(bucket[5:])
    done = cli("submit", "--corpus", corpus, "--target", str(tiny_target), "--out", out, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert out in message and "Traceback" not in done.stderr
    assert {"missing bucket": "does not exist", "unreachable endpoint": "cannot reach",
            "wrong credentials": "access denied"}[case] in message
    assert "planted-wrong-secret-1234" not in done.stdout + done.stderr
    assert s3_server.objects(bucket[5:]) == before, "nothing written"
    assert s3_server.fs().get_file_info("no-such-bucket").type == pafs.FileType.NotFound


def test_a_credential_in_the_spec_or_set_is_refused() -> None:
    from jobs.batch.spec import parse_assignment

    for key in ("output.aws_secret_access_key", "models.token", "corpus.access_key_id"):
        with pytest.raises(BadInput, match="credentials are never taken") as err:
            parse_assignment(f"{key}=planted-value-987")
        assert "planted-value-987" not in str(err.value)
    with pytest.raises(BadInput, match="credentials are never taken") as err:
        JobSpec.from_dict({"corpus": {"path": "docs.jsonl"}, "output": {"secret_key": "planted-value-987"}})
    assert "planted-value-987" not in str(err.value)
    with pytest.raises(BadInput, match="URI with credentials") as err:
        JobSpec.from_dict({"corpus": {"path": "s3://AKIA:planted-value-987@bucket/docs.jsonl"}})
    assert "planted-value-987" not in str(err.value)
    parse_assignment("decode.max_new_tokens=8")  # a field that merely contains "token" is not a credential


def test_a_clusters_workers_get_the_endpoint_never_a_key() -> None:
    from jobs.batch.driver import worker_env

    environ = {"AWS_ENDPOINT_URL": "http://store:9000", "AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIA-planted",
               "AWS_SECRET_ACCESS_KEY": "planted", "AWS_SESSION_TOKEN": "planted", "HF_HOME": "/models", "PATH": "/bin"}
    assert worker_env(environ) == {"AWS_ENDPOINT_URL": "http://store:9000", "AWS_REGION": "eu-west-1",
                                   "HF_HOME": "/models"}  # a runtime_env is shown by Ray's dashboard: no key there


def test_a_job_store_on_s3_writes_whole_objects_or_none(s3_server: S3Server) -> None:
    bucket = s3_server.bucket("store-unit")
    store = JobStore(f"{bucket}/job")
    assert not store.renames
    store.write_bytes("results/a.bin", b"one")
    store.write_bytes("results/a.bin", b"two")
    assert store.read_bytes("results/a.bin") == b"two" and store.list("results") == ["a.bin"]
    with pytest.raises(RuntimeError):
        with store.open_output("results/b.bin") as stream:
            stream.write(b"half a file")
            raise RuntimeError("the attempt dies mid-write")
    assert not store.exists("results/b.bin"), "a failed write leaves no object"
    s3_server.put("store-unit/job/results/shard-00000.parquet", b"PAR1 torn")
    assert store.result_counts("results/shard-00000.parquet") is None, "a torn result is not done"
    assert list(s3_server.objects("store-unit")) == ["store-unit/job/results/a.bin",
                                                      "store-unit/job/results/shard-00000.parquet"]
